"""One plan cannot stall a whole site: while a plan loops forever at every site, another study is
approved and completes; cancelling the looping study kills its workers at once and the sites keep
serving. Real hub and site processes on 127.0.0.1."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

import flip_lab
from site_kernel.jobs import worker_uid

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = (Path(__file__).parent / "plans" / "tiny_plan.py").read_text()
ROUND_TIMEOUT_S = 900  # the looping study's round must outlive the test: only the cancel may end it
B_BOUND_S = 240  # well under the site's train_seconds (3600): B did not wait for A's phase to end
GONE_WITHIN_S = 10


def endless_plan() -> flip_lab.Plan:
    head, _, rest = TINY.partition("def train(model, data, config):\n")
    _, _, tail = rest.partition("\n\ndef evaluate(")
    endless = "def train(model, data, config):\n    while True:\n        pass\n\n\ndef evaluate("
    source = head + endless + tail
    return flip_lab.Plan.from_source(source, name="endless")


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    fed = flip_lab.local_federation(2, workdir=tmp_path_factory.mktemp("concurrency"), scale=0.3)
    yield fed
    fed.shutdown()


def submit(fed, plan):
    # check=False: the dry run would loop forever here on the endless plan
    return fed.submit(plan, rounds=1, min_sites=2, expected_sites=2, round_timeout=ROUND_TIMEOUT_S, check=False)


def audit(site_dir: Path) -> list[dict]:
    path = site_dir / "audit.jsonl"  # written from the site's first event on
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def audited(site_dir: Path, event: str, run_id: int) -> bool:
    return any(e["event"] == event and e.get("run_id") == run_id for e in audit(site_dir))


def processes_of(uid: int) -> list[int]:
    found = []
    for proc in psutil.process_iter(["uids", "pid"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real == uid:
                found.append(proc.info["pid"])
        except psutil.Error:
            pass
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.2)


def test_a_looping_plan_neither_stalls_another_study_nor_outlives_its_cancel(fed, tiny_plan):
    looping = submit(fed, endless_plan())
    sites = list(fed.site_dirs.values())
    uids = {site: worker_uid(site, looping.id) for site in sites}
    # A's train() is running at every site: its workers exist and the round's train phase went out.
    wait_for(lambda: all(audited(s, "job_started", looping.id) for s in sites), 300, "the looping study's workers")
    wait_for(lambda: all(processes_of(uid) for uid in uids.values()), 30, "the looping workers' processes")
    time.sleep(3)
    assert not looping.done

    started = time.monotonic()
    other = submit(fed, tiny_plan).wait(timeout=B_BOUND_S, raise_on_failure=False)
    took = time.monotonic() - started
    assert other.status == "completed", other.describe_failure()
    assert took < B_BOUND_S
    assert not looping.done, "the looping study is still in its round"
    assert all(processes_of(uid) for uid in uids.values()), "and its workers still loop"

    looping.cancel()
    cancelled = time.monotonic()
    wait_for(
        lambda: not any(processes_of(uid) for uid in uids.values()),
        GONE_WITHIN_S,
        "the cancelled study's workers to be killed",
    )
    print(f"second study completed in {took:.1f} s; cancelled workers gone in {time.monotonic() - cancelled:.1f} s")
    for site in sites:
        assert audited(site, "job_stopped", looping.id)

    again = submit(fed, tiny_plan).wait(timeout=B_BOUND_S, raise_on_failure=False)
    assert again.status == "completed", "the sites keep serving after the cancel"
