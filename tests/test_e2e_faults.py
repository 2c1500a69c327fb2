"""Faults with real processes: a site killed mid-run, and a federation that falls below its minimum."""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _wait_round(job, round_, timeout=300):
    deadline = time.monotonic() + timeout
    while job.round < round_ and not job.done:
        assert time.monotonic() < deadline, f"job did not reach round {round_}"
        time.sleep(0.1)


def test_killed_site_drops_out_and_the_round_completes_with_the_others(federation, tiny_plan):
    job = federation.submit(tiny_plan, rounds=3, min_sites=2, expected_sites=3, round_timeout=120)
    _wait_round(job, 2)
    victim = min(federation.site_dirs)
    federation.kill_site(victim)
    started = time.monotonic()
    job.wait(timeout=300)
    assert job.status == "completed"
    assert time.monotonic() - started < 150, "a dead site must not stall the study beyond Flower's heartbeat bound"
    dropped = [e for e in job.errors if e["type"] == "site_error" and e["site"] == victim]
    assert dropped and dropped[0]["kind"] in ("site_offline", "message_lost", "timeout")
    last = job.history[job.history["round"] == 3]
    assert victim not in set(last.site) and len(set(last.site) - {"aggregate"}) == 2


def test_below_minimum_the_job_fails_clearly_and_in_bounded_time(federation, tiny_plan):
    alive = [s["site"] for s in federation.sites() if s["online"]]
    for name in alive[:-1]:
        federation.kill_site(name)
    started = time.monotonic()
    job = federation.submit(
        tiny_plan, rounds=2, min_sites=2, expected_sites=2, round_timeout=20, connect_timeout=5, approval_timeout=20
    )
    job.wait(timeout=300, raise_on_failure=False)
    assert job.status == "failed"
    assert "minimum" in job.message or "at least 2" in job.message
    assert time.monotonic() - started < 120
