"""A study's settings (the run config): every key, its type, its default and what it means, in one table.

These are the researcher's settings. Site settings (data paths, policy) never appear here: only site code resolves
those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Key:
    type: type | tuple[type, ...]
    default: Any
    help: str
    min: float | None = None


SCHEMA: dict[str, Key] = {
    "rounds": Key(int, 3, "federated rounds to run", 1),
    "strategy": Key(str, "fedavg", "aggregation strategy: fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg, krum"),
    "local_epochs": Key(int, 2, "passes over the local training data per round", 1),
    "lr": Key(float, 1e-3, "learning rate handed to train()", 0.0),
    "batch_size": Key(int, 16, "mini-batch size handed to train()", 1),
    "seed": Key(int, 0, "seed for model initialisation and every site's training"),
    "proximal_mu": Key(float, 0.0, "FedProx proximal term weight (used when strategy is fedprox)", 0.0),
    "min_sites": Key(int, 2, "a round with fewer accepted contributors is discarded, never released", 1),
    "round_timeout": Key(float, 300.0, "seconds to wait for the sites' replies in one phase of one round", 1.0),
    "approval_timeout": Key(float, 600.0, "seconds to wait for data owners to approve the plan", 0.0),
    "connect_timeout": Key(float, 30.0, "seconds to wait for sites to connect to the hub", 0.0),
    "expected_sites": Key(int, 0, "sites to wait for before starting (0: min_sites)", 0),
    "strategy_options": Key(dict, {}, "extra keyword arguments for the strategy class"),
    "robust": Key(dict, {}, "update screening: norm_factor (default 5), weight_cap_factor (default 3)"),
    "secure_aggregation": Key(
        bool,
        False,
        "the hub sees only the sum of the sites' masked updates (fedavg and fedprox only; the sites "
        "bound their own updates, the hub screens none)",
    ),
    "extra": Key(dict, {}, "any further plain values handed to train()/evaluate() in their config"),
}

BUILTIN_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
SUM_STRATEGIES = ("fedavg", "fedprox")  # strategies that need only the weighted sum of the updates


def validate(values: dict[str, Any]) -> dict[str, Any]:
    """Return a complete config: defaults filled in, unknown keys and wrong types refused with the key's name."""
    unknown = sorted(set(values) - set(SCHEMA))
    if unknown:
        raise ConfigError(unknown[0], f"one of the known keys ({', '.join(SCHEMA)})", values[unknown[0]])
    config: dict[str, Any] = {}
    for key, spec in SCHEMA.items():
        value = values.get(key, spec.default)
        if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and spec.type is not bool) or not isinstance(value, spec.type):
            expected = spec.type.__name__ if isinstance(spec.type, type) else " or ".join(t.__name__ for t in spec.type)
            raise ConfigError(key, f"a {expected}", value)
        if spec.min is not None and value < spec.min:
            raise ConfigError(key, f">= {spec.min:g}", value)
        config[key] = value
    strategies = strategy_names()
    if config["strategy"] not in strategies:
        if config["strategy"].strip().lower() not in strategies:
            raise ConfigError("strategy", f"one of {', '.join(strategies)}", config["strategy"])
        config["strategy"] = config["strategy"].strip().lower()  # the hub looks strategies up by these names
    if config["secure_aggregation"] and config["strategy"].strip().lower() not in SUM_STRATEGIES:
        raise ConfigError(
            "secure_aggregation",
            f"false with strategy {config['strategy']!r}: secure aggregation gives the hub only the sum of the "
            f"updates, enough for {' and '.join(SUM_STRATEGIES)}; median, trimmed mean, Krum and FedAdam need each "
            "update (choose one of those strategies, or turn secure_aggregation off)",
            True,
        )
    if config["expected_sites"] == 0:
        config["expected_sites"] = config["min_sites"]
    if config["strategy"] == "fedprox":
        config["strategy_options"] = {"proximal_mu": config["proximal_mu"], **config["strategy_options"]}
    return config


def strategy_names() -> list[str]:
    """The strategy names a study may ask for: the built-in ones and those of the ``flip_lab.strategies`` entry
    point group installed here (the hub resolves the same group; ``flip_lab.hub.strategies.available``)."""
    from importlib.metadata import entry_points

    return [
        *BUILTIN_STRATEGIES,
        *sorted(ep.name for ep in entry_points(group="flip_lab.strategies") if ep.name not in BUILTIN_STRATEGIES),
    ]


def train_config(config: dict[str, Any]) -> dict[str, Any]:
    """The part of the config that reaches the plan's train()/evaluate() at the sites.

    Flower adds ``server-round`` (1-based) to it each round; with ``rounds`` a plan can schedule by progress.
    """
    keys = ("rounds", "local_epochs", "lr", "batch_size", "seed", "proximal_mu")
    return {**{k: config[k] for k in keys}, **config["extra"]}
