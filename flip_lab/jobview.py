"""A job as a person sees it, folded from the hub's events: the one fold behind the notebook's ``Job``, its
dashboard (``flip_lab.display``) and the Jupyter server's panel (``flip_lab.server.views``).

``fold(view, event)`` applies one hub event (``flip_common.protocol.Event``) to a ``JobView``; ``JobView.from_events``
folds a whole stream. Nothing here reads a clock, a file or the network, so a replayed ``events.jsonl`` gives exactly
the view the live job gave, and every reader of a job (status, round progress, each site's state, the governance
facts, the errors, the metric rows) reads the same numbers. Events arrive as JSON from the hub's log, so the fold is
lenient: an unknown event type is ignored and a missing optional field keeps what the view held.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from flip_common.protocol import ERROR_EVENTS, FINAL

AGGREGATE = "aggregate"  # the site name of aggregated rows in the metric history
MetricRow = tuple[int, str, str, str, float]  # round, site ("aggregate" for the hub's), phase, metric, value


@dataclass
class SiteView:
    name: str
    state: str = "pending"  # a flip_common.protocol.SiteState once the site has reported one
    detail: str = ""
    round: int = 0  # the highest round the site has reported a state for
    reported: bool = False  # whether the site has reported a state of its own (not only been named by the hub)
    approval: str = ""
    policy: str = ""
    audit_head: str = ""
    replies: int = 0
    metrics: dict[str, float] = field(default_factory=dict)  # the site's latest evaluation metrics


@dataclass
class JobView:
    """A job's state, folded from its events in order (``fold``)."""

    rounds: int = 0  # rounds asked for; 0 while unknown
    status: str = "pending"  # a flip_common.protocol.JobStatus
    message: str = ""
    strategy: str = ""
    min_sites: int = 0
    plan_hash: str = ""
    round: int = 0  # the round in progress: the highest round any site or aggregate has reached
    released: int = 0  # the rounds completed: the highest round with a released aggregate
    sites: dict[str, SiteView] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)  # site_error, update_rejected, round_discarded events
    rows: list[MetricRow] = field(default_factory=list)  # the metric history, one row per value
    metric_names: dict[str, set[str]] = field(default_factory=dict)  # phase -> names of the metrics reported
    events: int = 0  # events folded

    @classmethod
    def from_events(cls, events: Iterable[Mapping[str, Any]], **fields: Any) -> Self:
        view = cls(**fields)
        for event in events:
            view.apply(event)
        return view

    def apply(self, event: Mapping[str, Any]) -> None:
        fold(self, event)

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def site(self, name: str) -> SiteView:
        if name not in self.sites:
            self.sites[name] = SiteView(name)
        return self.sites[name]

    def audit_heads(self) -> dict[str, str]:
        """Per site, the last audit head it sent: ``flip-site audit verify --expected-head HEAD``
        at that site fails if the log was cut back (or wiped) below it since."""
        return {name: s.audit_head for name, s in sorted(self.sites.items()) if s.audit_head}

    def governance(self) -> dict[str, Any]:
        """The facts a reviewer checks: plan hash, and per site its approval, policy label and audit head."""
        return {
            "plan_hash": self.plan_hash,
            "strategy": self.strategy,
            "min_sites": self.min_sites,
            "sites": {
                name: {
                    "approval": s.approval,
                    "policy": s.policy,
                    "audit_head": s.audit_head,
                    "state": s.state,
                    "replies": s.replies,
                }
                for name, s in sorted(self.sites.items())
            },
        }

    def aggregate_series(self, phase: str = "evaluate") -> dict[str, list[tuple[int, float]]]:
        """The aggregated metrics of one phase: name -> [(round, value)] in round order, the last value of a round."""
        series: dict[str, dict[int, float]] = {}
        for round_, site, row_phase, name, value in self.rows:
            if site == AGGREGATE and row_phase == phase:
                series.setdefault(name, {})[round_] = value
        return {name: sorted(points.items()) for name, points in series.items()}


def fold(view: JobView, event: Mapping[str, Any]) -> None:
    """Apply one hub event to ``view`` in place. Unknown event types and missing optional fields are ignored."""
    kind = event.get("type")
    view.events += 1
    if kind == "job_started":
        if view.status not in FINAL:  # a verdict the job already has is not undone by a late start
            view.status = "running"
        view.rounds = int(event.get("rounds") or view.rounds)
        view.strategy = str(event.get("strategy", ""))
        view.min_sites = int(event.get("min_sites") or 0)
        view.plan_hash = str(event.get("plan_hash") or view.plan_hash)
        for name in event.get("sites") or []:
            view.site(str(name))
    elif kind == "site_state":
        site = view.site(str(event["site"]))
        site.reported = True
        site.state = str(event["state"])
        site.detail = str(event.get("detail", ""))
        site.round = max(site.round, int(event.get("round", 0)))
        view.round = max(view.round, site.round)
        if site.state == "preparing_data" and site.detail:
            site.policy = site.detail  # sites report their policy label when they approve
        if site.state == "preparing_data" and not site.approval:
            site.approval = "approved"
    elif kind == "reply":
        site = view.site(str(event["site"]))
        site.replies += 1
        site.audit_head = str(event.get("audit_head") or site.audit_head)
        site.approval = str(event.get("approval") or site.approval)
        if event.get("phase") == "evaluate":
            site.metrics = {str(k): float(v) for k, v in (event.get("metrics") or {}).items() if v is not None}
        _add_rows(view, event, str(event["site"]))
        view.rows.append(
            (int(event["round"]), site.name, str(event["phase"]), "num_examples", float(event.get("num_examples", 0)))
        )
    elif kind == "aggregate":
        view.round = max(view.round, int(event["round"]))
        view.released = max(view.released, int(event["round"]))
        _add_rows(view, event, AGGREGATE)
    elif kind in ERROR_EVENTS:
        view.errors.append(dict(event))
    elif kind == "job_finished":
        view.status = str(event.get("status", "failed"))
        view.message = str(event.get("message", ""))
        view.released = max(view.released, int(event.get("rounds_completed") or 0))


def _add_rows(view: JobView, event: Mapping[str, Any], site: str) -> None:
    metrics: Mapping[str, Any] = event.get("metrics") or {}
    round_, phase = int(event["round"]), str(event["phase"])
    view.rows.extend((round_, site, phase, str(k), float(v)) for k, v in metrics.items() if v is not None)
    view.metric_names.setdefault(phase, set()).update(map(str, metrics))
