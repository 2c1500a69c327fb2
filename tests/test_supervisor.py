"""The supervisor's process watch: it hears of a process's end without polling, including one already gone."""

from __future__ import annotations

import subprocess
import sys
import threading

from flip_lab.supervisor import ExitWatch


def test_the_exit_watch_reports_each_process_once_when_it_ends():
    ended: list[str] = []
    both = threading.Event()

    def on_exit(name: str) -> None:
        ended.append(name)
        if len(ended) == 2:
            both.set()

    watch = ExitWatch(on_exit)
    try:
        proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        watch.watch("running", proc.pid)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        watch.watch("gone", gone.pid)  # reaped before it was watched: reported at once
        assert ended == ["gone"]
        proc.stdin.close()  # the process ends now
        assert both.wait(20), "the end of a watched process was not reported"
        proc.wait()
        assert ended == ["gone", "running"]
    finally:
        watch.close()
        watch.close()  # closing twice is harmless
