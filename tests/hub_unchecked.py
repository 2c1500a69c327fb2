"""A hub that forwards every study unchecked, as a compromised hub would, for tests of what each site checks alone.

The production hub verifies every study's signature (flip_lab.hub.signed) and has no switch to stop. A test starts
its local federation's runner with this file in place of ``flip_lab.hub.runner`` (by setting
``flip_lab.local.RUNNER`` to ``(this file, "runner")``); that runner starts each study with this file in place of
``flip_lab.hub.study``, whose signature check then lets anything through:

    python tests/hub_unchecked.py runner ARGS...   # flip_lab.hub.runner's arguments
    python -I tests/hub_unchecked.py study ARGS... # flip_lab.hub.study's arguments
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve()


def main() -> None:
    role, argv = sys.argv[1], sys.argv[2:]
    if role == "runner":
        from flip_lab.hub import runner

        runner.STUDY = (str(HERE), "study")
        runner.main(argv)
    else:
        from types import SimpleNamespace

        from flip_lab.hub import study

        unchecked = SimpleNamespace(label="anyone (the hub did not check)")
        study.check_signed = lambda bundle, hub_dir: SimpleNamespace(submitter=unchecked)
        study.main(argv)


if __name__ == "__main__":
    main()
