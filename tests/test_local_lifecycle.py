"""Local federations leave nothing behind: `flip-lab up/status/down`, and a kernel that dies mid-study."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.e2e

FLIP_LAB = [sys.executable, "-m", "flip_lab.cli"]


def _gone(pids, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def _port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _family(pids):
    out = set(pids)
    for pid in pids:
        try:
            out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    return out


def test_up_status_down_leaves_no_process_or_port(tmp_path):
    workdir = tmp_path / "fed"
    up = subprocess.run(
        [*FLIP_LAB, "up", "--sites", "2", "--workdir", str(workdir)], capture_output=True, text=True, timeout=300
    )
    assert up.returncode == 0, up.stderr
    state = json.loads((workdir / "federation.json").read_text())
    assert state["durable"] is False and not (workdir / "hub" / "superlink.db").exists(), (
        "a local hub keeps its state in memory unless asked to be durable"
    )
    family = _family(state["pids"])
    status = subprocess.run(
        [*FLIP_LAB, "status", "--workdir", str(workdir)], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and status.stdout.count("online") == 2, status.stdout
    again = subprocess.run(
        [*FLIP_LAB, "up", "--sites", "2", "--workdir", str(workdir)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 2 and "already running" in again.stderr
    down = subprocess.run([*FLIP_LAB, "down", "--workdir", str(workdir)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert _gone(family)
    assert _port_free(state["hub_port"])
    gone = subprocess.run([*FLIP_LAB, "status", "--workdir", str(workdir)], capture_output=True, text=True)
    assert gone.returncode == 3 and "no local federation" in gone.stdout


def test_a_killed_notebook_kernel_takes_its_federation_with_it(tmp_path):
    workdir = tmp_path / "fed"
    script = (
        "import flip_lab, time\n"
        f"fed = flip_lab.local_federation(1, workdir={str(workdir)!r}, scale=0.3)\n"
        "print('UP', flush=True)\n"
        "time.sleep(600)\n"
    )
    kernel = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert kernel.stdout.readline().strip() == "UP"
        state = json.loads((workdir / "federation.json").read_text())
        family = _family(state["pids"])
        os.kill(kernel.pid, signal.SIGKILL)  # no atexit, no finally: only the reaper can clean up
        kernel.wait()
        assert _gone(family, timeout=60), "processes outlived the kernel that started them"
        assert _port_free(state["hub_port"])
        deadline = time.monotonic() + 30
        while (workdir / "federation.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not (workdir / "federation.json").exists(), "the reaper must also clear the state file"
    finally:
        if kernel.poll() is None:
            kernel.kill()


def test_a_federation_removes_the_temporary_folder_it_made_even_at_interpreter_exit(tmp_path):
    """``local_federation()`` without a folder makes a temporary one: ``shutdown`` removes it, and so does a
    plain interpreter exit (no shutdown called); a folder the caller gave is kept."""
    script = (
        "import flip_lab, sys\n"
        "fed = flip_lab.local_federation(1, scale=0.1)\n"
        "print(fed.workdir, flush=True)\n"
        "if sys.argv[1] == 'shutdown':\n"
        "    fed.shutdown()\n"
        "    print('EXISTS' if fed.workdir.exists() else 'GONE', flush=True)\n"
    )
    env = dict(os.environ, TMPDIR=str(tmp_path))
    given = tmp_path / "mine"
    own_folder = script.replace("local_federation(1,", f"local_federation(1, workdir={str(given)!r},")
    # The three interpreters are independent: they run side by side, most of each one's time is spent waiting for
    # its hub and site to start.
    runs = {
        how: subprocess.Popen(
            [sys.executable, "-c", code, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for how, code, arg in (
            ("shutdown", script, "shutdown"),
            ("exit", script, "exit"),
            ("given", own_folder, "shutdown"),
        )
    }
    done = {how: (*proc.communicate(timeout=300), proc.returncode) for how, proc in runs.items()}
    for how in ("shutdown", "exit"):
        stdout, stderr, returncode = done[how]
        assert returncode == 0, stderr
        lines = stdout.split()
        workdir = Path(lines[0])
        assert workdir.parent == tmp_path and workdir.name.startswith("flip-federation-")
        assert not workdir.exists(), f"{how}: the temporary folder {workdir} was left behind"
        if how == "shutdown":
            assert lines[1] == "GONE"
    assert done["given"][2] == 0, done["given"][1]
    assert given.is_dir() and (given / "sites").is_dir(), "a folder the caller gave is kept"


def test_a_hub_that_kept_its_state_in_memory_is_not_restarted_and_the_error_says_how(tmp_path):
    from flip_lab.errors import FederationError
    from flip_lab.local import LocalFederation

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    state = {
        "workdir": str(tmp_path),
        "pids": [gone.pid],
        "sites": {},
        "site_pids": {},
        "hub_port": 1,
        "hub_pid": gone.pid,
        "durable": False,
    }
    fed = LocalFederation(tmp_path, state, owner=False)
    with pytest.raises(FederationError, match=r"kept its state in memory.*durable=True.*flip-lab up --durable"):
        fed.restart_hub()
    assert not (tmp_path / "hub").exists(), "nothing was started"


def test_history_table_columns_and_aggregate_rows():
    from flip_lab.history import History

    history = History()
    history.add_reply({"round": 1, "phase": "train", "site": "a", "metrics": {"loss": 0.5}, "num_examples": 10})
    history.add_aggregate({"round": 1, "phase": "train", "metrics": {"loss": 0.4}})
    frame = history.frame()
    assert list(frame.columns) == ["round", "site", "phase", "metric", "value"]
    assert set(frame.site) == {"a", "aggregate"}
    assert history.metric("loss", phase="train").tolist() == [0.4]
    assert Path(__file__).exists()
