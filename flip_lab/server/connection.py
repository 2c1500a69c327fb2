"""One open connection to a federation, as the manager holds it, and how it is opened, described and remembered.

A connection has two handles on the hub: ``hub``, a plain ``Federation`` whose job store is the server's own (so
the server's job followers never write into a notebook's ``events.jsonl``), and, for a local federation, the
``LocalFederation`` that knows its sites, their catalogue and their PIDs. The saved form (``connection.json``)
holds only what is needed to reconnect after a server restart: kind, address, CA file path, folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import HubUnreachable
from ..federation import Federation
from ..job import Job
from ..local import PANEL_CONNECTION, LocalFederation
from .messages import ConnectionInfo, ConnectionKind, ConnectionState

SAVED = PANEL_CONNECTION  # also read by kernels: ``flip_lab.local.panel_federation``


@dataclass
class Connection:
    kind: ConnectionKind
    address: str
    hub: Federation
    local: LocalFederation | None = None
    ca_file: str = ""
    jobs: list[Job] = field(default_factory=list)  # every job followed through ``hub``

    def release(self) -> None:
        # A follower thread still streaming through a closed client would die noisily; an open one settles by
        # itself once the hub is gone, so only close when every followed job has ended.
        if all(job.done for job in self.jobs):
            self.hub.close()

    def describe(self) -> str:
        """One sentence for the panel under "Local federation running" / "Connected to the hub"."""
        if self.local is not None:
            n = len(self.local.site_dirs)
            return f"A hub and {n} simulated hospital{'s' if n != 1 else ''} on this machine."
        return f"Federation hub at {self.address}."


def hub_store(store: Path, address: str) -> Path:
    return store / "hubs" / address.replace(":", "_").replace("/", "_")


def open_remote(store: Path, address: str, ca_file: str = "", *, must_answer: bool = True) -> Connection:
    """Connect to the hub at ``address``; ``HubUnreachable`` if it does not answer and ``must_answer``."""
    hub = Federation(address, root_certificates=ca_file or None, workdir=hub_store(store, address))
    try:
        hub.nodes()
    except HubUnreachable:
        if must_answer:
            hub.close()
            raise
    return Connection("remote", address, hub, ca_file=ca_file)


def open_local(store: Path, local: LocalFederation) -> Connection:
    hub = Federation(local.address, workdir=hub_store(store, local.address))
    return Connection("local", local.address, hub, local=local)


def info(state: ConnectionState, conn: Connection | None = None, message: str = "") -> ConnectionInfo:
    """What the panel is told about a connection (no credentials: a CA file path is public)."""
    if conn is None:
        return {"state": state, "kind": None, "address": "", "workdir": "", "ca_file": "", "message": message}
    workdir = str(conn.local.workdir) if conn.local is not None else ""
    return {
        "state": state,
        "kind": conn.kind,
        "address": conn.address,
        "workdir": workdir,
        "ca_file": conn.ca_file,
        "message": message,
    }


def save(store: Path, conn: Connection, *, stopped: bool = False) -> None:
    saved = {
        "kind": conn.kind,
        "address": conn.address,
        "ca_file": conn.ca_file,
        "workdir": str(conn.local.workdir) if conn.local is not None else "",
        "stopped": stopped,
    }
    store.mkdir(parents=True, exist_ok=True)
    (store / SAVED).write_text(json.dumps(saved))


def load(store: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads((store / SAVED).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def forget(store: Path) -> None:
    (store / SAVED).unlink(missing_ok=True)
