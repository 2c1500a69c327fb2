"""The sandboxed worker's stdout and stderr, copied by the trusted side into the site's log.

The worker writes into a pipe, never into the log file itself: a plan holding the log as its stdout could
truncate or rewrite it (``ftruncate(1, 0)``) and erase what it printed, the tracebacks of its own failures
included. A pipe can only be appended to, and the copier stops writing after :data:`OUTPUT_CAP` bytes per job so
a flood fills no disk; it keeps reading (and dropping) so the worker never blocks on a full pipe.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

OUTPUT_CAP = 16 << 20  # bytes of one job's output kept in the site's log


def copy_to_log(fd: int, log_path: Path, *, cap: int = OUTPUT_CAP) -> threading.Thread:
    """Start a thread that appends what arrives on ``fd`` to ``log_path`` until EOF, then closes ``fd``."""
    thread = threading.Thread(target=_copy, args=(fd, log_path, cap), name=f"output-{log_path.name}", daemon=True)
    thread.start()
    return thread


def _copy(fd: int, log_path: Path, cap: int) -> None:
    kept = dropped = 0
    try:
        with open(log_path, "ab", buffering=0) as log:
            while chunk := os.read(fd, 1 << 16):
                room = max(0, cap - kept)
                if room:
                    log.write(chunk[:room])
                    kept += min(room, len(chunk))
                dropped += max(0, len(chunk) - room)
            if dropped:
                log.write(f"\n[site: {dropped} more bytes of output dropped beyond the cap of {cap} bytes]\n".encode())
    finally:
        os.close(fd)
