"""Attacks from inside the sandboxed worker on what it holds and what it sends besides its checked reply.

One real federation (a hub and the DICOM demo hospital) serves every attack: the plan patches its clocks to
send numbers through the timing fields, scans its own memory for the site's identifiers, dials a UNIX socket of
the host, erases its own log, and raises to send a line number. Each is contained: nothing it chose leaves the
site, and what the site keeps for its data owner stays intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
from test_governance_battery import TINY, plan_with_train  # one way to build an attack plan

import flip_lab


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The DICOM demo hospital (accession numbers name its series folders) behind a real hub."""
    fed = flip_lab.local_federation(1, workdir=tmp_path_factory.mktemp("worker"), scale=0.3)
    site_dir = next(iter(fed.site_dirs.values()))
    policy = (site_dir / "policy.toml").read_text()
    (site_dir / "policy.toml").write_text(policy.replace("\nwall_seconds = ", "\nwall_seconds = 120\n# was: ", 1))
    yield {"fed": fed, "dir": site_dir}
    fed.shutdown()


def run(site, plan, **extra):
    # check=False: these plans probe the site's worker; none of them should run here in the dry run
    job = site["fed"].submit(plan, rounds=1, min_sites=1, expected_sites=1, round_timeout=240, extra=extra, check=False)
    job.wait(timeout=400, raise_on_failure=False)
    return job


def output_of(site, job) -> str:
    return (site["dir"] / "logs" / f"researcher-{job.id}.log").read_text(errors="replace")


@pytest.mark.e2e
def test_patched_clocks_send_nothing_through_the_timing_fields(site):
    body = (
        "    import time\n"
        "    perf = time.perf_counter\n"
        "    time.perf_counter = lambda: perf() + 7654321.0\n"
        "    time.time = lambda: 1234567.0\n"
        "    return {'loss': 0.0}"
    )
    before = time.time()
    job = run(site, plan_with_train(body))
    after = time.time()
    assert job.status == "completed", job.errors
    replies = [e for e in job.events if e["type"] == "reply"]
    assert {e["phase"] for e in replies} == {"train", "evaluate"}
    for reply in replies:
        assert 0 <= reply["compute_s"] < after - before
        assert reply["compute_s"] == round(reply["compute_s"], 1)
        assert before - 1 <= reply["started_at"] <= after
    assert "7654321" not in json.dumps(job.events) and "1234567" not in json.dumps(job.events)


MEMORY_SCAN = r"""
    import ctypes, re
    ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: /proc/self/mem is root's after the uid switch
    patterns = {
        "accession": re.compile(rb"ACC[0-9]{7}"),            # the DICOM series folders' names
        "canary": re.compile(rb"CANARY\^[0-9A-F]{8}"),       # the patients' names
        "path": re.compile(rb"r[a]w/(?:images|labels)/"),    # the site's raw files
        "control": re.compile(rb"Z[Z]Q-CONTROL-[0-9]{3}"),   # put there below: proves the scan sees the heap
    }
    control = "ZZQ-CONTROL-" + str(100 * len(patterns))  # made at run time: the source does not hold it
    found = dict.fromkeys(patterns, 0)
    scanned = 0
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps.read().splitlines():
            parts = line.split()
            name = parts[5] if len(parts) > 5 else ""
            if "r" not in parts[1] or name.startswith("/") or name in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            for at in range(start, end, 1 << 24):
                try:
                    chunk = os.pread(mem.fileno(), min(1 << 24, end - at) + 64, at)
                except OSError:
                    continue
                scanned += len(chunk)
                for key, pattern in patterns.items():
                    found[key] += len(pattern.findall(chunk))
    print("SCAN", " ".join(f"{k}={v}" for k, v in found.items()), f"scanned={scanned}", len(control))
    return {'loss': 0.0}"""


@pytest.mark.e2e
def test_the_plans_memory_holds_none_of_the_sites_identifiers(site):
    # the export the site registered: the demo hospital's archive, which stays in the per-seed cache
    source = Path(json.loads((site["dir"] / "data" / "default" / "manifest.json").read_text())["source"])
    series = [p.name for p in source.iterdir() if p.is_dir()]
    assert series and all(re.fullmatch(r"ACC[0-9]{7}", name) for name in series)  # the needles are real
    job = run(site, plan_with_train("    import os" + MEMORY_SCAN))
    assert job.status == "completed", job.errors
    line = next(x for x in output_of(site, job).splitlines() if x.startswith("SCAN "))
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
    assert counts["control"] >= 1 and counts["scanned"] > 50 << 20, line
    assert (counts["accession"], counts["canary"], counts["path"]) == (0, 0, 0), line


@pytest.mark.e2e
def test_a_unix_socket_of_the_host_receives_nothing(site):
    # In /tmp, not pytest's tmp_path: that lies under a 0700 folder, where the plan's uid is stopped by plain
    # file permissions whatever the sandbox does.
    hidden = Path(tempfile.mkdtemp(prefix="flip-sockets-", dir="/tmp"))
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(hidden / "stream.sock"))
    stream.listen()
    stream.settimeout(0.5)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(str(hidden / "dgram.sock"))
    dgram.settimeout(0.5)
    for path in hidden.iterdir():
        path.chmod(0o777)
    hidden.chmod(0o711)  # the plan's uid may pass through the folder but not list it
    body = (
        "    import socket\n"
        "    tries = [\n"
        "        lambda: socket.socket(socket.AF_UNIX).connect(config['stream']),\n"
        "        lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'x', config['dgram']),\n"
        "        lambda: socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)[0].sendto(b'x', config['dgram']),\n"
        "    ]\n"
        "    for attempt in tries:\n"
        "        try:\n"
        "            attempt()\n"
        "            print('SOCKET reached')\n"
        "        except OSError as err:\n"
        "            print('SOCKET refused', err.errno)\n"
        "    a, b = socket.socketpair()\n"
        "    a.sendall(b'ok')\n"
        "    print('SOCKETPAIR', b.recv(2).decode())\n"
        "    return {'loss': 0.0}"
    )
    try:
        job = run(site, plan_with_train(body), stream=str(hidden / "stream.sock"), dgram=str(hidden / "dgram.sock"))
        assert job.status == "completed", job.errors
        with pytest.raises(socket.timeout):
            stream.accept()
        with pytest.raises(socket.timeout):
            dgram.recv(10)
    finally:
        stream.close()
        dgram.close()
        shutil.rmtree(hidden)
    output = output_of(site, job)
    assert "SOCKET reached" not in output and output.count("SOCKET refused") == 3
    assert "SOCKETPAIR ok" in output


@pytest.mark.e2e
def test_a_plan_cannot_erase_what_it_printed_from_the_sites_log(site):
    body = (
        "    import os, sys\n"
        "    print('EVIDENCE-' + str(config['seed']), flush=True)\n"
        "    for fd in (1, 2):\n"
        "        try:\n"
        "            os.ftruncate(fd, 0)\n"
        "        except OSError:\n"
        "            pass\n"
        "        try:\n"
        "            os.lseek(fd, 0, os.SEEK_SET)\n"
        "        except OSError:\n"
        "            pass\n"
        "    return {'loss': 0.0}"
    )
    job = run(site, plan_with_train(body), seed=4242)
    assert job.status == "completed", job.errors
    assert "EVIDENCE-4242" in output_of(site, job)


@pytest.mark.e2e
@pytest.mark.parametrize("allowed", [False, True])
def test_the_plans_line_number_leaves_only_where_the_policy_allows(site, allowed):
    policy_path = site["dir"] / "policy.toml"
    policy = policy_path.read_text()
    body = "    values = []\n    raise ValueError('x')"
    line = TINY.partition("def train(model, data, config):\n")[0].count("\n") + 3
    try:
        if allowed:
            policy_path.write_text(policy.replace("\nerror_line_numbers = false", "\nerror_line_numbers = true"))
        job = run(site, plan_with_train(body))
    finally:
        policy_path.write_text(policy)
    assert job.status == "failed"
    messages = [e["message"] for e in job.errors if e["type"] == "site_error"]
    assert messages and all("train() raised ValueError" in m for m in messages), messages
    assert all((f"plan.py line {line}" in m) == allowed and ("line" in m) == allowed for m in messages), messages
    assert f'File "plan.py", line {line}, in train' in output_of(site, job)  # the data owner keeps it


def test_the_output_copier_stops_writing_at_its_cap_and_says_so(tmp_path):
    from site_kernel._output import copy_to_log

    read, write = os.pipe()
    log = tmp_path / "out.log"
    copier = copy_to_log(read, log, cap=1000)
    for _ in range(50):
        os.write(write, b"y" * 100)
    os.close(write)
    copier.join(timeout=10)
    text = log.read_text()
    assert text.split("\n")[0] == "y" * 1000
    assert "4000 more bytes of output dropped beyond the cap of 1000 bytes" in text
