"""The executor's two gates, each handed one request record: the site's [dp] (privacy_gate) and its bound under
secure aggregation (secagg_gate). The studies that pass through them end to end are in test_privacy and test_secagg."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from site_kernel.audit import AuditLog
from site_kernel.policy import DpRules
from site_kernel.privacy_gate import PrivacyGate
from site_kernel.request import Refusal, Request
from site_kernel.secagg_gate import SecAggGate

RULES = DpRules(clip_norm=1.0, noise_multiplier=4.0, epsilon_budget=8.0, delta=1e-5)
SHAPES = {"w": [2, 2]}


def _request(*, dp=None, bound=None, secure=False, round_=1, rounds=3, arrays=None, records=None) -> Request:
    message = SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=7), content=SimpleNamespace(config_records=records or {})
    )
    return Request(
        message=message,  # type: ignore[arg-type]
        op="train",
        run_id=5,
        study=5,
        site="alpha",
        policy=SimpleNamespace(dp=dp, secagg_max_update_norm=bound),  # type: ignore[arg-type]
        source="",
        spec={"config": {"rounds": rounds, "secure_aggregation": secure}, "model_shapes": SHAPES},
        digest="d" * 64,
        config={"server-round": round_},
        arrays=arrays if arrays is not None else {"w": np.zeros((2, 2), np.float32)},
    )


def _events(audit: AuditLog) -> list[str]:
    return [entry["event"] for entry in audit.entries()]


# -- privacy ---------------------------------------------------------------------------------------------------------
def test_without_dp_the_privacy_gate_lets_everything_through(tmp_path):
    gate = PrivacyGate(tmp_path, AuditLog(tmp_path / "audit.jsonl"))
    assert gate.refusal_at_hello(_request()) is None
    assert gate.before_train(_request()) is None


def test_a_study_beyond_the_budget_is_refused_at_hello_with_what_would_fit(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    reason = PrivacyGate(tmp_path, audit).refusal_at_hello(_request(dp=RULES, rounds=500))
    assert reason is not None and reason.startswith("site alpha: this study's 500 round(s)") and "would fit" in reason
    assert _events(audit) == ["dp_refused"]


def test_a_released_round_leaves_again_at_no_cost_only_from_the_same_weights(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    gate = PrivacyGate(tmp_path, audit)
    request = _request(dp=RULES)
    charge = gate.before_train(request)
    assert charge is not None and charge.again is None
    trained = gate.privatize(charge, request, {"w": np.ones((2, 2), np.float32)})
    gate.record(charge, request, trained, {"loss": 1.0}, 10)
    spent = charge.ledger.spent()

    again = gate.before_train(request)
    assert again is not None and again.again is not None
    assert np.array_equal(gate.privatize(again, request, again.again.arrays)["w"], trained["w"])
    gate.record(again, request, trained, {}, 10)  # paid for when first released
    assert again.ledger.spent() == spent and again.site_metrics()["dp_epsilon"] == spent

    other = _request(dp=RULES, arrays={"w": np.full((2, 2), 3.0, np.float32)})
    with pytest.raises(Refusal) as refused:
        gate.before_train(other)
    assert refused.value.kind == "dp_repeat"
    assert _events(audit) == ["dp_spend", "dp_replay"]


def test_a_second_reply_to_a_round_recorded_meanwhile_does_not_leave(tmp_path):
    gate = PrivacyGate(tmp_path, AuditLog(tmp_path / "audit.jsonl"))
    request = _request(dp=RULES)
    first, second = gate.before_train(request), gate.before_train(request)
    gate.record(first, request, gate.privatize(first, request, {"w": np.ones((2, 2))}), {}, 1)
    with pytest.raises(Refusal) as refused:
        gate.record(second, request, gate.privatize(second, request, {"w": np.ones((2, 2))}), {}, 1)
    assert refused.value.kind == "dp_repeat"


# -- secure aggregation ----------------------------------------------------------------------------------------------
def test_a_site_without_a_bound_refuses_a_secure_study_at_hello_and_others_pass(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    gate = SecAggGate(audit)
    reason = gate.refusal_at_hello(_request(secure=True))
    assert reason is not None and "no update bound for secure aggregation" in reason
    assert gate.refusal_at_hello(_request(secure=False)) is None
    assert gate.refusal_at_hello(_request(secure=True, bound=2.0)) is None
    assert gate.refusal_at_hello(_request(secure=True, dp=RULES)) is None  # [dp]'s clip sets it
    assert _events(audit) == ["secagg_refused"]


def test_key_queries_of_a_study_without_secure_aggregation_are_refused(tmp_path):
    with pytest.raises(Refusal, match="does not use secure aggregation"):
        SecAggGate(AuditLog(tmp_path / "audit.jsonl")).answer(_request(secure=False))


def test_an_update_is_bounded_but_never_masked_without_a_key_setup(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    gate = SecAggGate(audit)
    request = _request(secure=True, bound=1.0)
    _arrays, update = gate.bound(request, {"w": np.full((2, 2), 5.0, np.float32)})
    assert np.linalg.norm(update["w"]) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(Refusal, match="no secure-aggregation key setup for round 1; nothing was sent"):
        gate.mask(request, update, 10)
    assert _events(audit) == ["secagg_bound"]


def test_a_run_s_key_state_is_kept_until_the_run_is_forgotten(tmp_path):
    gate = SecAggGate(AuditLog(tmp_path / "audit.jsonl"))
    setup = {"config": {"op": "secagg_keys", "server-round": 1}, "secagg": {"sites": "7,8", "threshold": 2}}
    request = _request(secure=True, bound=1.0, records=setup)
    keys = gate.answer(request)
    assert {"mask_pk", "enc_pk"} <= keys.keys() and keys["bound"] == 1.0
    gate.forget(5)  # its worker stopped: a later train reply finds no key setup
    with pytest.raises(Refusal, match="no secure-aggregation key setup"):
        gate.mask(request, {"w": np.zeros((2, 2))}, 1)
