"""The sandbox, tested with real child processes that confine themselves and then misbehave.

Every containment test has a twin that runs the same action unconfined and watches it succeed, so
each test fails if its protection is removed. Where ordinary permissions could be what stops an
action, a third run only switches to the unprivileged user, to show that Landlock (not file modes)
does the stopping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from site_kernel.errors import SandboxError
from site_kernel.sandbox import MECHANISMS, probe_isolation

REPO = Path(__file__).resolve().parents[1]
NOBODY = 65534
LIMITS = {"memory_mb": 1024, "cpu_seconds": 1, "processes": 8, "open_files": 64, "file_size_mb": 1}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(probe_isolation().values()),
    reason="needs root and a kernel with every sandbox mechanism (see probe_isolation())",
)

CHILD = r"""
import json, mmap, os, socket, subprocess, sys, threading, time
from pathlib import Path
spec = json.loads(sys.argv[1])
box, port, LOCAL = Path(spec["box"]), spec.get("port"), "127.0.0.1"

def fork_bomb():
    kids, error = [], None
    for _ in range(30):
        try:
            pid = os.fork()
        except OSError as err:
            error = err.errno
            break
        if pid == 0:
            time.sleep(10)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(kids), "errno": error}

def udp_socket():
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

def burn_cpu():
    while time.process_time() < 2.5:
        pass
    return "finished"

ACTIONS = {
    "read_data": lambda: (box / "data" / "images.txt").read_text(),
    "read_secret": lambda: (box / "secret" / "site.key").read_text(),
    "write_scratch": lambda: (box / "scratch" / "out.txt").write_text("ok"),
    "write_outside": lambda: (box / "outside" / "leak.txt").write_text("canary"),
    "tcp": lambda: socket.create_connection((LOCAL, port), timeout=2).sendall(b"canary"),
    "udp": lambda: udp_socket().sendto(b"canary", (LOCAL, port)),
    "netlink": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close(),
    "vsock": lambda: socket.socket(40, socket.SOCK_STREAM).close(),  # AF_VSOCK: no netns covers it
    "shell": lambda: subprocess.run(["/bin/sh", "-c", "echo pwned"], check=True).returncode,
    "os_system": lambda: os.system("true"),
    "fork_bomb": fork_bomb,
    "memory": lambda: len(mmap.mmap(-1, 3 << 30)),  # reserve 3 GiB; pages are never touched
    "cpu": burn_cpu,
    "big_file": lambda: (box / "scratch" / "big.bin").write_bytes(b"x" * (3 << 20)),
    "netns": lambda: os.readlink("/proc/self/ns/net"),
}

if spec.get("thread"):
    threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
if spec["mode"] == "confined":
    from site_kernel.policy import Limits
    from site_kernel.sandbox import confine, probe_isolation
    if spec.get("probe_first"):
        probe_isolation()
    try:
        report = confine(
            scratch=box / "scratch", readable=[box / "data"], limits=Limits(**spec["limits"]),
            uid=spec.get("uid", 65534), accept_weaker_isolation=spec.get("weaker", False),
            protected=[Path(p) for p in spec.get("protected", [])],
        )
    except Exception as err:
        print(json.dumps({"confine_error": type(err).__name__, "message": str(err)}))
        sys.exit(3)
    print(json.dumps({"report": report.audit_fields()}))
elif spec["mode"] == "unprivileged":
    os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
try:
    result = ACTIONS[spec["action"]]() if spec["action"] else None
    print(json.dumps({"ok": True, "result": result}))
except Exception as err:
    print(json.dumps({"ok": False, "error": type(err).__name__}))
"""


@pytest.fixture
def box():
    """A job-like folder that nobody can reach (pytest's tmp_path is not reachable by nobody)."""
    root = Path(tempfile.mkdtemp(prefix="flip-sandbox-", dir="/tmp"))
    root.chmod(0o755)
    for name, mode in (("data", 0o755), ("secret", 0o755), ("outside", 0o777), ("scratch", 0o755)):
        (root / name).mkdir()
        (root / name).chmod(mode)
    (root / "data" / "images.txt").write_text("pixels")
    (root / "secret" / "site.key").write_text("PRIVATE KEY")  # world-readable on purpose: only Landlock stops it
    for f in ((root / "data" / "images.txt"), (root / "secret" / "site.key")):
        f.chmod(0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def child_env() -> dict[str, str]:
    """As the executor starts a worker: one thread until confine() (see site_kernel.sandbox)."""
    threads = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return {**os.environ, "PYTHONPATH": str(REPO), **threads}


def run_child(box: Path, action: str | None, mode: str, **extra) -> tuple[subprocess.CompletedProcess, dict]:
    spec = {"box": str(box), "action": action, "mode": mode, "limits": LIMITS, **extra}
    env = child_env()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    result = next((x for x in lines if "ok" in x or "confine_error" in x), {})
    report = next((x["report"] for x in lines if "report" in x), None)
    return proc, {**result, "report": report}


# action -> what a confined run must show; the unconfined twin must succeed.
CONTAINED = {
    "read_secret": "PermissionError",
    "write_outside": "PermissionError",
    "shell": "PermissionError",
    "netlink": "PermissionError",
    "vsock": "PermissionError",
    "udp": "PermissionError",
    "memory": "OSError",
    "big_file": "OSError",
}


@pytest.mark.parametrize("action", sorted(CONTAINED))
def test_action_is_contained_when_confined(box, action):
    proc, out = run_child(box, action, "confined")
    assert out.get("ok") is False, (proc.stdout, proc.stderr)
    assert out["error"] == CONTAINED[action]


@pytest.mark.parametrize("action", sorted(CONTAINED))
def test_same_action_succeeds_unconfined(box, action):
    proc, out = run_child(box, action, "none", port=_free_udp_port())
    assert out.get("ok") is True, (proc.stdout, proc.stderr)


@pytest.mark.parametrize("action", ["read_secret", "write_outside"])
def test_file_modes_alone_do_not_stop_it(box, action):
    """File modes let nobody read the secret and write outside: Landlock is what stops it above."""
    proc, out = run_child(box, action, "unprivileged")
    assert out.get("ok") is True, (proc.stdout, proc.stderr)


@pytest.mark.parametrize("action", ["read_data", "write_scratch"])
def test_confined_plan_reads_its_data_and_writes_scratch(box, action):
    proc, out = run_child(box, action, "confined")
    assert out.get("ok") is True, (proc.stdout, proc.stderr)


@pytest.mark.parametrize("mode", ["confined", "none"])
def test_tcp_to_host_loopback_listener(box, mode):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(1.0)
        _, out = run_child(box, "tcp", mode, port=server.getsockname()[1])
        try:
            conn, _ = server.accept()
            received = conn.recv(100)
            conn.close()
        except TimeoutError:
            received = b""
    if mode == "confined":
        assert out["ok"] is False and received == b""
    else:
        assert out["ok"] is True and received == b"canary"


@pytest.mark.parametrize("mode", ["confined", "none"])
def test_udp_to_host_loopback_listener(box, mode):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(1.0)
        _, out = run_child(box, "udp", mode, port=server.getsockname()[1])
        try:
            received = server.recv(100)
        except TimeoutError:
            received = b""
    assert received == (b"" if mode == "confined" else b"canary")
    assert out["ok"] is (mode == "none")


@pytest.mark.parametrize("mode", ["confined", "none"])
def test_network_namespace_differs_from_the_hosts(box, mode):
    _, out = run_child(box, "netns", mode)
    assert out["ok"] is True
    assert (out["result"] != os.readlink("/proc/self/ns/net")) is (mode == "confined")


@pytest.mark.parametrize("mode", ["confined", "none"])
def test_os_system_cannot_run_a_shell(box, mode):
    _, out = run_child(box, "os_system", mode)
    assert out["ok"] is True
    assert (out["result"] != 0) is (mode == "confined")


@pytest.mark.parametrize("mode", ["confined", "none"])
def test_fork_bomb_hits_the_process_limit(box, mode):
    proc, out = run_child(box, "fork_bomb", mode)
    assert out["ok"] is True, proc.stderr
    if mode == "confined":
        assert out["result"]["forked"] < LIMITS["processes"] and out["result"]["errno"] is not None
    else:
        assert out["result"]["forked"] == 30


@pytest.mark.parametrize("mode", ["confined", "none"])
def test_endless_loop_is_killed_by_the_cpu_limit(box, mode):
    proc, out = run_child(box, "cpu", mode)
    if mode == "confined":
        assert proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and "ok" not in out
    else:
        assert proc.returncode == 0 and out["result"] == "finished"


def test_report_lists_every_mechanism(box):
    _, out = run_child(box, None, "confined", probe_first=True)  # the probe leaves no thread behind
    report = out["report"]
    assert tuple(report["applied"]) == MECHANISMS and report["missing"] == []
    assert report["uid"] == NOBODY and report["landlock_abi"] >= 1
    assert report["limits"]["processes"] == LIMITS["processes"]


def test_confine_refuses_a_multithreaded_process(box):
    proc, out = run_child(box, "read_secret", "confined", thread=True)
    assert proc.returncode == 3 and out["confine_error"] == SandboxError.__name__
    assert "one thread" in out["message"]


def test_staying_root_is_missing_isolation_unless_accepted(box):
    proc, out = run_child(box, None, "confined", uid=None)
    assert proc.returncode == 3 and out["confine_error"] == "SandboxUnavailable"
    assert "drop_privileges" in out["message"] and "accept_weaker_isolation" in out["message"]
    _, out = run_child(box, None, "confined", uid=None, weaker=True)
    assert out["report"]["missing"] == ["drop_privileges"]


def test_confine_refuses_a_readable_path_that_exposes_protected_files(box):
    proc, out = run_child(box, None, "confined", protected=[str(box / "data" / "images.txt")])
    assert proc.returncode == 3 and "would expose" in out["message"]


def test_confine_refuses_data_the_sandbox_user_cannot_read(box):
    (box / "data").chmod(0o700)
    proc, out = run_child(box, None, "confined")
    assert proc.returncode == 3 and "chmod -R o+rX" in out["message"]


TRAIN_AFTER_CONFINE = r"""
import json, sys, time
import torch
from pathlib import Path
from site_kernel.policy import Limits
from site_kernel.sandbox import confine
box = Path(sys.argv[1])
report = confine(scratch=box / "scratch", readable=[box / "data"],
                 limits=Limits(memory_mb=4096, processes=16))
torch.set_num_threads(2)  # threads started after confine() inherit it
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)  # imports torch._dynamo, hence cProfile, lazily
x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 2, (8,))
loss = torch.nn.functional.cross_entropy(model(x), y)
loss.backward()
opt.step()
torch.save(model.state_dict(), box / "scratch" / "model.pt")
print(json.dumps({"confine_ms": report.elapsed_ms, "loss": float(loss)}))
"""


def test_torch_trains_after_confine_and_confine_is_cheap(box):
    proc = subprocess.run(
        [sys.executable, "-c", TRAIN_AFTER_CONFINE, str(box)],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"confine() took {out['confine_ms']:.1f} ms")
    assert out["confine_ms"] < 250 and (box / "scratch" / "model.pt").exists()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stopping_one_jobs_worker_leaves_another_jobs_worker_at_the_same_site_running(tmp_path):
    """A worker is stopped with every process of its uid; two studies at one site must not share one."""
    from site_kernel.jobs import _kill_uid, worker_uid

    site_dir = tmp_path / "site"
    site_dir.mkdir()
    first, second = worker_uid(site_dir, 1), worker_uid(site_dir, 2)
    assert first != second
    assert worker_uid(tmp_path / "another-site", 1) != first, "nor do two sites on one host"
    workers = [subprocess.Popen(["sleep", "60"], user=uid, group=uid) for uid in (first, second)]
    try:
        _kill_uid(first)
        assert workers[0].wait(10) == -signal.SIGKILL
        assert workers[1].poll() is None, "the other study's worker still runs"
    finally:
        for proc in workers:
            proc.kill()
            proc.wait(10)
