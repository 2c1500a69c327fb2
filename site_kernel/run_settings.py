"""A study's run settings: what an approved plan is run with, recorded, compared and bounded.

The approval hash covers the plan (source, data contract, model shapes). The same plan can be run
with other rounds, strategy, seed, config values (which the plan may branch on), initial weights or
name; those are the run settings. The site records each study's settings and the SHA-256 of its
initial weights in the audit log, shows them in ``flip-site plans show``, bounds them by policy
(``max_rounds``, ``[allowed_config]``) and, with ``reapprove_on_settings_change`` or
``initial_weights = "approved"``, holds a study whose settings the data owner has not approved.

Example::

    settings = run_settings(spec, run_config.get("flip-init-weights", ""))
    problem = policy_problem(settings, policy)         # None, or why the study is refused
    print(changes(approved_settings, settings))       # ["rounds 3 -> 50"]
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from flip_common.protocol import RunSettings

from .policy import SitePolicy

# Settings that change when a study waits or gives up, never what it computes on the site's data.
_NOT_SETTINGS = frozenset({"round_timeout", "approval_timeout", "connect_timeout", "expected_sites"})
# FLIP's standard training keys (flip_lab.config.train_config): [allowed_config] bounds them only
# when it lists them; any other key is the researcher's own and must be listed.
STANDARD_KEYS = frozenset({"rounds", "local_epochs", "lr", "batch_size", "seed", "proximal_mu"})


def run_settings(spec: Mapping[str, Any], init_weights_b64: str) -> RunSettings:
    """One study's settings as plain JSON: name, config, train config, initial-weights hash."""
    try:
        weights = base64.b64decode(str(init_weights_b64), validate=True)
    except (binascii.Error, ValueError):
        weights = str(init_weights_b64).encode()  # hashed as sent: still distinct, still recorded
    config = spec.get("config") or {}
    return {
        "name": str(spec.get("name", "")),
        "config": {k: v for k, v in sorted(config.items()) if k not in _NOT_SETTINGS},
        "train_config": dict(sorted((spec.get("train_config") or {}).items())),
        "init_weights": hashlib.sha256(weights).hexdigest(),
    }


def settings_hash(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings' canonical JSON: two studies with equal settings share it."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(b"flip-settings-v1\n" + text.encode()).hexdigest()


def rounds_of(settings: dict[str, Any]) -> int:
    value = settings["config"].get("rounds", settings["train_config"].get("rounds", 0))
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def policy_problem(settings: dict[str, Any], policy: SitePolicy) -> str | None:
    """Why the policy refuses these settings, or ``None``. The text names keys and bounds only."""
    rounds = rounds_of(settings)
    if rounds > policy.max_rounds:
        return f"the study asks for {rounds} rounds; this site's policy allows at most {policy.max_rounds}"
    if not policy.allowed_config:
        return None
    for key, value in settings["train_config"].items():
        bound = policy.allowed_config.get(key)
        if bound is None:
            if key in STANDARD_KEYS:
                continue
            return f"config key {key!r} is not among this site's allowed_config keys"
        if "values" in bound:
            if not any(_same(value, allowed) for allowed in bound["values"]):
                return f"config {key!r} must be one of {bound['values']}"
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"config {key!r} must be a number within {_range(bound)}"
        if value < bound.get("min", value) or value > bound.get("max", value):
            return f"config {key!r} = {value} is outside this site's allowed range {_range(bound)}"
    return None


def changes(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> list[str]:
    """What differs between two settings, e.g. ``["rounds 3 -> 50"]``, at most ``limit`` items."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) != b.get(key):
            before, after = _brief(a.get(key)), _brief(b.get(key))
            out.append(f"{key.removeprefix('config.').replace('init_weights', 'initial weights')} {before} -> {after}")
    # A config key appears under config and train_config alike: say it once.
    seen, unique = set(), []
    for line in out:
        key = line.removeprefix("train_config.")
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return unique[:limit] + ([f"and {len(unique) - limit} more"] if len(unique) > limit else [])


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if prefix == "config." and key == "extra":
            continue  # its keys are in train_config, where the plan reads them
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _brief(value: Any) -> str:
    if value is None:
        return "(none)"
    text = json.dumps(value, sort_keys=True)
    if isinstance(value, str) and len(value) == 64:
        return value[:12]  # a hash
    return text if len(text) <= 40 else text[:37] + "..."


def _same(value: Any, allowed: Any) -> bool:
    return (type(value) is type(allowed) and value == allowed) or (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and isinstance(allowed, (int, float))
        and not isinstance(allowed, bool)
        and value == allowed
    )


def _range(bound: dict[str, Any]) -> str:
    return f"[{bound.get('min', '-inf')}, {bound.get('max', 'inf')}]"
