"""The messages that cross FLIP Lab's boundaries, written down once.

Hub -> researcher: ``Event`` dicts, printed by the hub's ServerApp as ``FLIP-EVENT {json}`` log lines and read
back through Flower's Control API (``StreamLogs``). The same dicts feed the notebook dashboard, the job history
and the Jupyter server extension's event stream.

Site executor <-> sandboxed worker: ``WorkerRequest`` / ``WorkerReply`` JSON headers on a pipe, followed by an
optional safetensors payload (never a pickle).
"""

from __future__ import annotations

import json
from typing import Any, Literal, NotRequired, TypedDict

EVENT_PREFIX = "FLIP-EVENT "
WEIGHTS_PREFIX = "FLIP-WEIGHTS "
# Metric names the site itself reports. They are computed by site code, not by the plan, so the
# policy's [metrics] rules (written to limit what the plan can say) do not count them; a plan metric
# of the same name is refused so that a plan can never pose as the site. The hub leaves them out of aggregates.
SITE_METRICS = frozenset({"dp_epsilon", "dp_clip_norm"})


def event_of(line: str) -> dict[str, Any] | None:
    """The event a hub log line carries, or None for a line that carries none.

    Raises ``json.JSONDecodeError`` for a line that carries an unreadable one."""
    idx = line.find(EVENT_PREFIX)
    if idx < 0:
        return None
    event = json.loads(line[idx + len(EVENT_PREFIX) :])
    return event if isinstance(event, dict) else None


Phase = Literal["train", "evaluate"]
JobStatus = Literal["pending", "starting", "running", "completed", "failed", "cancelled"]
FINAL: tuple[JobStatus, ...] = ("completed", "failed", "cancelled")  # a job in one of these has ended for good
SiteState = Literal[
    "waiting_approval",
    "preparing_data",
    "training",
    "evaluating",
    "done",
    "failed",
    "withheld",
    "offline",
]


class JobStarted(TypedDict):
    type: Literal["job_started"]
    rounds: int
    strategy: str
    min_sites: int
    sites: list[str]
    plan_hash: str
    t: float


class SiteStateEvent(TypedDict):
    type: Literal["site_state"]
    round: int
    site: str
    state: SiteState
    detail: NotRequired[str]
    t: float


class Reply(TypedDict):
    """One site's checked reply for one phase of one round."""

    type: Literal["reply"]
    round: int
    phase: Phase
    site: str
    metrics: dict[str, float]
    num_examples: int
    compute_s: float  # wall seconds inside the plan's train()/evaluate() at the site
    started_at: NotRequired[float]  # the site's clock when the plan function started
    audit_head: NotRequired[str]
    approval: NotRequired[str]
    t: float


class Aggregate(TypedDict):
    type: Literal["aggregate"]
    round: int
    phase: Phase
    metrics: dict[str, float]
    contributors: list[str]
    wall_s: float
    t: float


class RoundDiscarded(TypedDict):
    type: Literal["round_discarded"]
    round: int
    phase: Phase
    reason: str
    t: float


class SiteError(TypedDict):
    """A site's failure, as the site chose to describe it: a kind and a safe message, never a traceback."""

    type: Literal["site_error"]
    round: int
    phase: Phase
    site: str
    kind: str
    message: str
    t: float


class UpdateRejected(TypedDict):
    type: Literal["update_rejected"]
    round: int
    site: str
    reason: str
    t: float


class SecureAggregation(TypedDict):
    """One securely aggregated round: who took part, who dropped out and whose masks were recovered."""

    type: Literal["secure_aggregation"]
    round: int
    participants: list[str]
    dropped: list[str]
    recovered: list[str]
    threshold: int
    t: float


class JobResumed(TypedDict):
    """A job continuing an interrupted one (``Federation.resume``) from the round that job last released."""

    type: Literal["job_resumed"]
    round: int
    from_job: int
    t: float


class JobFinished(TypedDict):
    type: Literal["job_finished"]
    status: Literal["completed", "failed", "cancelled"]
    message: str
    rounds_completed: int
    t: float


class DirectorySite(TypedDict):
    """A site's answer to a directory request (``flip_lab._directory``): its name and public catalogue."""

    type: Literal["directory_site"]
    node_id: int
    site: str
    catalogue: dict[str, Any]
    t: float


class DirectoryError(TypedDict):
    """A site that refused a directory request or did not answer it in time."""

    type: Literal["directory_error"]
    node_id: int
    kind: str
    message: str
    t: float


class DirectoryFinished(TypedDict):
    type: Literal["directory_finished"]
    asked: int
    answered: int
    wall_s: float
    t: float


Event = (
    JobStarted
    | SiteStateEvent
    | Reply
    | Aggregate
    | RoundDiscarded
    | SiteError
    | UpdateRejected
    | SecureAggregation
    | JobResumed
    | JobFinished
    | DirectorySite
    | DirectoryError
    | DirectoryFinished
)
