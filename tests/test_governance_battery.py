"""Malicious plans against a real site kernel: each is refused or contained, the site keeps serving, the event is
audited, and the canary never leaves the site (checked at the site's egress capture, in every event the researcher
receives, and in the hub's log)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import flip_lab

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = (Path(__file__).parent / "plans" / "tiny_plan.py").read_text()
CANARY = "PIXEL-CANARY-"


def plan_with_train(body: str, extra_imports: str = "") -> flip_lab.Plan:
    """The tiny plan with its train() replaced by ``body`` (indented 4 spaces)."""
    head, _, rest = TINY.partition("def train(model, data, config):\n")
    _, _, tail = rest.partition("\n\ndef evaluate(")
    source = extra_imports + head + "def train(model, data, config):\n" + body + "\n\ndef evaluate(" + tail
    return flip_lab.Plan.from_source(source, name="attack")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One demo hospital with tight limits, a planted key and an egress capture, behind a real hub."""
    fed = flip_lab.local_federation(1, workdir=tmp_path_factory.mktemp("battery"), scale=0.3)
    site_dir = next(iter(fed.site_dirs.values()))
    policy = (site_dir / "policy.toml").read_text()
    for key, value in {
        "memory_mb": 3000,
        "cpu_seconds": 60,
        "processes": 32,
        "file_size_mb": 5,
        "wall_seconds": 25,
    }.items():
        policy = policy.replace(f"\n{key} = ", f"\n{key} = {value}\n# was: ", 1)
    (site_dir / "policy.toml").write_text(policy)
    (site_dir / "keys").mkdir(exist_ok=True)
    (site_dir / "keys" / "site.key").write_text("SECRET-KEY-9c1\n")
    (site_dir / "keys" / "site.key").chmod(0o644)  # readable by anyone on the host: only the sandbox stops it
    toml = (site_dir / "site.toml").read_text()
    (site_dir / "site.toml").write_text(toml + f'egress_capture = "{site_dir / "egress.jsonl"}"\n')
    outside = tmp_path_factory.mktemp("outside") / "secret.txt"
    outside.write_text("OUTSIDE-SECRET-44\n")
    outside.chmod(0o644)
    outside.parent.chmod(0o755)
    yield {"fed": fed, "dir": site_dir, "outside": outside}
    fed.shutdown()


def run(site, plan, **extra):
    # check=False: an attack plan must reach the site, not run here in the dry run
    job = site["fed"].submit(plan, rounds=1, min_sites=1, expected_sites=1, round_timeout=120, extra=extra, check=False)
    job.wait(timeout=300, raise_on_failure=False)
    return job


def leaked(site, job, *needles: str) -> list[str]:
    """Every place a needle shows up outside the site: egress capture, researcher events, hub log."""
    places = {
        "egress": (site["dir"] / "egress.jsonl").read_text() if (site["dir"] / "egress.jsonl").exists() else "",
        "events": json.dumps(job.events),
        "hub log": (site["fed"].workdir / "hub" / "superlink.log").read_text(errors="replace"),
    }
    return [f"{n} in {where}" for n in needles for where, text in places.items() if n in text]


def errors_of(job):
    return [(e["kind"], e["message"]) for e in job.errors if e["type"] == "site_error"]


def audit_events(site):
    return [json.loads(line)["event"] for line in (site["dir"] / "audit.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "name, body, needle",
    [
        (
            "read outside the dataset",
            "    return {'loss': float(len(open(config['path']).read()))}",
            "OUTSIDE-SECRET-44",
        ),
        ("read the site's key", "    return {'loss': float(len(open(config['key']).read()))}", "SECRET-KEY-9c1"),
        ("read the site's policy", "    open(config['policy']).read()\n    return {'loss': 0.0}", "approval ="),
        ("write outside scratch", "    open('/tmp/flip-pwned', 'w').write('x')\n    return {'loss': 0.0}", "pwned"),
        (
            "run a shell command",
            (
                "    import subprocess\n    subprocess.run(['sh', '-c', 'touch /tmp/flip-shell'])\n"
                "    return {'loss': 0.0}"
            ),
            "flip-shell",
        ),
        (
            "allocate far too much memory",
            "    x = bytearray(20 * 2**30)\n    return {'loss': float(len(x))}",
            "bytearray",
        ),
    ],
)
def test_contained_attacks_fail_with_a_safe_error_and_the_site_serves_on(site, name, body, needle):
    plan = plan_with_train(body)
    job = run(
        site,
        plan,
        path=str(site["outside"]),
        key=str(site["dir"] / "keys" / "site.key"),
        policy=str(site["dir"] / "policy.toml"),
    )
    assert job.status == "failed", f"{name}: the attack was not contained"
    kinds = errors_of(job)
    assert kinds and kinds[0][0] in ("plan_error", "resource_limit"), kinds
    assert not leaked(site, job, needle)
    assert not Path("/tmp/flip-pwned").exists() and not Path("/tmp/flip-shell").exists()
    assert "plan_failed" in audit_events(site)


def test_network_to_a_host_listener_is_impossible(site):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.settimeout(0.5)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    body = (
        "    import socket\n"
        "    try:\n"
        "        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', config['udp']))\n"
        "    except OSError:\n"
        "        pass\n"
        "    socket.create_connection(('127.0.0.1', config['tcp']), timeout=2)\n"
        "    return {'loss': 0.0}"
    )
    job = run(site, plan_with_train(body), tcp=tcp.getsockname()[1], udp=udp.getsockname()[1])
    assert job.status == "failed"
    with pytest.raises(socket.timeout):
        tcp.accept()
    with pytest.raises(socket.timeout):
        udp.recvfrom(10)
    tcp.close()
    udp.close()


def test_endless_loop_is_stopped_by_the_sites_limits(site):
    started = time.monotonic()
    job = run(site, plan_with_train("    while True:\n        pass"))
    assert job.status == "failed"
    assert errors_of(job)[0][0] in ("resource_limit", "plan_error")
    assert time.monotonic() - started < 120


def test_fork_bomb_is_contained_and_leaves_no_process(site):
    body = "    import os\n    while True:\n        os.fork()"
    job = run(site, plan_with_train(body))
    assert job.status == "failed"
    time.sleep(2)
    from site_kernel.jobs import worker_uid

    job_uid = worker_uid(site["dir"], job.id)
    left = [p.pid for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == job_uid]
    assert not left, "forked processes outlived the job"


@pytest.mark.parametrize(
    "how, body",
    [
        ("print", f"    print('{CANARY}' + repr(float(data.train_x[0, 0, 5, 5])))\n    return {{'loss': 0.0}}"),
        ("raise", f"    raise ValueError('{CANARY}' + repr(float(data.train_x[0, 0, 5, 5])))"),
        (
            "log",
            (
                f"    import logging\n    logging.getLogger('x').error('{CANARY}%s', float(data.train_x[0, 0, 5, 5]))\n"
                "    return {'loss': 0.0}"
            ),
        ),
        ("metric name", f"    return {{'{CANARY}' + repr(float(data.train_x[0, 0, 5, 5])): 1.0}}"),
        ("exception class name", f"    raise type('{CANARY}X', (ValueError,), {{}})('x')"),
        (
            "extra array",
            (
                "    import torch\n    model.register_buffer('exfil', data.train_x[0, 0].clone())\n"
                "    return {'loss': 0.0}"
            ),
        ),
        (
            "changed shape",
            "    import torch\n    model[0].bias = torch.nn.Parameter(torch.zeros(9))\n    return {'loss': 0.0}",
        ),
    ],
)
def test_canary_never_leaves_the_site(site, how, body):
    job = run(site, plan_with_train(body))
    assert not leaked(site, job, CANARY), f"canary leaked via {how}"
    if how in ("print", "log"):
        assert job.status == "completed"  # output is allowed; it stays in the site's log
        logs = "".join(p.read_text(errors="replace") for p in (site["dir"] / "logs").glob("researcher-*.log"))
        assert CANARY in logs
    else:
        assert job.status == "failed" or any(e["kind"] == "withheld" for e in job.errors if "kind" in e)


def test_site_still_serves_an_honest_job_and_its_audit_log_verifies(site):
    job = run(site, flip_lab.Plan.from_source(TINY, name="honest"))
    assert job.status == "completed"
    verify = subprocess.run(
        [sys.executable, "-m", "site_kernel.cli", "audit", "verify", "--site", str(site["dir"])],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    heads = {e["audit_head"] for e in job.events if e["type"] == "reply"}
    assert heads and all(len(h) == 64 for h in heads)


def test_edited_audit_log_is_detected(site, tmp_path):
    import shutil

    run(site, flip_lab.Plan.from_source(TINY, name="honest"))  # a real log, written by the site
    copy = tmp_path / "site"
    shutil.copytree(site["dir"], copy, ignore=shutil.ignore_patterns("cache", "jobs", "data", "_raw"))
    lines = (copy / "audit.jsonl").read_text().splitlines()
    entry = json.loads(lines[1])
    entry["event"] = "plan_rejected" if entry["event"] != "plan_rejected" else "plan_approved"
    lines[1] = json.dumps(entry)
    (copy / "audit.jsonl").write_text("\n".join(lines) + "\n")
    verify = subprocess.run(
        [sys.executable, "-m", "site_kernel.cli", "audit", "verify", "--site", str(copy)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 1
