"""The one adapter over Flower's internal Control API modules.

Flower 1.42 exposes run submission, run listing, log streaming and run stopping only through internal modules
(``flwr.supercore.control``, ``flwr.proto``). Everything FLIP Lab needs from them goes through this file, so a Flower
upgrade touches one place; ``pyproject.toml`` pins the minor version for the same reason.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from .errors import HubUnreachable

# Flower reports telemetry and checks for updates by default; a hospital deployment must not phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


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

    def unregister_node(self, node_id: int) -> None:
        """Remove a node the hub should no longer count on (its process is known to be dead): the hub lists it as
        unregistered at once and answers messages to it with an error, as it does when a heartbeat expires. Only
        hubs without node authentication accept it from here; a site that comes back registers as a new node."""
        from flwr.proto.control_pb2 import UnregisterNodeRequest

        try:
            self._call("UnregisterNode", UnregisterNodeRequest(node_id=node_id))
        except httpx.HTTPStatusError as err:  # refused, e.g. the node is gone already
            raise HubUnreachable(self.address, f"the hub refused to unregister node {node_id}: {err}") from err

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
