"""Faults with real processes: a straggler's late reply, a poisoned update, and the hub killed mid-study and started again (sites come
back, the job resumes from its last released round)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import flip_lab

PLANS = Path(__file__).parent / "plans"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SETTINGS = {"rounds": 4, "seed": 3, "lr": 0.02, "batch_size": 16, "min_sites": 3, "expected_sites": 3,
            "round_timeout": 240}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A federation of its own: these tests kill its hub."""
    with flip_lab.local_federation(3, workdir=tmp_path_factory.mktemp("fed"), scale=0.3) as federation:
        yield federation


def test_a_stragglers_late_reply_is_ignored_and_it_rejoins_the_next_round(fed, tiny_plan):
    sizing = fed.submit(tiny_plan, rounds=1, expected_sites=3, round_timeout=240).wait(timeout=600)
    train = sizing.history[(sizing.history.phase == "train") & (sizing.history.metric == "num_examples")]
    sizes = dict(zip(train.site, train.value.astype(int)))
    assert len(set(sizes.values())) == len(sizes) == 3, "the slow site is picked by its size"
    slow = max(sizes, key=sizes.get)
    plan = flip_lab.Plan.from_file(PLANS / "fault_plan.py")

    # Slow in round 2, once every site's worker is warm, so that only the straggler can miss the deadline.
    job = fed.submit(plan, rounds=3, min_sites=2, expected_sites=3, round_timeout=60,
                     extra={"straggler_examples": sizes[slow], "straggler_round": 2,
                            "straggler_delay_s": 75}).wait(timeout=900)

    assert job.status == "completed"
    timeouts = [e for e in job.errors if e["type"] == "site_error" and e["kind"] == "timeout"]
    assert (slow, 2, "train") in {(e["site"], e["round"], e["phase"]) for e in timeouts}
    assert all(e["site"] == slow and e["round"] == 2 for e in timeouts)
    replies = {(e["round"], e["phase"], e["site"]) for e in job.events if e["type"] == "reply"}
    assert (2, "train", slow) not in replies, "the late reply to round 2 is never read"
    aggregates = {e["round"]: e for e in job.events if e["type"] == "aggregate" and e["phase"] == "train"}
    assert sorted(aggregates[2]["contributors"]) == sorted(set(sizes) - {slow})
    assert sorted(aggregates[3]["contributors"]) == sorted(sizes), "the straggler is back for round 3"


def test_a_poisoned_update_from_a_real_site_is_rejected_and_the_attacker_named(fed, tiny_plan):
    plan = flip_lab.Plan.from_file(PLANS / "fault_plan.py")
    sizing = fed.submit(plan, rounds=1, expected_sites=3, round_timeout=240).wait(timeout=600)
    train = sizing.history[(sizing.history.phase == "train") & (sizing.history.metric == "num_examples")]
    sizes = dict(zip(train.site, train.value.astype(int)))
    attacker = min(sizes, key=sizes.get)

    job = fed.submit(plan, rounds=2, min_sites=2, expected_sites=3, round_timeout=240,
                     extra={"poison_examples": sizes[attacker]}).wait(timeout=600)

    rejected = [e for e in job.events if e["type"] == "update_rejected"]
    assert {(e["site"], e["round"]) for e in rejected} == {(attacker, 1), (attacker, 2)}
    assert all("norm" in e["reason"] for e in rejected)
    weights = job.final_weights()
    assert all(torch.isfinite(w.float()).all() and w.float().abs().max() < 1e3 for w in weights.values())


def test_a_study_interrupted_by_a_hub_crash_resumes_with_identical_weights(fed, tiny_plan):
    reference = fed.submit(tiny_plan, **SETTINGS).wait(timeout=600)

    job = fed.submit(tiny_plan, **SETTINGS)
    deadline = time.monotonic() + 600
    while not any(e["type"] == "aggregate" and e["phase"] == "evaluate" and e["round"] == 2 for e in job.events):
        assert time.monotonic() < deadline and not job.done, "round 2 never completed"
        time.sleep(0.1)
    fed.kill_hub()
    fed.restart_hub()
    assert all(site["online"] for site in fed.sites()), "every site reconnects to the restarted hub"

    resumed = fed.resume(job.id).wait(timeout=600)

    assert resumed.status == "completed" and job.status == "failed"
    assert any(e["type"] == "job_resumed" and e["round"] >= 2 for e in resumed.events)
    history = resumed.history
    train = history[(history.phase == "train") & (history.site != "aggregate") & (history.metric == "loss")]
    assert sorted(train.groupby("round").size().items()) == [(r, 3) for r in (1, 2, 3, 4)], \
        "every round appears once per site, none twice"
    final, expected = resumed.final_weights(), reference.final_weights()
    assert all(torch.equal(final[k], expected[k]) for k in expected), \
        "the resumed study ends with the weights of the uninterrupted one"
