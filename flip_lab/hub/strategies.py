"""Flower strategies with FLIP Lab's release rules.

Flower's strategies aggregate whatever arrives. Every FLIP strategy first screens each update (keys, shapes,
finiteness; the robust checks of ``flip_lab.hub.robust`` where enabled), names every rejected site, refuses to
release a round with fewer than ``min_sites`` accepted contributors, and keeps the model's dtypes as sent.
A registry maps the names a researcher writes (``"fedavg"``) to classes; third parties can add theirs through the
``flip_lab.strategies`` entry point group.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as fl

from flip_common.protocol import SITE_METRICS, ProtocolError

from .events import EventSink
from .grid import site_info
from .robust import RobustConfig, screen_updates


def _as_declared(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flower's wire format turns 0-d arrays (e.g. BatchNorm's step counter) into shape (1,): undo only that."""
    out = {}
    for key, value in arrays.items():
        ref = reference.get(key)
        if ref is not None and ref.ndim == 0 and value.shape == (1,):
            value = value.reshape(())
        out[key] = value
    return out


class RoundBelowMinimum(RuntimeError):
    """A round had fewer accepted contributors than the minimum: it is discarded, never released."""


class FlipChecks:
    """Mixin placed before a Flower strategy class in the MRO; see the module docstring."""

    sink: EventSink
    min_sites: int
    reference: dict[str, np.ndarray]
    robust: RobustConfig

    def setup_flip(
        self,
        *,
        sink: EventSink,
        min_sites: int,
        reference: dict[str, np.ndarray],
        robust: RobustConfig,
        secagg: Any = None,
    ) -> None:
        self.secagg = secagg  # a flip_lab.hub.secagg.SecureAggregator: the hub sees sums, never updates
        self.sink = sink
        self.min_sites = min_sites
        self.reference = reference
        self.robust = robust
        self.released_round = 0
        self.released: dict[str, np.ndarray] = dict(reference)

    def _site(self, msg: Message) -> str:
        try:
            return str(site_info(msg).get("site", f"node-{msg.metadata.src_node_id}"))
        except ProtocolError:  # reported as a bad reply where it was received (StreamingGrid)
            return f"node-{msg.metadata.src_node_id}"

    # A resumed job continues at round ``round_offset + 1``: Flower's loop counts from 1, the sites, the events
    # and the checkpoints see the study's own round numbers.
    round_offset = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
        return super().configure_train(server_round + self.round_offset, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = [m for m in replies if not m.has_error()]
        if getattr(self, "secagg", None) is not None:
            return self._aggregate_secure(server_round, replies)
        updates = {}
        for msg in replies:
            record = next(iter(msg.content.array_records.values()), None)
            metrics = next(iter(msg.content.metric_records.values()), {})
            updates[self._site(msg)] = (
                _as_declared({k: v.numpy() for k, v in record.items()}, self.reference) if record else {},
                float(metrics.get("num-examples", 0)),
            )
        verdict = screen_updates(updates, self.released, self.robust)
        for site, reason in verdict.rejected.items():
            self.sink.emit("update_rejected", round=server_round, site=site, reason=reason)
        # Replies arrive in whatever order the network delivers them; floating-point sums depend on order, so
        # aggregate in site-name order and the same study with the same seed gives the same weights bit for bit.
        accepted = sorted((m for m in replies if self._site(m) in verdict.accepted), key=self._site)
        for msg in accepted:
            record = next(iter(msg.content.array_records.values()))
            for key, value in updates[self._site(msg)][0].items():
                record[key] = Array(value)
        for msg in accepted:  # cap the weight a site's self-reported example count can carry
            metrics = next(iter(msg.content.metric_records.values()))
            metrics["num-examples"] = verdict.weights[self._site(msg)]
        self._require_minimum(server_round, "train", accepted)
        arrays, metrics = super().aggregate_train(server_round, accepted)  # type: ignore[misc]
        if arrays is None:
            raise RoundBelowMinimum(f"round {server_round}: the strategy produced no model")
        # Averaging promotes integer buffers (e.g. BatchNorm's num_batches_tracked) to float: keep the sent dtypes.
        cast = {k: np.asarray(v.numpy()).astype(self.reference[k].dtype) for k, v in arrays.items()}
        self.released = cast
        self.released_round = server_round
        self.sink.checkpoint(self.released, server_round)
        self._emit_aggregate(server_round, "train", metrics, accepted)
        return ArrayRecord({k: Array(v) for k, v in cast.items()}), metrics

    def _aggregate_secure(
        self, server_round: int, replies: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Secure aggregation: no update to screen (each site bounded its own), only the unmasked weighted mean
        update of the survivors; released = previous model + mean update, integer buffers as they were."""
        replies = sorted(replies, key=self._site)
        mean = self.secagg.aggregate(server_round, replies)  # SecAggDiscarded (a RoundBelowMinimum) if it cannot
        self._require_minimum(server_round, "train", replies)
        metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)  # type: ignore[attr-defined]
        released = {
            k: (v.astype(np.float64) + mean[k]).astype(v.dtype) if k in mean else v for k, v in self.released.items()
        }
        self.released = released
        self.released_round = server_round
        self.sink.checkpoint(self.released, server_round)
        self._emit_aggregate(server_round, "train", metrics, replies)
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in released.items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = sorted((m for m in replies if not m.has_error()), key=self._site)
        self._require_minimum(server_round, "evaluate", replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        self._emit_aggregate(server_round, "evaluate", metrics, replies)
        return metrics

    def _require_minimum(self, server_round: int, phase: str, accepted: list[Message]) -> None:
        if len(accepted) < self.min_sites:
            reason = (
                f"{len(accepted)} accepted contributor(s), fewer than the minimum of {self.min_sites}: "
                "the round is discarded and not released"
            )
            self.sink.emit("round_discarded", round=server_round, phase=phase, reason=reason)
            raise RoundBelowMinimum(f"round {server_round} ({phase}): {reason}")

    def _emit_aggregate(
        self, server_round: int, phase: str, metrics: MetricRecord | None, replies: list[Message]
    ) -> None:
        # A site's own accounting (e.g. its cumulative privacy spend) is per site; an average of it means nothing.
        values = {
            k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and k not in SITE_METRICS
        }
        self.sink.emit(
            "aggregate",
            round=server_round,
            phase=phase,
            metrics=values,
            contributors=sorted(self._site(m) for m in replies),
            wall_s=0.0,
        )


def _with_checks(base: type) -> type:
    return type(f"Flip{base.__name__}", (FlipChecks, base), {})


BUILTIN: dict[str, type] = {
    "fedavg": _with_checks(fl.FedAvg),
    "fedprox": _with_checks(fl.FedProx),
    "fedadam": _with_checks(fl.FedAdam),
    "fedmedian": _with_checks(fl.FedMedian),
    "fedtrimmedavg": _with_checks(fl.FedTrimmedAvg),
    "krum": _with_checks(fl.Krum),
}


def available() -> dict[str, type]:
    """Built-in strategies plus those registered under the ``flip_lab.strategies`` entry point group."""
    found = dict(BUILTIN)
    for ep in entry_points(group="flip_lab.strategies"):
        found.setdefault(ep.name, _with_checks(ep.load()))
    return found


def make_strategy(name: str, *, n_sites: int, options: dict[str, Any]) -> FlipChecks:
    """Instantiate a strategy by name with every site sampled each round."""
    strategies = available()
    if name not in strategies:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(sorted(strategies))}")
    kwargs: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": 1,
    }
    kwargs.update(options)
    return strategies[name](**kwargs)  # type: ignore[no-any-return]
