"""Differential privacy enforced by the site: the ledger against Flower's accountant, the mechanism, the policy,
the egress of site-owned metrics, the `flip-site privacy` command, and one study end to end."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from site_kernel.egress import check_reply
from site_kernel.errors import PolicyError
from site_kernel.governance_cli import add_governance_commands
from site_kernel.policy import (
    DpRules,
    Limits,
    MetricRules,
    SitePolicy,
    load_policy,
    write_default_policy,
)
from site_kernel.privacy import (
    PrivacyLedger,
    PrivacyLedgerError,
    Release,
    clip_update,
    privatize,
    weights_digest,
)

PLANS = Path(__file__).parent / "plans"
RULES = DpRules(clip_norm=1.0, noise_multiplier=4.0, epsilon_budget=8.0, delta=1e-5)


def flower_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Flower's own accountant, composed by hand: the sensitivity between any two datasets is twice the clip."""
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    accountant.compose(GaussianPrivacyEvent(noise_multiplier / 2, sample_size=1, population_size=1), releases)
    return accountant.get_epsilon(delta)


def record_rounds(ledger: PrivacyLedger, run_id: int, rounds: int) -> None:
    for r in range(1, rounds + 1):
        assert ledger.record(run_id, r, plan="abc")


# -- the ledger --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("noise", "rounds"), [(4.0, 1), (4.0, 3), (1.5, 2), (8.0, 10)])
def test_ledger_epsilon_is_flowers_rdp_epsilon_for_the_configured_noise(tmp_path, noise, rounds):
    rules = DpRules(clip_norm=0.5, noise_multiplier=noise, epsilon_budget=1000.0, delta=1e-6)
    ledger = PrivacyLedger(tmp_path, rules)
    assert ledger.spent() == 0.0
    record_rounds(ledger, run_id=11, rounds=rounds)
    assert ledger.spent() == pytest.approx(flower_epsilon(noise, rounds, 1e-6), rel=1e-12)


def test_the_spend_survives_a_restart(tmp_path):
    record_rounds(PrivacyLedger(tmp_path, RULES), run_id=5, rounds=2)
    before = PrivacyLedger(tmp_path, RULES).spent()
    reloaded = PrivacyLedger(tmp_path, RULES)  # a new process would read exactly this file
    assert reloaded.spent() == before == pytest.approx(flower_epsilon(4.0, 2, 1e-5))
    assert [(j.run_id, j.rounds) for j in reloaded.per_job()] == [(5, 2)]


def test_recording_a_round_twice_counts_it_once(tmp_path):
    ledger = PrivacyLedger(tmp_path, RULES)
    assert ledger.record(3, 1) is True
    once = ledger.spent()
    assert ledger.record(3, 1) is False
    assert PrivacyLedger(tmp_path, RULES).record(3, 1) is False
    assert PrivacyLedger(tmp_path, RULES).spent() == once and ledger.rounds_of(3) == 1
    assert ledger.record(4, 1) is True  # the same round of another job is another release
    assert ledger.spent() > once


def test_a_released_round_is_sent_again_only_for_the_weights_it_was_trained_from(tmp_path):
    rng = np.random.default_rng(0)
    sent = {"w": rng.normal(size=(3, 4)).astype(np.float32), "n": np.array(7, dtype=np.int64)}
    noised = {"w": sent["w"] + 0.5, "n": sent["n"]}
    ledger = PrivacyLedger(tmp_path, RULES)
    assert ledger.released(9, 2, weights_digest(sent)) is None, "nothing released yet"
    assert ledger.record(9, 2, plan="abc", release=Release(noised, {"loss": 0.25}, 40, weights_digest(sent)))

    again = PrivacyLedger(tmp_path, RULES).released(9, 2, weights_digest(sent))  # as after a site restart
    assert again is not None and again.metrics == {"loss": 0.25} and again.num_examples == 40
    assert set(again.arrays) == {"w", "n"} and np.array_equal(again.arrays["w"], noised["w"])
    assert again.arrays["n"].dtype == np.int64 and again.arrays["n"].shape == ()
    other = {"w": sent["w"].copy(), "n": sent["n"]}
    other["w"][0, 0] += 1e-6
    assert ledger.released(9, 2, weights_digest(other)) is None, "other weights: never the old update"
    assert ledger.released(9, 3, weights_digest(sent)) is None and ledger.released(8, 2, weights_digest(sent)) is None

    # A second reply to the same round is not recorded and does not replace what left first.
    assert not ledger.record(9, 2, release=Release({"w": sent["w"] - 9, "n": sent["n"]}, {}, 1, weights_digest(sent)))
    assert np.array_equal(ledger.released(9, 2, weights_digest(sent)).arrays["w"], noised["w"])
    assert ledger.rounds_of(9) == 1


def test_only_the_last_two_rounds_of_a_study_are_kept(tmp_path):
    ledger = PrivacyLedger(tmp_path, RULES)
    sent = {"w": np.zeros(2, dtype=np.float32)}
    for study in (4, 5):
        for r in (1, 2, 3):
            ledger.record(study, r, release=Release(sent, {}, 1, weights_digest(sent)))
    kept = sorted(p.name for p in (tmp_path / "privacy" / "released").iterdir())
    assert kept == ["4-2.safetensors", "4-3.safetensors", "5-2.safetensors", "5-3.safetensors"]
    assert ledger.released(4, 1, weights_digest(sent)) is None and ledger.has(4, 1), "counted, no longer kept"


def test_refusal_happens_exactly_at_the_budget(tmp_path):
    at_three = PrivacyLedger(tmp_path, RULES).epsilon_after(3)
    ledger = PrivacyLedger(tmp_path, DpRules(1.0, 4.0, epsilon_budget=at_three, delta=1e-5))
    assert not ledger.would_exceed(3) and ledger.would_exceed(4)
    assert ledger.rounds_that_fit(100) == 3
    record_rounds(ledger, run_id=1, rounds=3)
    assert ledger.spent() == at_three and ledger.remaining() == 0.0
    assert ledger.would_exceed(1) and not ledger.would_exceed(0)


@pytest.mark.parametrize("text", ["{not json", '{"version": 1, "releases": [{"run_id": 1}]}', '{"version": 9}'])
def test_a_damaged_ledger_is_refused_and_never_reset(tmp_path, text):
    ledger = PrivacyLedger(tmp_path, RULES)
    record_rounds(ledger, run_id=1, rounds=1)
    path = tmp_path / "privacy" / "ledger.json"
    path.write_text(text)
    with pytest.raises(PrivacyLedgerError, match="never delete it"):
        PrivacyLedger(tmp_path, RULES)
    with pytest.raises(PrivacyLedgerError, match="never delete it"):
        ledger.record(2, 1)  # a ledger loaded before the damage re-reads the file before it writes
    assert path.read_text() == text


def test_a_deleted_ledger_is_noticed(tmp_path):
    record_rounds(PrivacyLedger(tmp_path, RULES), run_id=1, rounds=1)
    (tmp_path / "privacy" / "ledger.json").unlink()
    with pytest.raises(PrivacyLedgerError, match="missing although this site has spent epsilon"):
        PrivacyLedger(tmp_path, RULES)


# -- the mechanism -----------------------------------------------------------------------------------------------
def model(rng, scale=1.0):
    return {
        "w": (rng.normal(size=(30, 20)) * scale).astype(np.float32),
        "b": (rng.normal(size=20) * scale).astype(np.float32),
        "steps": np.array(7, np.int64),
    }


@pytest.mark.parametrize(("length", "clip"), [(50.0, 1.5), (0.5, 1.5), (3.0, 3.0)])
def test_the_update_is_clipped_jointly_to_the_bound(length, clip):
    rng = np.random.default_rng(1)
    sent, direction = model(rng), model(rng)
    unit = math.sqrt(sum(float(np.sum(direction[k].astype(np.float64) ** 2)) for k in ("w", "b")))
    trained = {
        k: (sent[k] + direction[k] * (length / unit)).astype(np.float32) if k != "steps" else np.array(99, np.int64)
        for k in sent
    }
    update, norm = clip_update(sent, trained, clip)
    assert set(update) == {"w", "b"} and norm == pytest.approx(length, rel=1e-5)
    clipped = math.sqrt(sum(float(np.sum(u**2)) for u in update.values()))
    assert clipped == pytest.approx(min(length, clip), rel=1e-5)
    raw = np.concatenate([(trained[k].astype(np.float64) - sent[k]).ravel() for k in ("w", "b")])
    flat = np.concatenate([update[k].ravel() for k in ("w", "b")])
    assert np.allclose(flat * (norm / clipped), raw, atol=1e-5)  # scaled, never turned


def test_noise_has_the_policy_std_and_integer_buffers_go_back_as_received():
    rules = DpRules(clip_norm=0.2, noise_multiplier=3.0, epsilon_budget=10.0, delta=1e-5)
    sent = {"w": np.full((200, 200), 0.5, np.float32), "steps": np.array(7, np.int64)}
    trained = {"w": sent["w"].copy(), "steps": np.array(123, np.int64)}  # no update: what leaves is pure noise
    out, clipped = privatize(sent, trained, rules, np.random.default_rng(0))
    noise = out["w"].astype(np.float64) - 0.5
    assert out["w"].dtype == np.float32 and not clipped
    assert noise.std() == pytest.approx(rules.noise_std, rel=0.02)
    assert abs(noise.mean()) < 4 * rules.noise_std / 200
    assert out["steps"] == 7


def test_arrays_that_are_not_the_model_sent_are_left_for_egress_to_refuse():
    sent = {"w": np.zeros((2, 3), np.float32)}
    odd = {"w": np.ones((3, 2), np.float32), "extra": np.ones(2, np.float32)}
    out, _ = privatize(sent, odd, RULES, np.random.default_rng(0))
    assert np.array_equal(out["w"], odd["w"]) and "extra" in out


# -- the policy --------------------------------------------------------------------------------------------------
def write_policy(site, dp_text):
    write_default_policy(site, demo=True)
    with open(site / "policy.toml", "a") as fh:
        fh.write("\n[dp]\n" + dp_text)


def test_the_dp_section_is_loaded(tmp_path):
    write_policy(tmp_path, "clip_norm = 1\nnoise_multiplier = 4.0\nepsilon_budget = 8.0\ndelta = 1e-5\n")
    assert load_policy(tmp_path).dp == RULES
    assert RULES.noise_std == 4.0


GOOD = {"clip_norm": "1.0", "noise_multiplier": "4.0", "epsilon_budget": "8.0", "delta": "1e-5"}


@pytest.mark.parametrize(
    ("change", "key", "expected"),
    [
        ({"clip_norm": None}, "dp.clip_norm", "needs `dp.clip_norm` too"),
        ({"noise": "1.0"}, "dp.noise", "unknown key `dp.noise`"),
        ({"clip_norm": "0"}, "dp.clip_norm", "must be a positive finite number, got 0"),
        ({"noise_multiplier": "-1.0"}, "dp.noise_multiplier", "must be a positive finite number"),
        ({"epsilon_budget": "inf"}, "dp.epsilon_budget", "must be a positive finite number"),
        ({"epsilon_budget": "true"}, "dp.epsilon_budget", "got True"),
        ({"delta": "1.0"}, "dp.delta", "strictly between 0 and 1"),
        ({"delta": '"small"'}, "dp.delta", "positive finite number, got 'small'"),
    ],
)
def test_bad_dp_values_name_the_key(tmp_path, change, key, expected):
    values = {**GOOD, **change}
    write_policy(tmp_path, "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None))
    with pytest.raises(PolicyError, match=expected) as info:
        load_policy(tmp_path)
    assert info.value.key == key


# -- egress of the site's own metrics ----------------------------------------------------------------------------
POLICY = SitePolicy(
    demo=False,
    approval="manual",
    allowed_strategies=("fedavg",),
    min_cohort=1,
    metrics=MetricRules(allow=("loss",), max_count=1),
    limits=Limits(),
    accept_weaker_isolation=False,
    dp=RULES,
)


def egress(metrics, site_metrics):
    return check_reply(
        sent_shapes={},
        sent_dtypes={},
        reply_arrays=None,
        metrics=metrics,
        num_examples=5,
        policy=POLICY,
        site_metrics=site_metrics,
    )


def test_site_metrics_leave_beside_a_full_plan_allowlist():
    decision = egress({"loss": 0.5}, {"dp_epsilon": 2.5, "dp_clip_norm": 1.0})
    assert decision.allowed and decision.metrics == {"loss": 0.5, "dp_epsilon": 2.5, "dp_clip_norm": 1.0}


@pytest.mark.parametrize("name", ["dp_epsilon", "dp_clip_norm"])
def test_a_plan_may_not_pose_as_the_site(name):
    decision = egress({name: 0.0}, {})
    assert not decision.allowed and f"`{name}` is reserved for the site" in decision.reason


# -- the data owner's command ------------------------------------------------------------------------------------
def test_flip_site_privacy_shows_budget_spent_remaining_and_jobs(tmp_path, capsys):
    write_policy(tmp_path, "clip_norm = 1.0\nnoise_multiplier = 4.0\nepsilon_budget = 8.0\ndelta = 1e-5\n")
    ledger = PrivacyLedger(tmp_path, RULES)
    record_rounds(ledger, run_id=41, rounds=2)
    record_rounds(ledger, run_id=42, rounds=1)
    parser = argparse.ArgumentParser()
    add_governance_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["privacy", "--site", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    spent = ledger.spent()
    assert f"spent      {spent:.4g} (3 updates released)" in out
    assert f"remaining  {8.0 - spent:.4g}" in out and "budget     8" in out
    assert f"{'41':>20}  {'2':>6}  {flower_epsilon(4.0, 2, 1e-5):.4g}" in out


# -- end to end: real hub, real site kernels -----------------------------------------------------------------------
@pytest.mark.e2e
def test_a_study_spends_the_sites_budget_and_the_next_one_is_refused(tmp_path):
    import flip_lab

    # Small clip and noise keep BatchNorm's running variance positive; budget: 2 rounds fit (3.19), 3 do not (4.01).
    rules = DpRules(clip_norm=0.01, noise_multiplier=4.0, epsilon_budget=3.5, delta=1e-5)
    fed = flip_lab.local_federation(2, workdir=tmp_path / "fed", scale=0.1)
    try:
        for site_dir in fed.site_dirs.values():  # the executor reads the policy afresh for every message
            policy = (site_dir / "policy.toml").read_text().replace("min_cohort = 10", "min_cohort = 1")
            policy += "\n[dp]\n" + "".join(f"{k} = {getattr(rules, k)!r}\n" for k in GOOD)
            (site_dir / "policy.toml").write_text(policy)  # a tiny demo cohort: this test is about [dp]
        plan = flip_lab.Plan.from_file(PLANS / "tiny_plan.py")
        job = fed.submit(plan, rounds=2, min_sites=2, expected_sites=2, round_timeout=240)
        job.wait(timeout=600)
        history = job.history
        spent = history[(history.metric == "dp_epsilon") & (history.site != "aggregate")]
        assert set(spent.site) == set(fed.site_dirs) and len(spent) == 4
        for name, site_dir in fed.site_dirs.items():
            ledger = PrivacyLedger(site_dir, rules)  # read afresh from the site's folder, as after a restart
            per_round = spent[spent.site == name].set_index("round").value
            assert per_round[2] == pytest.approx(ledger.spent()) == pytest.approx(flower_epsilon(4.0, 2, 1e-5))
            assert per_round[1] == pytest.approx(flower_epsilon(4.0, 1, 1e-5))
            assert [(j.run_id, j.rounds) for j in ledger.per_job()] == [(job.id, 2)]
            audit = [json.loads(line) for line in (site_dir / "audit.jsonl").read_text().splitlines()]
            assert [e["round"] for e in audit if e["event"] == "dp_spend"] == [1, 2]

        again = fed.submit(plan, rounds=1, min_sites=2, expected_sites=2, round_timeout=240)
        again.wait(timeout=300, raise_on_failure=False)
        assert again.status == "failed"
        for name in fed.site_dirs:
            assert (
                f"site {name}: this study's 1 round(s) would take its privacy spend to epsilon 4.01 "
                "(budget 3.5, already spent 3.19; 0 round(s) would fit)" in again.message
            )
        failed = [e for e in again.events if e.get("type") == "site_state" and e.get("state") == "failed"]
        assert {e["site"] for e in failed} == set(fed.site_dirs)
        assert all("ask the data owner or run fewer rounds" in e["detail"] for e in failed)
        assert all(PrivacyLedger(d, rules).rounds_of(again.id) == 0 for d in fed.site_dirs.values())
    finally:
        fed.shutdown()
