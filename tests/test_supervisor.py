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


def test_flip_site_demo_lays_out_ready_site_folders_as_the_readme_shows(tmp_path):
    """`flip-site demo ROOT --sites N --hub HOST:PORT`, as the README and a local federation run it: ready site
    folders, each with its settings, policy and a registered dataset; a second call with the same cache generates
    nothing and gives the same hospitals."""
    import json
    import tomllib

    from flip_lab.supervisor import flip_site

    def demo(root):
        cmd = [*flip_site(), "demo", str(root), "--sites", "2", "--hub", "127.0.0.1:9093", "--scale", "0.2"]
        done = subprocess.run(
            [*cmd, "--cache", str(tmp_path / "cache"), "--json"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["sites"]

    first = demo(tmp_path / "a")
    assert len(first) == 2
    for name, folder in first.items():
        settings = tomllib.loads((tmp_path / "a" / name / "site.toml").read_text())
        assert folder == str(tmp_path / "a" / name) and settings["name"] == name and settings["hub"] == "127.0.0.1:9093"
        assert (tmp_path / "a" / name / "policy.toml").is_file()
        assert any((tmp_path / "a" / name / "data").rglob("manifest*.json"))
    assert sorted(demo(tmp_path / "b")) == sorted(first)
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 1
