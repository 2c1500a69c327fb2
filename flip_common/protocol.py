"""The messages that cross FLIP Lab's boundaries, written down once.

Lab -> hub and sites: a plan bundle's run config (``RunConfig``: the plan's source, its ``PlanSpec`` as JSON, the
initial weights, resume and study ids), read with ``read_plan_spec``; the settings a site records for a study are a
``RunSettings``.

Site -> hub: a reply's ``flip`` ConfigRecord (``SiteInfo``, read with ``read_site_info``), its ``metrics``
MetricRecord (``{name: float}`` plus ``num-examples``), or an error whose reason is ``"kind: message"``
(``error_reason`` writes it, ``parse_site_error`` reads it; the kinds are ``ErrorKind``).

Hub -> researcher: ``Event`` dicts, printed by the hub's ServerApp as ``FLIP-EVENT {json}`` log lines and read
back through Flower's Control API (``StreamLogs``). The same dicts feed the notebook's job, its dashboard, the job
history and the Jupyter server extension's event stream, all through one fold (``flip_lab.jobview``).

Site executor <-> sandboxed worker: ``WorkerRequest`` / ``WorkerReply`` JSON headers on a pipe
(``site_kernel._pipe``), followed by an optional safetensors payload (never a pickle).

Records read at a boundary are checked there: a record of the wrong shape raises ``ProtocolError`` naming the field,
what was expected and what was received (a type name, never the value, so nothing a site holds leaks into it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict, get_args

from .errors import FlipError


class ProtocolError(FlipError, ValueError):
    """A message that does not have the shape the protocol gives it; says which field, expected and received."""

    def __init__(self, record: str, field: str, expected: str, received: object) -> None:
        self.record, self.field, self.expected = record, field, expected
        self.received = "nothing" if received is _MISSING else type(received).__name__
        super().__init__(f"{record}: {field!r} expected {expected}, received {self.received}")


_MISSING = object()


def _check(record: str, data: Mapping[str, Any], field: str, kind: type | tuple[type, ...], expected: str) -> None:
    value = data.get(field, _MISSING)
    if value is _MISSING or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise ProtocolError(record, field, expected, value)
    if not isinstance(value, kind):
        raise ProtocolError(record, field, expected, value)


# -- error kinds -------------------------------------------------------------------------------------------
ErrorKind = Literal[
    # said by a site, in its error reply's reason ("kind: message")
    "bundle_refused",  # the bundle is not a readable FLIP plan, or its hash does not match its content
    "no_policy",  # the site has no policy in force
    "policy",  # the site's policy refuses the study or its settings
    "not_approved",  # the data owner has not approved this plan (pending, refused or revoked)
    "site_busy",  # the site is serving as many studies as it allows
    "contract_error",  # the plan's data contract cannot be met (the researcher fixes it)
    "data_error",  # the site's data could not be prepared (the data owner fixes it)
    "model_mismatch",  # model() does not build the declared shapes, or the weights sent do not fit it
    "plan_error",  # the plan raised, or returned something other than a dict of metrics
    "sandbox_unavailable",  # the site cannot isolate plans and its policy accepts no weaker isolation
    "resource_limit",  # the plan's process exceeded a limit (time, memory) or ended
    "stopped",  # the plan's process was stopped
    "withheld",  # the site's egress check held the reply back (a metric or an update its policy does not allow)
    "dp_budget",  # the study would exceed the site's differential-privacy budget
    "dp_repeat",  # a round asked for again with other weights: answering would spend privacy twice
    "dp_ledger",  # the site's privacy ledger cannot be read or written
    "secure_aggregation",  # a secure-aggregation step was refused
    "site_error",  # the site's own trouble, or a reason in no known shape
    # said by the hub about a site
    "timeout",  # no reply within the round's time limit
    "site_offline",  # the site went offline during the round
    "message_lost",  # Flower lost the message on its way
    "site_crashed",  # the site's Flower runtime failed
    "bad_reply",  # the site's reply did not have the protocol's shape
    "no_answer",  # no answer to a directory request in time
]
ERROR_KINDS: frozenset[str] = frozenset(get_args(ErrorKind))
ERROR_CODE = 0  # Flower's ErrorCode.UNKNOWN: the kind travels in the reason text, "kind: message"
MAX_REASON = 500  # characters of a site's error reason
MAX_MESSAGE = 300  # characters of it the hub keeps
_SAFE_KIND = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,60}$")  # a kind of another shape is sent as site_error
# The codes Flower itself puts on an error reply, and the kind the hub reports for each.
_FLOWER_KINDS: dict[int, ErrorKind] = {
    5: "site_offline",
    3: "message_lost",
    4: "message_lost",
    7: "bundle_refused",
    8: "site_crashed",
}


@dataclass(frozen=True)
class SiteErrorReason:
    """A site's refusal or failure as it travels: a kind and a message the site already made safe."""

    kind: str  # an ErrorKind from this version; a newer site's kind passes through as it is
    message: str

    def reason(self) -> str:
        """The ``Error.reason`` text a site sends: ``"kind: message"``, a kind of another shape told as site_error."""
        kind = self.kind if _SAFE_KIND.match(self.kind) else "site_error"
        return f"{kind}: {self.message}"[:MAX_REASON]


def error_reason(kind: ErrorKind, message: str) -> str:
    """What a site puts in an error reply's reason."""
    return SiteErrorReason(kind, message).reason()


def parse_site_error(reason: str, code: int = 0) -> tuple[str, str]:
    """Split a site's error reason ``"kind: message"``; the site already made the message safe.

    Errors that Flower itself raised (a node that stopped sending heartbeats, say) carry a non-zero code.
    """
    if code in _FLOWER_KINDS:
        return _FLOWER_KINDS[code], reason.split("\n")[0][:MAX_MESSAGE]
    kind, sep, message = reason.partition(": ")
    if not sep or not kind.replace("_", "").isalnum():
        return "site_error", reason[:MAX_MESSAGE]
    return kind, message[:MAX_MESSAGE]


# -- the plan and its run settings ----------------------------------------------------------------------------
class RunConfig(TypedDict):
    """A plan bundle's ``[tool.flwr.app.config]``, every value text (``flip_lab._bundle`` writes it)."""

    flip_plan_source: str  # "flip-plan-source": the plan module's text
    flip_plan_spec: str  # "flip-plan-spec": the PlanSpec as JSON
    flip_init_weights: str  # "flip-init-weights": base64 safetensors
    flip_resume_from: str  # "flip-resume-from": the job a resumed study continues, "0" for none
    flip_study: str  # "flip-study": the study a job belongs to, "0" for its own


# Flower's config keys are spelled with dashes, which a TypedDict field cannot be: the same keys, as sent.
RUN_CONFIG_KEYS = frozenset(key.replace("_", "-") for key in RunConfig.__annotations__)


class PlanSpec(TypedDict):
    """What a built plan declares (``flip_lab.plan.Plan.build``), sent as the run config's ``flip-plan-spec``."""

    plan_hash: str  # flip_common.planhash.plan_hash(source, contract, model_shapes): what a site approves
    contract: dict[str, Any]  # the data contract (flip_common.contract)
    model_shapes: dict[str, list[int]]  # parameter name -> shape
    name: NotRequired[str]
    model_dtypes: NotRequired[dict[str, str]]
    config: NotRequired[dict[str, Any]]  # the study's settings (flip_lab.config)
    train_config: NotRequired[dict[str, Any]]  # the part of them train()/evaluate() receive


def read_plan_spec(text: str) -> PlanSpec:
    """The plan spec a run config carries, checked; ``ProtocolError`` (a ``ValueError``) if it has another shape."""
    try:
        spec = json.loads(text)
    except ValueError as err:
        raise ProtocolError("plan spec", "flip-plan-spec", "JSON text", text) from err
    if not isinstance(spec, dict):
        raise ProtocolError("plan spec", "flip-plan-spec", "a JSON object", spec)
    _check("plan spec", spec, "contract", dict, "an object")
    _check("plan spec", spec, "model_shapes", dict, "an object of name -> shape")
    for name, shape in spec["model_shapes"].items():
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise ProtocolError("plan spec", f"model_shapes.{name}", "a list of integers", shape)
    for field, kind in (("plan_hash", str), ("name", str), ("model_dtypes", dict), ("config", dict)):
        if field in spec:
            _check("plan spec", spec, field, kind, "text" if kind is str else "an object")
    if "train_config" in spec:
        _check("plan spec", spec, "train_config", dict, "an object")
    return spec  # type: ignore[return-value]  # checked above


class RunSettings(TypedDict):
    """What an approved plan is run with at a site (``site_kernel.run_settings``): recorded, compared, bounded."""

    name: str
    config: dict[str, Any]  # the study's settings without those that only change how long it waits
    train_config: dict[str, Any]
    init_weights: str  # SHA-256 of the initial weights


# -- site replies ------------------------------------------------------------------------------------------------
Approval = Literal["approved", "pending", "rejected", "refused", "unknown"]


class SiteInfo(TypedDict, total=False):
    """The ``flip`` ConfigRecord a site attaches to every reply."""

    site: str  # the site's name
    audit_head: str  # the head of the site's audit log when it replied
    approval: str  # an Approval: the data owner's decision on the plan
    detail: str  # why a plan is held or refused, in the data owner's words
    policy: str  # the label of the site's policy in force
    compute_s: float  # wall seconds inside the plan's train()/evaluate()
    started_at: float  # the site's clock when the plan function started
    catalogue: str  # a directory reply: the site's public catalogue as JSON


_SITE_INFO_TEXT = ("site", "audit_head", "approval", "detail", "policy", "catalogue")
_SITE_INFO_NUMBERS = ("compute_s", "started_at")


def read_site_info(record: Mapping[str, Any]) -> SiteInfo:
    """A reply's ``flip`` ConfigRecord, checked; unknown keys (from a newer site) are left out."""
    info: dict[str, Any] = {}
    for field in _SITE_INFO_TEXT:
        if field in record:
            _check("site reply", record, field, str, "text")
            info[field] = record[field]
    for field in _SITE_INFO_NUMBERS:
        if field in record:
            _check("site reply", record, field, (int, float), "a number")
            info[field] = float(record[field])
    return info  # type: ignore[return-value]  # built from the checked fields above


# -- executor <-> worker frames ----------------------------------------------------------------------------
class LoadRequest(TypedDict):
    """The executor's first frame: load the prepared arrays, confine the process, build the plan's model."""

    op: Literal["load"]
    source: str
    arrays: str | None  # the .npz the site prepared for this job (dims=2)
    cases: NotRequired[str | None]  # dims=3: the cache entry holding one .npy per case, read lazily
    devices: NotRequired[list[str]]  # the site policy's [resources] devices, e.g. ["cuda:0"]
    scratch: str
    readable: list[str]
    threads: int
    seed: int
    limits: dict[str, Any]  # site_kernel.policy.Limits as fields
    confine: bool
    accept_weaker: bool
    uid: int
    protected: list[str]


class StepRequest(TypedDict):
    """One round's work: the weights in the payload, the round's config in the header."""

    op: Literal["train", "evaluate"]
    config: dict[str, Any]


class ExitRequest(TypedDict):
    op: Literal["exit"]


WorkerRequest = LoadRequest | StepRequest | ExitRequest


class WorkerDone(TypedDict):
    """A step (or the load) went well; a train step's weights follow as the payload."""

    ok: Literal[True]
    metrics: NotRequired[dict[str, float | None]]  # a step: the plan's metrics, None for a value not a number
    model_shapes: NotRequired[dict[str, list[int]]]  # the load: the shapes model() built
    confinement: NotRequired[dict[str, Any]]  # the load: the sandbox's report
    device: NotRequired[str]  # the load: "cpu" or "cuda:0", what the plan's config["device"] says
    device_note: NotRequired[str]  # the load: why (for the site's log)


class WorkerFailed(TypedDict):
    """The worker's failure report. It ran plan code: the executor trusts none of it (``site_kernel.egress``)."""

    ok: Literal[False]
    kind: str  # "plan_error", "model_mismatch", "sandbox_unavailable" or "data_error"
    role: NotRequired[str]  # model, train or evaluate
    fields: NotRequired[dict[str, Any]]  # site_kernel.egress.failure_fields
    not_a_dict: NotRequired[bool]
    missing: NotRequired[list[str]]  # sandbox_unavailable: the isolation mechanisms missing


WorkerReply = WorkerDone | WorkerFailed


def read_worker_reply(header: Mapping[str, Any]) -> WorkerReply:
    """A worker's reply header, checked. The worker runs plan code, which can write to its pipe: a frame of
    another shape raises ``ProtocolError`` and is treated as the plan breaking its confinement."""
    _check("worker reply", header, "ok", bool, "true or false")
    if header["ok"]:
        if "metrics" in header:
            _check("worker reply", header, "metrics", dict, "an object of name -> number")
        if "model_shapes" in header:
            _check("worker reply", header, "model_shapes", dict, "an object of name -> shape")
    else:
        _check("worker reply", header, "kind", str, "text")
    return header  # type: ignore[return-value]  # checked above


# -- hub -> researcher events ------------------------------------------------------------------------------

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
# The events that say something went wrong at a site or with a round: a job's errors.
ERROR_EVENTS = frozenset({"site_error", "update_rejected", "round_discarded"})
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
    status: str  # a JobStatus in FINAL; a run Flower ended on its own may carry its own word
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

EventType = Literal[
    "job_started",
    "site_state",
    "reply",
    "aggregate",
    "round_discarded",
    "site_error",
    "update_rejected",
    "secure_aggregation",
    "job_resumed",
    "job_finished",
    "directory_site",
    "directory_error",
    "directory_finished",
]
EVENT_RECORDS: dict[str, type] = {
    "job_started": JobStarted,
    "site_state": SiteStateEvent,
    "reply": Reply,
    "aggregate": Aggregate,
    "round_discarded": RoundDiscarded,
    "site_error": SiteError,
    "update_rejected": UpdateRejected,
    "secure_aggregation": SecureAggregation,
    "job_resumed": JobResumed,
    "job_finished": JobFinished,
    "directory_site": DirectorySite,
    "directory_error": DirectoryError,
    "directory_finished": DirectoryFinished,
}
