"""The hash a data owner approves: one function, computed the same way by the lab, the hub and every site.

The hash covers the plan's source text, its data contract and its declared model shapes, so changing one character
of any of them makes a new plan that waits for a new approval (:mod:`site_kernel.approvals`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import FlipError

_DOMAIN = b"flip-plan-v1\n"  # keeps plan hashes apart from any other SHA-256 of JSON


class PlanHashError(FlipError, ValueError):
    """A plan cannot be hashed: its contract is not plain JSON, its text not Unicode, or a shape not integers."""


def plan_hash(source: str, contract: dict[str, Any], model_shapes: dict[str, list[int]]) -> str:
    """SHA-256 (hex) over the canonical JSON of the plan's source, data contract and model shapes.

    Canonical means sorted keys and no whitespace, so dict order never matters while any change of
    content does. Numbers hash as JSON writes them (``1`` and ``1.0`` differ), so hash what was
    sent, as sent.
    """
    body = {"source": source, "contract": contract, "model_shapes": model_shapes_of(model_shapes)}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise PlanHashError(f"a plan's data contract must be plain, finite JSON ({err})") from err
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate: no file can hold it as sent
        raise PlanHashError(
            f"a plan must be valid Unicode text; it holds an unpaired surrogate at {err.start}"
        ) from err
    return hashlib.sha256(_DOMAIN + data).hexdigest()


def model_shapes_of(model_shapes: dict[str, Any]) -> dict[str, list[int]]:
    """``model_shapes`` as plain lists of non-negative integers, or :class:`PlanHashError` naming the weight."""
    out: dict[str, list[int]] = {}
    for name, shape in model_shapes.items():
        dims = list(shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
            raise PlanHashError(f"model shape of {name!r} must be a list of non-negative integers")
        out[str(name)] = dims
    return out
