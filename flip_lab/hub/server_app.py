"""The hub's ServerApp: discover sites, wait for their approval, run the strategy, stream everything back.

It runs in the hub's study process (:mod:`flip_lab.hub.study`), one per run, started by FLIP's runner; no
code from the bundle runs. The plan arrives in the run config (``flip-plan-spec``, ``flip-init-weights``); the
plan's source is never executed here.
"""

from __future__ import annotations

import base64
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from flip_common.protocol import ProtocolError, read_plan_spec

from ..config import SUM_STRATEGIES
from .events import EventSink, load_checkpoint
from .grid import Exchange, NotEnoughSites, StreamingGrid, parse_site_error, site_info
from .robust import RobustConfig
from .secagg import SecureAggregator
from .strategies import RoundBelowMinimum, make_strategy

app = ServerApp()


def load_weights(blob: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return dict(load(base64.b64decode(blob)))


class HubRun:
    """One study on the hub. ``spec`` is the plan's JSON spec; see ``flip_lab.plan.BuiltPlan.spec``."""

    def __init__(
        self,
        grid: Grid,
        spec: dict[str, Any],
        weights: dict[str, np.ndarray],
        sink: EventSink,
        *,
        resume: tuple[dict[str, np.ndarray], int] | None = None,
        resume_from: int = 0,
    ):
        self.grid = grid
        self.spec = spec
        self.config = spec["config"]
        self.weights = weights
        self.sink = sink
        self.outcome = ("failed", "the hub's run ended without a final report")  # set by _finish
        self.resume, self.resume_from = resume, resume_from
        self.min_sites = int(self.config["min_sites"])

    # -- discovery and approval ------------------------------------------------------------------
    def _query(self, nodes: list[int]) -> dict[int, Message]:
        content = RecordDict({"config": ConfigRecord({"op": "hello", "plan-hash": self.spec["plan_hash"]})})
        msgs = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
        exchange = Exchange(self.grid, msgs)
        return dict(exchange.replies(time.monotonic() + float(self.config["round_timeout"])))

    def _wait_for_sites(self) -> list[int]:
        deadline = time.monotonic() + float(self.config["connect_timeout"])
        while True:
            nodes = sorted(self.grid.get_node_ids())
            if len(nodes) >= int(self.config.get("expected_sites", self.min_sites)) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if len(nodes) < self.min_sites:
            raise NotEnoughSites(
                f"{len(nodes)} site(s) connected to the hub within {self.config['connect_timeout']} s; "
                f"the study needs at least {self.min_sites}"
            )
        return nodes

    def approvals(self) -> dict[int, str]:
        """Ask every site about this plan until each has approved or rejected it, or time runs out."""
        nodes = self._wait_for_sites()
        names: dict[int, str] = {}
        approved: dict[int, str] = {}
        announced: set[int] = set()
        refusals: list[str] = []  # sites' own reasons for turning this job away, in their words
        deadline = time.monotonic() + float(self.config["approval_timeout"])
        pending = list(nodes)
        while pending:
            replies = self._query(pending)
            still: list[int] = []
            for node in pending:
                reply = replies.get(node)
                if reply is None:
                    still.append(node)
                    continue
                if reply.has_error():
                    kind, message = parse_site_error(reply.error.reason, int(reply.error.code))
                    self.sink.emit(
                        "site_error",
                        round=0,
                        phase="train",
                        site=names.get(node, f"node-{node}"),
                        kind=kind,
                        message=message,
                    )
                    continue
                try:
                    info = site_info(reply)
                except ProtocolError as err:
                    site = names.get(node, f"node-{node}")
                    self.sink.emit("site_error", round=0, phase="train", site=site, kind="bad_reply", message=str(err))
                    continue
                name = names[node] = str(info.get("site", f"node-{node}"))
                state = str(info.get("approval", "unknown"))
                if state == "approved":
                    approved[node] = name
                    self.sink.emit(
                        "site_state", round=0, site=name, state="preparing_data", detail=str(info.get("policy", ""))
                    )
                elif state == "rejected":
                    self.sink.emit(
                        "site_state", round=0, site=name, state="failed", detail="the data owner rejected this plan"
                    )
                elif state == "refused":  # approved, but the site's policy (e.g. its privacy budget) says no
                    detail = str(info.get("detail", ""))[:300] or f"site {name} refused this job"
                    refusals.append(detail)
                    self.sink.emit("site_state", round=0, site=name, state="failed", detail=detail)
                else:
                    if node not in announced:
                        announced.add(node)
                        # e.g. the site's settings changed since its data owner approved them
                        why = str(info.get("detail", ""))[:300]
                        self.sink.emit(
                            "site_state",
                            round=0,
                            site=name,
                            state="waiting_approval",
                            detail=f"waiting for approval at site {name}" + (f": {why}" if why else ""),
                        )
                    still.append(node)
            pending = still
            if pending and time.monotonic() > deadline:
                for node in pending:
                    self.sink.emit(
                        "site_state",
                        round=0,
                        site=names.get(node, f"node-{node}"),
                        state="failed",
                        detail="no approval before the job's approval timeout",
                    )
                break
            if pending:
                time.sleep(1.0)
        if len(approved) < self.min_sites:
            raise NotEnoughSites(
                f"{len(approved)} site(s) approved this plan; the study needs at least {self.min_sites}"
                + (f" ({'; '.join(refusals)})" if refusals else "")
            )
        return approved

    # -- the study -------------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.config
        self.sink.emit(
            "job_started",
            rounds=int(cfg["rounds"]),
            strategy=cfg["strategy"],
            min_sites=self.min_sites,
            sites=[],
            plan_hash=self.spec["plan_hash"],
        )
        strategy = None
        try:
            sites = self.approvals()
            secure = self._secure_aggregator(sites)
            grid = StreamingGrid(self.grid, self.sink, site_names=sites, min_sites=self.min_sites, secagg=secure)
            strategy = make_strategy(cfg["strategy"], n_sites=len(sites), options=dict(cfg.get("strategy_options", {})))
            strategy.setup_flip(
                sink=self.sink,
                min_sites=self.min_sites,
                reference=self.weights,
                robust=RobustConfig.from_dict(cfg.get("robust", {})),
                secagg=secure,
            )
            start, weights = self._resume_point(strategy)
            initial = ArrayRecord(OrderedDict((k, Array(v)) for k, v in weights.items()))
            # The plan's own config travels in its spec (``train_config``), checked against the hash at each site;
            # the messages carry only the operation and Flower's ``server-round``.
            train_cfg = ConfigRecord({"op": "train"})
            eval_cfg = ConfigRecord({"op": "evaluate"})
            if start >= int(cfg["rounds"]):
                self._finish(strategy, "completed", "all rounds were released before the hub stopped")
                return
            strategy.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=int(cfg["rounds"]) - start,
                timeout=float(cfg["round_timeout"]),
                train_config=train_cfg,
                evaluate_config=eval_cfg,
            )
        except (NotEnoughSites, RoundBelowMinimum) as err:
            self._finish(strategy, "failed", str(err))
            return
        except Exception as err:  # the hub reports its own faults to the researcher instead of vanishing
            self._finish(strategy, "failed", f"the hub failed: {type(err).__name__}: {err}")
            return
        self._finish(strategy, "completed", "all rounds released")

    def _resume_point(self, strategy: Any) -> tuple[int, dict[str, np.ndarray]]:
        """Where this run starts: round 0 with the plan's weights, or, resuming a job, its last released round."""
        if self.resume is None:
            return 0, self.weights
        weights, released = self.resume
        if str(self.config["strategy"]).strip().lower() == "fedadam":
            raise RuntimeError("a fedadam job cannot resume: its optimiser state lived only in the stopped hub")
        if set(weights) != set(self.weights) or any(weights[k].size != v.size for k, v in self.weights.items()):
            raise RuntimeError("the checkpoint does not match this plan's model; submit the study again")
        # Aggregation hands scalars (BatchNorm's counter) back as shape (1,): restore the declared shapes.
        weights = {k: np.asarray(weights[k]).reshape(v.shape) for k, v in self.weights.items()}
        strategy.round_offset = released
        strategy.released, strategy.released_round = dict(weights), released
        self.sink.emit("job_resumed", round=released, from_job=self.resume_from)
        return released, weights

    def _secure_aggregator(self, sites: dict[int, str]) -> SecureAggregator | None:
        """With ``secure_aggregation`` on, the driver of its key setup and unmasking (``flip_lab.hub.secagg``)."""
        if not self.config.get("secure_aggregation", False):
            return None
        if str(self.config["strategy"]).strip().lower() not in SUM_STRATEGIES:  # submit refuses it too
            raise RuntimeError(
                f"secure aggregation works with {', '.join(SUM_STRATEGIES)} only, not {self.config['strategy']!r}"
            )
        return SecureAggregator(
            self.grid,
            self.sink,
            site_names=sites,
            min_sites=self.min_sites,
            reference=self.weights,
            timeout=float(self.config["round_timeout"]),
        )

    def _finish(self, strategy: Any, status: str, message: str) -> None:
        released = getattr(strategy, "released_round", 0) if strategy is not None else 0
        absent = self.sink.absent_sites() if status == "completed" else ""
        if absent:  # completed by the others: the researcher learns which site's data the model never saw, and why
            message = f"{message}; {absent}"
        if strategy is not None and released:
            self.sink.emit_weights(strategy.released, released)
        self.sink.emit("job_finished", status=status, message=message, rounds_completed=released)
        self.outcome = (status, message)


class StudyFailed(Exception):
    """Raised once a failed job's final event is out: a ServerApp that returns is "completed" for Flower, so
    only an exception makes the hub's run list (``fed.jobs()``, ``flip-lab jobs``) say that the job failed."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    from flip_common.flower import fast_object_pulls

    fast_object_pulls()
    spec = read_plan_spec(str(context.run_config["flip-plan-spec"]))
    weights = load_weights(str(context.run_config["flip-init-weights"]))
    hub_dir = os.environ.get("FLIP_HUB_DIR")
    record_dir = Path(hub_dir) / "runs" / str(grid.run.run_id) if hub_dir else None
    sink = EventSink(record_dir)
    resume_from = int(str(context.run_config.get("flip-resume-from", "0")) or 0)
    resume = None
    if resume_from:
        if hub_dir is None:
            message = "this hub keeps no checkpoints (no FLIP_HUB_DIR): the job cannot resume"
            sink.emit("job_finished", status="failed", rounds_completed=0, message=message)
            raise StudyFailed(message)
        try:
            resume = load_checkpoint(Path(hub_dir) / "runs" / str(resume_from))
        except FileNotFoundError:  # the job stopped before releasing any round: start it from the beginning
            resume = (weights, 0)
    run = HubRun(grid, spec, weights, sink, resume=resume, resume_from=resume_from)
    run.run()
    status, message = run.outcome
    if status == "failed":
        raise StudyFailed(message)
