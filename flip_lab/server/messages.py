"""What the server extension says to the side panel: REST bodies and event-stream messages, written down once.

The TypeScript side mirrors these in ``extensions/flip-lab/src/types.ts``. Job ids travel as strings: Flower's run
ids are 64-bit and would lose digits as JavaScript numbers. Hub events (``flip_common.protocol.Event``) are forwarded
unchanged inside ``JobEventMessage``; everything else is shaped here, so the panel never has to interpret raw
Flower or catalogue records.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

ConnectionState = Literal[
    "disconnected",  # no federation chosen
    "starting",  # a local federation is being started
    "connected",  # the hub answers
    "unreachable",  # the hub stopped answering; polling continues and recovers on its own
    "stopping",  # the local federation is being stopped
    "stopped",  # the local federation ended outside the panel (or with the previous Jupyter server)
    "failed",  # starting a local federation failed; ``message`` says why
]
ConnectionKind = Literal["local", "remote"]
SiteLiveness = Literal["online", "offline", "unknown"]


class ConnectionInfo(TypedDict):
    state: ConnectionState
    kind: ConnectionKind | None
    address: str  # host:port of the hub, "" when disconnected
    workdir: str  # a local federation's folder ("" for a remote hub): what flip_lab.attach() takes
    ca_file: str  # path of the hub's CA certificate for a TLS hub ("" for none): public, not a secret
    message: str  # one sentence for a person; "" when there is nothing to say


class SiteRow(TypedDict):
    site: str
    state: SiteLiveness
    last_seen: float | None  # epoch seconds when the site was last seen online
    drops: int  # times the site went offline in the last ten minutes (a flapping site)
    datasets: str  # e.g. "MR · 60 cases (45 train, 15 test) · labelled"; "" when the hub does not publish one


class SiteErrorNote(TypedDict):
    site: str
    round: int
    kind: str
    message: str


class JobSummary(TypedDict):
    id: str
    status: str  # flip_common.protocol.JobStatus
    # "round k of n" means the same in the panel and the notebook's dashboard (flip_lab.display.round_words): while
    # a job runs, k is the round in progress; once it ends, the rounds completed.
    round: int  # the highest round any site or aggregate has reached: the round in progress
    released: int  # rounds whose aggregate the hub released: the rounds completed
    rounds: int | None
    message: str
    submitted: str  # ISO time the hub accepted the run
    strategy: str
    metrics: dict[str, list[tuple[int, float]]]  # aggregated evaluate metrics: name -> [(round, value)]
    site_states: dict[str, str]  # site -> flip_common.protocol.SiteState
    errors: list[SiteErrorNote]  # the most recent few site errors, rejections and discarded rounds


class SnapshotMessage(TypedDict):
    type: Literal["snapshot"]
    connection: ConnectionInfo
    sites: list[SiteRow]
    jobs: list[JobSummary]


class ConnectionMessage(TypedDict):
    type: Literal["connection"]
    connection: ConnectionInfo


class SitesMessage(TypedDict):
    type: Literal["sites"]
    sites: list[SiteRow]


class JobMessage(TypedDict):
    """A job appeared, or its hub-side status changed: replaces the panel's record of it."""

    type: Literal["job"]
    job: JobSummary


class JobEventMessage(TypedDict):
    """One hub event of one job, to be folded into the panel's record.

    The server folds it with ``flip_lab.jobview.fold``; ``views.job_summary`` reads the result.
    """

    type: Literal["job_event"]
    job_id: str
    event: dict[str, Any]


StreamMessage = SnapshotMessage | ConnectionMessage | SitesMessage | JobMessage | JobEventMessage
