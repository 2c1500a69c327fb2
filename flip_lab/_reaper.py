"""Stop a notebook's local federation when the notebook's kernel dies, however it dies.

``python -m flip_lab._reaper PARENT_PID WORKDIR PID...``: waits for PARENT_PID to disappear, then stops the
process groups by PID and removes the federation's state file (and its folder, when the federation made a temporary
one for itself). It exits early once the state file is gone
(the federation was shut down normally).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .local import remove
from .supervisor import STATE, alive, stop_pids


def main() -> None:
    parent, workdir, pids = int(sys.argv[1]), Path(sys.argv[2]), [int(p) for p in sys.argv[3:]]
    while alive(parent):
        if not (workdir / STATE).exists():
            return
        time.sleep(0.5)
    state: dict[str, object] = {}
    try:  # the state file has the current PIDs (a restarted hub has a new one)
        import json

        state = json.loads((workdir / STATE).read_text())
        pids = sorted(set(pids) | set(state.get("pids", [])))  # type: ignore[call-overload]
    except (OSError, ValueError):
        pass
    stop_pids(pids)
    (workdir / STATE).unlink(missing_ok=True)
    if state.get("temporary"):
        remove(workdir)


if __name__ == "__main__":
    main()
