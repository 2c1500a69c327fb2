"""The side panel's state on the server: which federation it watches, that federation's sites and its jobs.

``FederationManager`` is plain Python (no Tornado, no HTTP), so it is tested directly. It holds at most one
connection: a local federation (started here, or found running in a folder, e.g. by ``flip-lab up``) or a remote hub
by address. Credentials (a hub's CA file) stay here; the panel gets ``messages.ConnectionInfo``.

Jobs are Flower runs on the hub, so jobs submitted from a notebook, papermill or the command line appear too: every
``poll`` lists them with ``Federation.jobs()`` and attaches with ``Federation.job(id)``, whose follower thread streams
the hub's events. The manager keeps its own job store (``STORE/hubs/``), never the notebook's, so two followers of
one run never append to the same ``events.jsonl``.

Changes reach listeners as ``messages.StreamMessage`` dicts (deep copies), called from whichever thread noticed them
(a poll, a job's follower, a background start) with the manager's lock held, so a listener added by ``subscribe``
sees every change after its snapshot exactly once. Listeners must return quickly. Every other public method may
wait on the hub for seconds: call them off the server's event loop.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from .._flower import RunInfo
from ..errors import FederationError, FlipError, HubUnreachable, JobNotFound
from ..local import LocalFederation
from ..supervisor import running_state
from . import connection as connections
from .connection import Connection
from .messages import (
    ConnectionInfo,
    ConnectionState,
    JobSummary,
    SiteRow,
    SnapshotMessage,
    StreamMessage,
)
from .views import JobBoard, SiteBoard, dataset_summary

log = logging.getLogger("flip_lab.server")
Listener = Callable[[StreamMessage], None]
MAX_LOCAL_SITES = 16


class PanelError(FlipError):
    """A panel request that cannot be done now; ``reason`` is a short word the handlers map to an HTTP status."""

    reason = "bad_request"


class NotConnected(PanelError):
    reason = "not_connected"


class UnknownJob(PanelError):
    reason = "unknown_job"


class Busy(PanelError):
    reason = "busy"


class FederationManager:
    """One federation connection and what the panel shows of it.

    >>> manager = FederationManager(Path("~/.flip-lab/lab").expanduser())   # doctest: +SKIP
    >>> manager.start_local(2); manager.sites()                             # doctest: +SKIP
    """

    def __init__(
        self,
        store: Path,
        *,
        local_options: dict[str, Any] | None = None,
        max_jobs: int = 20,
        stop_local_on_exit: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = Path(store)
        self.local_workdir = self.store / "local"
        self.local_options = dict(local_options or {})
        self.max_jobs = max_jobs
        self.stop_local_on_exit = stop_local_on_exit
        self._clock = clock
        self._lock = threading.RLock()  # guards the state below; never held while waiting on the hub
        self._op = threading.Lock()  # one connect/start/stop at a time
        self._conn: Connection | None = None
        self._generation = 0  # bumped on every connection change; late callbacks of older ones are dropped
        self._info: ConnectionInfo = connections.info("disconnected")
        self._sites = SiteBoard()
        self._datasets: dict[str, str] = {}
        self._jobs = JobBoard()
        self._listeners: list[Listener] = []

    # -- what the panel reads ---------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> SnapshotMessage:
        """Add ``listener`` and return the snapshot it starts from; later changes arrive through it."""
        with self._lock:
            self._listeners.append(listener)
            return self.snapshot()

    def unsubscribe(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def snapshot(self) -> SnapshotMessage:
        with self._lock:
            snapshot: SnapshotMessage = {
                "type": "snapshot",
                "connection": self._info,
                "sites": self._sites.rows(),
                "jobs": self._jobs.rows(),
            }
            return copy.deepcopy(snapshot)

    def connection(self) -> ConnectionInfo:
        with self._lock:
            return copy.deepcopy(self._info)

    def sites(self) -> list[SiteRow]:
        with self._lock:
            return copy.deepcopy(self._sites.rows())

    def jobs(self) -> list[JobSummary]:
        with self._lock:
            return copy.deepcopy(self._jobs.rows())

    def catalogue(self) -> dict[str, Any]:
        """Each site's public catalogue (counts, modalities, ranges; no identifiers), by site name; a remote hub's
        sites answer through it (``Federation.catalogue``)."""
        conn = self._require()
        return conn.local.catalogue() if conn.local is not None else conn.hub.catalogue()

    # -- choosing a federation ----------------------------------------------------------------------------
    def connect(self, address: str = "", *, workdir: str = "", ca_file: str = "") -> ConnectionInfo:
        """Watch the hub at ``address``, or the local federation running in ``workdir`` (give one of the two).

        Raises ``HubUnreachable`` when the hub does not answer, ``FederationError`` when nothing runs in ``workdir``.
        """
        if bool(address) == bool(workdir):
            raise PanelError("give either a hub address (host:port) or the folder of a local federation")
        with self._exclusive("connecting"):
            if workdir:
                conn = self._open_local(LocalFederation.attach(workdir))
            else:
                conn = connections.open_remote(self.store, address, ca_file)
            self._replace(conn, "connected", conn.describe())
        self.poll()
        return self.connection()

    def disconnect(self) -> ConnectionInfo:
        """Stop watching; the federation itself keeps running."""
        with self._exclusive("disconnecting"):
            self._replace(None, "disconnected", "")
        return self.connection()

    def start_local(self, n_sites: int, *, wait: bool = True) -> ConnectionInfo:
        """Start a hub and ``n_sites`` simulated hospitals in ``STORE/local`` (or use the one already there).

        With ``wait=False`` the start runs in the background: the state is ``starting`` at once and listeners hear
        ``connected`` or ``failed`` (with the reason in words) when it ends.
        """
        if not isinstance(n_sites, int) or isinstance(n_sites, bool) or not 1 <= n_sites <= MAX_LOCAL_SITES:
            raise PanelError(f"a local federation needs between 1 and {MAX_LOCAL_SITES} sites, got {n_sites!r}")
        if not self._op.acquire(blocking=False):
            raise Busy("another start, stop or connect is under way; wait for it to finish")
        try:
            with self._lock:
                local = self._conn.local if self._conn is not None else None
            if local is not None and running_state(local.workdir) is not None:
                raise Busy(f"a local federation is already running in {local.workdir}; stop it first")
            # No promise of a duration: it ranges from seconds to minutes with the machine's load and the sites'
            # size (docs/architecture.md, "Local federation"); the panel counts the seconds instead.
            self._replace(
                None,
                "starting",
                f"Starting a hub and {n_sites} simulated hospitals on this machine: their sites connect to the hub "
                "as it starts (a first start also generates the hospitals' images, which later starts reuse).",
            )
        except BaseException:
            self._op.release()
            raise
        if not wait:
            threading.Thread(
                target=self._start_local, args=(n_sites, False), name="flip-lab-start", daemon=True
            ).start()
            return self.connection()
        self._start_local(n_sites, True)
        return self.connection()

    def _start_local(self, n_sites: int, raise_errors: bool) -> None:
        try:
            if running_state(self.local_workdir) is not None:  # e.g. left by a Jupyter server that was killed
                local = LocalFederation.attach(self.local_workdir)
            else:
                shutil.rmtree(self.local_workdir, ignore_errors=True)  # the manager's own folder: a fresh demo
                local = LocalFederation.start(
                    n_sites, workdir=self.local_workdir, watch_parent=False, **self.local_options
                )
            conn = self._open_local(local)
            self._replace(conn, "connected", conn.describe())
        except Exception as err:
            detail = str(err) if isinstance(err, FlipError) else f"{type(err).__name__}; see the Jupyter server log"
            if not isinstance(err, FlipError):
                log.exception("starting the local federation failed")
            self._replace(None, "failed", f"The local federation did not start: {detail}")
            if raise_errors:
                raise err if isinstance(err, FlipError) else FederationError(detail) from err
            return
        finally:
            self._op.release()
        self.poll()

    def stop_local(self) -> ConnectionInfo:
        """Stop the hub and every site of the local federation being watched, by PID."""
        with self._exclusive("stopping"):
            with self._lock:
                conn = self._conn
            if conn is None or conn.local is None:
                raise NotConnected("no local federation is being watched; nothing to stop")
            self._set_state("stopping", "Stopping the hub and the sites ...")
            try:
                conn.local.shutdown()
            finally:
                self._replace(None, "disconnected", "The local federation was stopped.")
        return self.connection()

    def restore(self) -> ConnectionInfo:
        """Pick up the connection saved by an earlier Jupyter server (called once when the server starts)."""
        saved = connections.load(self.store)
        if saved is None:
            return self.connection()
        with self._exclusive("restoring"):
            if saved.get("kind") == "local":
                workdir = Path(saved["workdir"])
                if running_state(workdir) is None or saved.get("stopped"):
                    connections.forget(self.store)
                    self._replace(
                        None,
                        "stopped",
                        "The local federation stopped with the previous Jupyter server; "
                        "start it again when you need it.",
                    )
                    return self.connection()
                conn = self._open_local(LocalFederation.attach(workdir))
            else:
                conn = connections.open_remote(
                    self.store, saved["address"], saved.get("ca_file", ""), must_answer=False
                )
            self._replace(conn, "connected", conn.describe())
        self.poll()
        return self.connection()

    def close(self) -> None:
        """The Jupyter server is stopping: stop the local federation this manager started (if so configured)."""
        with self._lock:
            conn = self._conn
            self._listeners.clear()
        if conn is None:
            return
        if conn.local is not None and self.stop_local_on_exit and conn.local.workdir == self.local_workdir:
            conn.local.shutdown()
            connections.save(self.store, conn, stopped=True)
        conn.release()

    # -- jobs ------------------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> JobSummary:
        """Stop a job at the hub; sites drop its worker. Cancelling a job that has ended changes nothing."""
        conn = self._require()
        with self._lock:
            if job_id not in self._jobs:
                raise UnknownJob(f"job {job_id} is not on the hub at {conn.address}; refresh the job list")
        try:
            job = conn.hub.job(int(job_id))
        except JobNotFound as err:
            raise UnknownJob(f"the hub at {conn.address} no longer knows job {job_id}") from err
        job.cancel()
        with self._lock:
            summary = self._jobs.get(job_id)
            if summary is None:  # the connection changed meanwhile
                raise UnknownJob(f"job {job_id} is no longer listed; refresh the job list")
            return copy.deepcopy(summary)

    # -- polling -------------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Ask the hub for its sites and jobs once; tell listeners what changed. Never raises for a lost hub."""
        with self._lock:
            conn, generation = self._conn, self._generation
            if conn is None or self._info["state"] in ("starting", "stopping"):
                return
        try:
            rows = conn.local.sites() if conn.local is not None else conn.hub.sites()
            runs = conn.hub.jobs()[-self.max_jobs :]
            with self._lock:
                unknown = {str(row["site"]) for row in rows} - set(self._datasets)
            # sites the panel has no summary of yet (a remote hub's, or ones that joined a local hub): the
            # directory request behind sites() answered with their catalogues, so this asks the hub nothing new
            found = (conn.local or conn.hub).catalogue() if unknown else {}
        except HubUnreachable as err:
            self._lost_contact(conn, generation, err)
            return
        with self._lock:
            if generation != self._generation:
                return
            if self._info["state"] != "connected":
                self._set_state("connected", "The hub answers again. " + conn.describe())
            self._datasets.update({name: dataset_summary(found[name]) if name in found else "" for name in unknown})
            if self._sites.update(rows, self._datasets, self._clock()):
                self._emit({"type": "sites", "sites": self._sites.rows()})
            fresh = [run for run in runs if str(run.run_id) not in self._jobs]
            for run in runs:
                changed = self._jobs.update_from_hub(str(run.run_id), run.job_status, run.details)
                if changed is not None:
                    self._emit({"type": "job", "job": changed})
        for run in fresh:
            self._follow(conn, generation, run)

    def _lost_contact(self, conn: Connection, generation: int, err: HubUnreachable) -> None:
        with self._lock:
            if generation != self._generation:
                return
            if conn.local is not None and running_state(conn.local.workdir) is None:
                state: ConnectionState = "stopped"
                text = (
                    "The local federation is no longer running (it was stopped outside this panel). "
                    "Start it again from here."
                )
            else:
                state, text = "unreachable", f"{err} The panel keeps trying and recovers on its own."
            if self._info["state"] != state or self._info["message"] != text:
                self._set_state(state, text)
            if self._sites.mark_unknown():
                self._emit({"type": "sites", "sites": self._sites.rows()})

    def _follow(self, conn: Connection, generation: int, run: RunInfo) -> None:
        job_id = str(run.run_id)
        with self._lock:
            if generation != self._generation or job_id in self._jobs:
                return
            self._emit({"type": "job", "job": self._jobs.add(job_id, status=run.job_status, submitted=run.pending_at)})
        try:
            job = conn.hub.job(run.run_id)
        except (JobNotFound, HubUnreachable) as err:
            log.info("cannot follow job %s yet: %s", job_id, err)
            with self._lock:
                self._jobs.discard(job_id)  # the next poll tries again
            return
        conn.jobs.append(job)
        job.subscribe(partial(self._on_job_event, generation, job_id), replay=True)

    def _on_job_event(self, generation: int, job_id: str, event: dict[str, Any]) -> None:
        with self._lock:
            if generation == self._generation and self._jobs.apply(job_id, event):
                self._emit({"type": "job_event", "job_id": job_id, "event": event})

    # -- internals -----------------------------------------------------------------------------------------
    @contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._op.acquire(blocking=False):
            raise Busy(f"another start, stop or connect is under way; wait for it before {what}")
        try:
            yield
        finally:
            self._op.release()

    def _require(self) -> Connection:
        with self._lock:
            if self._conn is None:
                raise NotConnected("not connected to a federation: start the local one or connect to a hub first")
            return self._conn

    def _open_local(self, local: LocalFederation) -> Connection:
        conn = connections.open_local(self.store, local)
        self._datasets = {name: dataset_summary(entry) for name, entry in local.catalogue().items()}
        return conn

    def _replace(self, conn: Connection | None, state: ConnectionState, message: str) -> None:
        """Switch to another connection (or none): jobs and sites start afresh and every panel gets a snapshot."""
        with self._lock:
            old, self._conn = self._conn, conn
            self._generation += 1
            self._jobs.clear()
            self._sites.clear()
            if conn is None:
                self._datasets = {}
            self._info = connections.info(state, conn, message)
            self._emit(self.snapshot())
        if old is not None and old is not conn:
            old.release()
        if conn is not None:
            connections.save(self.store, conn)
        elif state in ("disconnected", "failed"):
            connections.forget(self.store)

    def _set_state(self, state: ConnectionState, message: str) -> None:
        with self._lock:
            self._info = connections.info(state, self._conn, message)
            self._emit({"type": "connection", "connection": self._info})

    def _emit(self, message: Any) -> None:
        message = copy.deepcopy(message)
        for listener in list(self._listeners):
            try:
                listener(message)
            except Exception:  # one broken panel connection must not stop the others, or the poller
                log.exception("a panel listener failed on a %s message", message.get("type"))
