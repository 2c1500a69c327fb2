"""Faults with real processes: a straggler's late reply, a poisoned update, and the hub killed mid-study and started
again (sites come back, the job resumes from its last released round, and sites under differential privacy count each
round once)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

import flip_lab
from site_kernel.policy import DpRules
from site_kernel.privacy import PrivacyLedger

PLANS = Path(__file__).parent / "plans"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SETTINGS = {
    "rounds": 4,
    "seed": 3,
    "lr": 0.02,
    "batch_size": 16,
    "min_sites": 3,
    "expected_sites": 3,
    "round_timeout": 240,
}


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A federation of its own, its hub's state in a file: these tests kill its hub."""
    with flip_lab.local_federation(3, workdir=tmp_path_factory.mktemp("fed"), scale=0.3, durable=True) as federation:
        yield federation


@pytest.fixture(scope="module")
def sizes(fed):
    """Each site's number of training examples: the drills pick the site that misbehaves by it."""
    sizing = fed.submit(
        flip_lab.Plan.from_file(PLANS / "fault_plan.py"), rounds=1, expected_sites=3, round_timeout=240
    ).wait(timeout=600)
    train = sizing.history[(sizing.history.phase == "train") & (sizing.history.metric == "num_examples")]
    sizes = dict(zip(train.site, train.value.astype(int), strict=True))
    assert len(set(sizes.values())) == len(sizes) == 3, "each site is told apart by its size"
    return sizes


def test_a_stragglers_late_reply_is_ignored_and_it_rejoins_the_next_round(fed, sizes):
    slow = max(sizes, key=sizes.get)
    plan = flip_lab.Plan.from_file(PLANS / "fault_plan.py")

    # Slow in round 2, once every site's worker is warm, so that only the straggler can miss the deadline.
    job = fed.submit(
        plan,
        rounds=3,
        min_sites=2,
        expected_sites=3,
        round_timeout=60,
        extra={"straggler_examples": sizes[slow], "straggler_round": 2, "straggler_delay_s": 75},
    ).wait(timeout=900)

    assert job.status == "completed"
    timeouts = [e for e in job.errors if e["type"] == "site_error" and e["kind"] == "timeout"]
    assert (slow, 2, "train") in {(e["site"], e["round"], e["phase"]) for e in timeouts}
    assert all(e["site"] == slow and e["round"] == 2 for e in timeouts)
    replies = {(e["round"], e["phase"], e["site"]) for e in job.events if e["type"] == "reply"}
    assert (2, "train", slow) not in replies, "the late reply to round 2 is never read"
    aggregates = {e["round"]: e for e in job.events if e["type"] == "aggregate" and e["phase"] == "train"}
    assert sorted(aggregates[2]["contributors"]) == sorted(set(sizes) - {slow})
    assert sorted(aggregates[3]["contributors"]) == sorted(sizes), "the straggler is back for round 3"


def test_a_poisoned_update_from_a_real_site_is_rejected_and_the_attacker_named(fed, sizes):
    plan = flip_lab.Plan.from_file(PLANS / "fault_plan.py")
    attacker = min(sizes, key=sizes.get)

    job = fed.submit(
        plan, rounds=2, min_sites=2, expected_sites=3, round_timeout=240, extra={"poison_examples": sizes[attacker]}
    ).wait(timeout=600)

    rejected = [e for e in job.events if e["type"] == "update_rejected"]
    assert {(e["site"], e["round"]) for e in rejected} == {(attacker, 1), (attacker, 2)}
    assert all("norm" in e["reason"] for e in rejected)
    # completed by the others, and the message says whose data the model never saw, and why
    assert job.status == "completed"
    assert f"site {attacker} contributed to no round: the hub rejected its update" in job.message
    assert not any(f"site {site} contributed" in job.message for site in set(sizes) - {attacker})
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
    assert sorted(train.groupby("round").size().items()) == [(r, 3) for r in (1, 2, 3, 4)], (
        "every round appears once per site, none twice"
    )
    final, expected = resumed.final_weights(), reference.final_weights()
    assert all(torch.equal(final[k], expected[k]) for k in expected), (
        "the resumed study ends with the weights of the uninterrupted one"
    )


def test_a_resumed_study_charges_each_sites_privacy_budget_once_per_round(fed, sizes):
    # Small clip and noise keep BatchNorm's running variance positive; the budget is not what this test is about.
    rules = DpRules(clip_norm=0.01, noise_multiplier=4.0, epsilon_budget=1000.0, delta=1e-5)
    policies = {name: (site_dir / "policy.toml").read_text() for name, site_dir in fed.site_dirs.items()}
    slow = max(sizes, key=sizes.get)
    punctual = sorted(set(sizes) - {slow})
    try:
        for name, site_dir in fed.site_dirs.items():  # the executor reads the policy afresh for every message
            (site_dir / "policy.toml").write_text(
                policies[name]
                + "\n[dp]\n"
                + "".join(
                    f"{k} = {getattr(rules, k)!r}\n"
                    for k in ("clip_norm", "noise_multiplier", "epsilon_budget", "delta")
                )
            )
        ledger = {name: (lambda d=site_dir: PrivacyLedger(d, rules)) for name, site_dir in fed.site_dirs.items()}
        plan = flip_lab.Plan.from_file(PLANS / "fault_plan.py")
        job = fed.submit(
            plan,
            rounds=3,
            min_sites=2,
            expected_sites=3,
            round_timeout=60,
            extra={"straggler_examples": sizes[slow], "straggler_round": 2, "straggler_delay_s": 600},
        )

        # The hub dies while round 2 is in flight: it holds the punctual sites' noised updates and waits for the
        # slow site, which dies too before it replies (so that no reply of the interrupted job is still on its way).
        deadline = time.monotonic() + 600
        while {
            e["site"] for e in job.events if e["type"] == "reply" and e["round"] == 2 and e["phase"] == "train"
        } != set(punctual):
            assert time.monotonic() < deadline and not job.done, "the punctual sites never sent round 2"
            time.sleep(0.1)
        fed.kill_hub()
        assert not any(e["type"] == "aggregate" and e["round"] == 2 for e in job.events), "round 2 was in flight"
        fed.restart_hub()
        fed.kill_site(slow)  # still asleep in round 2: it never replies to the interrupted job
        resumed = fed.resume(job.id).wait(timeout=600)

        assert resumed.status == "completed"
        for name in punctual:
            spent = ledger[name]()
            assert [(j.run_id, j.rounds) for j in spent.per_job()] == [(job.id, 3)], (
                f"{name}: rounds 1-3 of the study counted once each, under the study's first job"
            )
            assert all(spent.has(job.id, r) for r in (1, 2, 3))
            history = resumed.history
            reported = history[(history.metric == "dp_epsilon") & (history.site == name)].set_index("round").value
            assert reported[3] == pytest.approx(spent.spent()), "the researcher sees what the ledger holds"
            audit = [json.loads(line) for line in (fed.site_dirs[name] / "audit.jsonl").read_text().splitlines()]
            assert [(e["round"], e["study"]) for e in audit if e["event"] == "dp_replay"] == [(2, job.id)], (
                f"{name} sends its round-2 update again instead of training and noising it twice"
            )
            assert [e["round"] for e in audit if e["event"] == "dp_spend"] == [1, 2, 3]
        assert ledger[slow]().rounds_of(job.id) == 1, "the slow site released round 1 only"
    finally:
        for name, site_dir in fed.site_dirs.items():
            (site_dir / "policy.toml").write_text(policies[name])
