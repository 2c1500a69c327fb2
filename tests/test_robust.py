"""Update screening before aggregation: a poisoned-update battery against five honest sites."""

from __future__ import annotations

import numpy as np
import pytest

from flip_lab.hub.robust import RobustConfig, screen_updates

RNG = np.random.default_rng(0)
REFERENCE = {
    "w": RNG.normal(size=(8, 4)).astype(np.float32),
    "b": np.zeros(4, np.float32),
    "steps": np.array(3, np.int64),
}


def honest(i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i + 1)
    return {
        "w": REFERENCE["w"] + rng.normal(scale=0.01, size=(8, 4)).astype(np.float32),
        "b": REFERENCE["b"] + rng.normal(scale=0.01, size=4).astype(np.float32),
        "steps": np.array(4),
    }


def aggregate(updates, verdict):
    total = sum(verdict.weights.values())
    return {
        k: sum(updates[s][0][k].astype(np.float64) * verdict.weights[s] / total for s in verdict.accepted)
        for k in ("w", "b")
    }


def attack(kind: str) -> tuple[dict[str, np.ndarray], float]:
    base = honest(99)
    if kind == "nan":
        base["w"] = base["w"].copy()
        base["w"][0, 0] = np.nan
    elif kind == "inf":
        base["b"] = np.full(4, np.inf, np.float32)
    elif kind == "scaled":
        base = {**base, "w": base["w"] * 1e6}
    elif kind == "sign_flipped":
        base = {**base, "w": REFERENCE["w"] - 10 * (base["w"] - REFERENCE["w"])}
    elif kind == "wrong_shape":
        base = {**base, "w": np.zeros((4, 8), np.float32)}
    elif kind == "extra_key":
        base = {**base, "exfil": np.ones(3, np.float32)}
    return base, (1e9 if kind == "inflated_count" else 100.0)


@pytest.mark.parametrize("kind", ["nan", "inf", "scaled", "sign_flipped", "wrong_shape", "extra_key", "inflated_count"])
def test_attacker_is_named_and_the_model_stays_near_the_honest_result(kind):
    updates = {f"honest-{i}": (honest(i), 100.0) for i in range(5)}
    updates["attacker"] = attack(kind)
    verdict = screen_updates(updates, REFERENCE, RobustConfig())
    honest_only = screen_updates({k: v for k, v in updates.items() if k != "attacker"}, REFERENCE, RobustConfig())
    result, expected = aggregate(updates, verdict), aggregate(updates, honest_only)
    assert all(np.isfinite(v).all() for v in result.values())
    if kind == "inflated_count":
        assert verdict.weights["attacker"] <= 3 * 100.0  # capped at 3x the median reported count
        assert np.abs(result["w"] - expected["w"]).max() < 0.02
    else:
        assert "attacker" in verdict.rejected, verdict.rejected
        assert verdict.accepted == {f"honest-{i}" for i in range(5)}
        np.testing.assert_allclose(result["w"], expected["w"])


def test_rejection_reasons_name_the_problem_without_values():
    updates = {"a": (honest(0), 10.0), "b": (honest(1), 10.0), "c": attack("nan")}
    verdict = screen_updates(updates, REFERENCE, RobustConfig())
    assert "non-finite" in verdict.rejected["c"]


def test_norm_check_can_be_disabled():
    updates = {"a": (honest(0), 10.0), "b": (honest(1), 10.0), "c": attack("scaled")}
    verdict = screen_updates(updates, REFERENCE, RobustConfig(norm_factor=None))
    assert "c" in verdict.accepted
