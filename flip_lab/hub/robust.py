"""Screening of model updates before any aggregation.

Flower's aggregators average whatever arrives: one NaN poisons the model and a site's self-reported example
count is trusted as sent. ``screen_updates`` runs before every FLIP strategy and rejects, by site and with a reason:
non-finite values, missing/extra keys or changed shapes, and updates whose distance from the released model is far
above the others' (leave-one-out median, so two sites can still be compared). It also caps the weight a site's
reported example count can carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RobustConfig:
    """``norm_factor``: reject an update whose distance from the released model exceeds this multiple of the
    median distance of the other sites' updates (``None`` disables). ``weight_cap_factor``: a site's example count
    counts at most this multiple of the median reported count (``None`` disables)."""

    norm_factor: float | None = 5.0
    weight_cap_factor: float | None = 3.0

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> RobustConfig:
        def opt(key: str, default: float | None) -> float | None:
            v = values.get(key, default)
            return None if v is None else float(v)  # type: ignore[arg-type]

        return cls(norm_factor=opt("norm_factor", 5.0), weight_cap_factor=opt("weight_cap_factor", 3.0))


@dataclass
class Verdict:
    accepted: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


def _structure_problem(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    missing = sorted(set(reference) - set(arrays))
    extra = sorted(set(arrays) - set(reference))
    if missing or extra:
        return f"keys differ from the model sent (missing {missing[:3]}, extra {extra[:3]})"
    for key, ref in reference.items():
        if tuple(arrays[key].shape) != tuple(ref.shape):
            return f"array {key!r} has shape {tuple(arrays[key].shape)}, the model sent has {tuple(ref.shape)}"
    for key, value in arrays.items():
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return f"array {key!r} holds non-finite values (NaN or Inf)"
    return None


def update_distance(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    total = 0.0
    for key, ref in reference.items():
        if ref.dtype.kind != "f":
            continue
        diff = arrays[key].astype(np.float64) - ref.astype(np.float64)
        total += float(np.dot(diff.ravel(), diff.ravel()))
    return math.sqrt(total)


def screen_updates(
    updates: dict[str, tuple[dict[str, np.ndarray], float]],
    reference: dict[str, np.ndarray],
    config: RobustConfig,
) -> Verdict:
    """Split ``{site: (arrays, reported_examples)}`` into accepted and rejected sites; see the module docstring."""
    verdict = Verdict()
    candidates: dict[str, float] = {}
    for site, (arrays, n) in updates.items():
        problem = _structure_problem(arrays, reference)
        if problem is None and not (math.isfinite(n) and n > 0):
            problem = f"reported example count {n!r} is not a positive number"
        if problem:
            verdict.rejected[site] = problem
        else:
            candidates[site] = update_distance(arrays, reference)
    if config.norm_factor is not None and len(candidates) >= 2:
        for site, dist in candidates.items():
            others = [d for s, d in candidates.items() if s != site]
            bound = config.norm_factor * max(float(np.median(others)), 1e-8)
            if dist > bound:
                verdict.rejected[site] = (
                    f"update norm {dist:.3g} is {dist / max(float(np.median(others)), 1e-8):.0f}x the median "
                    f"of the other sites (bound: {config.norm_factor:g}x)"
                )
    accepted = [s for s in candidates if s not in verdict.rejected]
    counts = {s: float(updates[s][1]) for s in accepted}
    cap = None
    if config.weight_cap_factor is not None and len(counts) >= 2:
        cap = config.weight_cap_factor * float(np.median(list(counts.values())))
    for site in accepted:
        verdict.accepted.add(site)
        verdict.weights[site] = min(counts[site], cap) if cap is not None else counts[site]
    return verdict
