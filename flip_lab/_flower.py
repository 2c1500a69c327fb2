"""The lab's and the hub's one Flower compatibility module: every use and every patch of Flower's internals.

Flower 1.42 exposes run submission, run listing, log streaming and run stopping only through internal modules
(``flwr.supercore.control``, ``flwr.proto``): :class:`ControlClient`. The hub's study process does what
``flwr-serverapp`` does, which takes three of Flower's private names (:func:`study_runtime`). A local federation
learns its sites' node ids from what their SuperNodes log (:func:`supernode_id`). Everything FLIP Lab needs from
Flower's internals on this side goes through this file, and each such reliance is checked where it starts (a study,
a local federation) with :class:`~flip_common.flower.FlowerChanged` naming the internal that changed: a Flower
upgrade fails loudly in one place, never as a silent no-op. ``pyproject.toml`` pins the minor version for the same
reason; the site's side is ``site_kernel._flower_runtime``, what both sides share :mod:`flip_common.flower`;
``tests/test_flower_compat.py`` runs every check against the installed Flower.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from flip_common.flower import expect

from .errors import HubUnreachable

# Flower reports telemetry and checks for updates by default; a hospital deployment must not phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


def _module_source(module: str) -> str:
    """A Flower module's source, read without importing it (a local federation need not import the SuperNode)."""
    spec = importlib.util.find_spec(module)
    expect(spec is not None and spec.origin is not None, module, "that module")
    with open(spec.origin, encoding="utf-8") as fh:  # type: ignore[union-attr]
        return fh.read()


@dataclass(frozen=True)
class RunInfo:
    run_id: int
    status: str  # pending | starting | running | finished
    sub_status: str  # completed | failed | stopped | ""
    details: str
    fab_hash: str
    pending_at: str
    finished_at: str
    fab_id: str = ""  # "publisher/project" of the run's bundle, e.g. flip-lab/flip-plan-NAME

    @property
    def job_status(self) -> str:
        """Map Flower's status pair onto FLIP Lab's job status words."""
        if self.status != "finished":
            return self.status
        return {"completed": "completed", "stopped": "cancelled"}.get(self.sub_status, "failed")


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    status: str  # "online" | "offline" | "registered" | "unregistered"
    last_seen: str


class ControlClient:
    """A connection to a SuperLink's Control API.

    >>> client = ControlClient("127.0.0.1:9093")      # doctest: +SKIP
    >>> run_id = client.start_run(fab_bytes)           # doctest: +SKIP
    """

    def __init__(
        self, address: str, *, root_certificates: bytes | str | None = None, insecure: bool | None = None
    ) -> None:
        from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
        from flwr.supercore.control.control_http_client import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        if insecure is None:
            insecure = root_certificates is None
        self.address = address
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=insecure,
            root_certificates=root_certificates,
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
            ],
        )

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._client, method)(request)
        except httpx.TransportError as err:
            raise HubUnreachable(self.address, str(err)) from err

    def start_run(self, fab_bytes: bytes, override_config: dict[str, Any] | None = None) -> int:
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(override_config or {}))
        response = self._call("StartRun", request)
        if not response.HasField("run_id"):
            raise HubUnreachable(self.address, "the hub did not accept the run")
        return int(response.run_id)

    def list_runs(self, run_id: int | None = None) -> list[RunInfo]:
        from flwr.proto.control_pb2 import ListRunsRequest

        request = ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest()
        response = self._call("ListRuns", request)
        runs = [
            RunInfo(
                run_id=int(r.run_id),
                status=r.status.status,
                sub_status=r.status.sub_status,
                details=r.status.details,
                fab_hash=r.fab_hash,
                pending_at=r.pending_at,
                finished_at=r.finished_at,
                fab_id=r.fab_id,
            )
            for r in response.run_dict.values()
        ]
        return sorted(runs, key=lambda r: r.pending_at)

    def run(self, run_id: int) -> RunInfo | None:
        """The run ``run_id``, or None where the hub knows no such run."""
        try:
            runs = self.list_runs(run_id)
        except httpx.HTTPStatusError as err:
            if err.response.status_code == 404:  # Flower answers an unknown run id with NOT_FOUND
                return None
            raise
        return runs[0] if runs else None

    def stop_run(self, run_id: int) -> bool:
        from flwr.proto.control_pb2 import StopRunRequest

        return bool(self._call("StopRun", StopRunRequest(run_id=run_id)).success)

    def stream_logs(self, run_id: int, after_timestamp: float = 0.0) -> Iterator[tuple[str, float]]:
        """Yield ``(text, latest_timestamp)`` chunks until the run finishes or the stream breaks."""
        from flwr.proto.control_pb2 import StreamLogsRequest

        request = StreamLogsRequest(run_id=run_id, after_timestamp=after_timestamp)
        try:
            for response in self._client.StreamLogs(request):
                yield response.log_output, response.latest_timestamp
        except httpx.TransportError as err:
            raise HubUnreachable(self.address, str(err)) from err

    def list_nodes(self) -> list[NodeInfo]:
        from flwr.proto.control_pb2 import ListNodesRequest

        response = self._call("ListNodes", ListNodesRequest())
        return [
            NodeInfo(node_id=int(n.node_id), status=n.status, last_seen=getattr(n, "last_activated_at", ""))
            for n in response.nodes_info
        ]

    def register_node(self, public_key_pem: bytes, name: str) -> int:
        """Admit a SuperNode by its public key (what ``flwr supernode register`` does); returns its node id.

        Raises ``httpx.HTTPStatusError`` carrying Flower's error (e.g. the key is already registered).
        """
        from flwr.proto.control_pb2 import RegisterNodeRequest

        response = self._call("RegisterNode", RegisterNodeRequest(public_key=public_key_pem, name=name))
        return int(response.node_id)


def build_fab(files: dict[str, bytes]) -> bytes:
    """Build a Flower bundle from in-memory text files (``pyproject.toml`` included)."""
    from flwr.cli.build import build_fab_from_files

    return build_fab_from_files(files)[0]


# -- a site's node id, as its SuperNode logs it ------------------------------------------------------------------------
SUPERNODE_ID_LOG = "SuperNode ID: %s"  # flwr.supernode.start_client_internal logs this once the hub admitted the node
_SUPERNODE = "flwr.supernode.start_client_internal"


def check_supernode_id_log() -> None:
    """Raise :class:`~flip_common.flower.FlowerChanged` unless Flower's SuperNode still logs its node id as
    :data:`SUPERNODE_ID_LOG`."""
    expect(
        f'"{SUPERNODE_ID_LOG}", node_id' in _module_source(_SUPERNODE),
        f"{_SUPERNODE}.start_client_internal",
        f"the log line {SUPERNODE_ID_LOG!r} naming the node id the hub gave the SuperNode",
    )


def supernode_id(log_text: str) -> int | None:
    """The node id a SuperNode's log names last (a restarted one may have another), or None before the hub admitted
    it. :func:`check_supernode_id_log` says whether Flower still logs it so."""
    prefix = SUPERNODE_ID_LOG.split("%s")[0]
    node = None
    for line in log_text.splitlines():
        if prefix in line:
            node = int(line.rsplit(":", 1)[1].strip())
    return node


# -- the hub's study process (flip_lab.hub.study): what flwr-serverapp does with Flower's private names -------------
def study_runtime(grid: Any) -> Any:
    """The Runtime API client of a study's ``HttpGrid`` (Flower keeps it private, as ``_runtime_client``; the
    study pulls its task's input and pushes its output through it, as ``flwr-serverapp`` does)."""
    client = getattr(grid, "_runtime_client", None)
    expect(
        client is not None and hasattr(client, "PullTaskInput") and hasattr(client, "PushTaskOutput"),
        "flwr.superlink.grid.HttpGrid._runtime_client",
        "the grid's Runtime API client, with PullTaskInput and PushTaskOutput",
    )
    return client


def check_study(grid: Any) -> None:
    """Raise :class:`~flip_common.flower.FlowerChanged` unless the study's grid and Flower's task identity are still
    what :func:`study_runtime`, :func:`set_task_identity` and :func:`stop_retrying` take; called as a study
    starts."""
    from flwr.supercore.task_identity import TaskIdentity

    study_runtime(grid)
    expect(
        hasattr(getattr(grid, "_retry_invoker", None), "max_tries"),
        "flwr.superlink.grid.HttpGrid._retry_invoker",
        "the grid's retry policy, with max_tries",
    )
    for name in ("task_id", "run_id", "node_id"):  # settable properties of its class: plain attributes go unread
        setter = getattr(getattr(type(TaskIdentity), name, None), "fset", None)
        expect(
            setter is not None,
            f"flwr.supercore.task_identity.TaskIdentity.{name}",
            "the identity Flower's grid names its messages by, set by the process that runs the task",
        )


def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Name the study's messages by its task, as ``flwr-serverapp`` does (Flower's grid reads ``TaskIdentity``)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def stop_retrying(grid: Any) -> None:
    """From here on the grid's calls are tried once (the SuperLink may be gone: a study ending does not wait on it)."""
    grid._retry_invoker.max_tries = 1
