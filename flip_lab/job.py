"""Job handles: a running study seen from the notebook.

``Federation.submit`` returns a ``Job`` at once. A background thread reads the hub's event lines through Flower's
Control API and fills ``job.events`` and ``job.history`` while the study runs; subscribers (the dashboard, the
server extension) are called for each event and can never raise into the researcher's code. Every event is also
written to the job's folder, so re-attaching by id (after a kernel restart, or once the hub has forgotten a finished
run's log) rebuilds the same history.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flip_common.protocol import FINAL, WEIGHTS_PREFIX, event_of

from ._flower import ControlClient
from ._sourcemap import describe
from .errors import HubUnreachable, JobFailed, JobTimeout, NoModelReleased
from .history import History
from .jobview import JobView

log = logging.getLogger("flip_lab")
Subscriber = Callable[[dict[str, Any]], None]
# Beside a job: each line of the plan it sent, as the cell, line and text the researcher wrote (flip_lab._sourcemap).
PLAN_LINES = "plan_lines.json"
_PLAN_LINE = re.compile(r"\bat plan\.py line (\d+)\b")  # how a site names a line (site_kernel.egress)


class Job:
    """A study on a federation. See ``status``, ``round``, ``history``, ``wait``, ``cancel``, ``final_weights``."""

    def __init__(
        self,
        client: ControlClient,
        job_id: int,
        store: Path,
        *,
        rounds: int | None = None,
        plan_hash: str = "",
        follow: bool = True,
    ) -> None:
        self._client = client
        self.id = job_id
        self.store = store
        self.store.mkdir(parents=True, exist_ok=True)
        self.plan_hash = plan_hash
        self._rounds = rounds  # what the submitter asked for, until the hub's job_started says
        self.events: list[dict[str, Any]] = []
        # Each event once: a job folder may be followed by two processes at a time (a notebook's kernel and the
        # Jupyter server's panel), so its events.jsonl, and the stream position, can repeat events.
        self._seen: set[str] = set()
        self.view = JobView()  # the events folded (flip_lab.jobview), read under the job's lock
        self._subscribers: list[Subscriber] = []
        self._weights_chunks: dict[int, str] = {}
        self._weights_total = 0
        self._weights: bytes | None = None
        self._finished = threading.Event()
        self._lock = threading.RLock()
        self._last_ts = 0.0
        self._buffer = ""
        self._load_store()
        if follow and self.status not in FINAL:
            threading.Thread(target=self._follow, name=f"flip-job-{job_id}", daemon=True).start()
        elif self.status in FINAL:
            self._finished.set()

    def _ipython_display_(self) -> None:
        """In a notebook, a job shows itself as its live dashboard (a static summary once it is over)."""
        from .dashboard import show

        if show(self) is None:
            print(repr(self))

    # -- the job's state, as folded from its events ---------------------------------------------------------
    @property
    def status(self) -> str:
        """pending, running, completed, failed or cancelled (``flip_common.protocol.JobStatus``)."""
        return self.view.status

    @property
    def message(self) -> str:
        return self.view.message

    @property
    def rounds(self) -> int | None:
        return self.view.rounds or self._rounds

    @property
    def round(self) -> int:
        """The round in progress: the highest round any site or aggregate has reached."""
        return self.view.round

    @property
    def released(self) -> int:
        """The rounds completed: the highest round with a released aggregate."""
        return self.view.released

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The site errors, rejected updates and discarded rounds, as their events."""
        return self.view.errors

    @property
    def site_states(self) -> dict[str, dict[str, Any]]:
        """Per site that has reported one, its latest state (``state``, ``round``, ``detail``)."""
        with self._lock:
            return {
                name: {"site": name, "state": s.state, "round": s.round, "detail": s.detail}
                for name, s in self.view.sites.items()
                if s.reported
            }

    def __repr__(self) -> str:
        rounds = f"{self.round}/{self.rounds}" if self.rounds else str(self.round)
        return f"<Job {self.id} {self.status} round {rounds}>"

    # -- events --------------------------------------------------------------------------------------
    def subscribe(self, callback: Subscriber, *, replay: bool = True) -> None:
        """Call ``callback(event)`` for every event (past ones too when ``replay``), from a background thread."""
        with self._lock:
            self._subscribers.append(callback)
            past = list(self.events) if replay else []
        for event in past:
            self._notify(callback, event)

    def _notify(self, callback: Subscriber, event: dict[str, Any]) -> None:
        try:
            callback(event)
        except Exception:  # a display's bug must never break the job or the researcher's cell
            log.exception("a job subscriber failed on a %s event", event.get("type"))

    def _apply(self, event: dict[str, Any], *, persist: bool = True) -> None:
        with self._lock:
            identity = json.dumps(event, sort_keys=True)
            if identity in self._seen:
                return
            self._seen.add(identity)
            self.events.append(event)
            self.view.apply(event)
            if persist:
                with open(self.store / "events.jsonl", "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(event) + "\n")
            subscribers = list(self._subscribers)
        for callback in subscribers:
            self._notify(callback, event)
        if self.status in FINAL and event.get("type") == "job_finished":
            self._finished.set()

    def _load_store(self) -> None:
        events = self.store / "events.jsonl"
        if events.exists():
            for line in events.read_text().splitlines():
                if line.strip():
                    self._apply(json.loads(line), persist=False)
        meta = self.store / "stream.json"
        if meta.exists():
            self._last_ts = float(json.loads(meta.read_text()).get("after", 0.0))
        weights = self.store / "final_weights.safetensors"
        if weights.exists():
            self._weights = weights.read_bytes()

    # -- following the hub -----------------------------------------------------------------------------
    def _follow(self) -> None:
        failures = 0
        while not self._finished.is_set():
            try:
                for text, ts in self._client.stream_logs(self.id, self._last_ts):
                    self._consume(text)
                    self._last_ts = ts
                    (self.store / "stream.json").write_text(json.dumps({"after": ts}))
                    failures = 0
                    if self._finished.is_set():
                        return
                self._check_final_status()
            except HubUnreachable as err:
                if self._finished.is_set():
                    return
                failures += 1
                if failures == 1:
                    log.warning("%s; retrying", err)
                if failures > 30:
                    self._settle("failed", f"lost contact with the hub: {err}")
                    return
            except Exception as err:  # e.g. the hub forgot a finished run: settle from what we know
                log.debug("log stream ended: %s", err)
                self._check_final_status()
            if not self._finished.is_set():
                time.sleep(0.5)

    def _check_final_status(self) -> None:
        try:
            info = self._client.run(self.id)
        except HubUnreachable:
            return
        if info is None:
            self._settle("failed", "the hub no longer knows this job")
        elif info.status == "finished":
            time.sleep(0.3)  # the last log upload can trail the status change
            try:
                for text, ts in self._client.stream_logs(self.id, self._last_ts):
                    self._consume(text)
                    self._last_ts = ts
            except Exception:
                pass
            status = info.job_status
            detail = info.details or "the hub's run ended without a final report"
            self._settle(status, detail if status != "cancelled" else "cancelled")

    def _settle(self, status: str, message: str) -> None:
        """The run ended without (or before) our own final event: record Flower's verdict."""
        if self.status not in FINAL:
            self._apply(
                {
                    "type": "job_finished",
                    "status": status,
                    "message": message,
                    "rounds_completed": self.released,
                    "t": time.time(),
                }
            )
        self._finished.set()

    def _consume(self, text: str) -> None:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for raw in lines:
            try:
                event = event_of(raw)
            except json.JSONDecodeError:
                log.warning("unreadable event line from the hub")
                continue
            if event is not None:
                self._apply(event)
                continue
            idx = raw.find(WEIGHTS_PREFIX)
            if idx >= 0:
                self._weights_line(raw[idx + len(WEIGHTS_PREFIX) :])

    def _weights_line(self, rest: str) -> None:
        _round, index, total, chunk = [*rest.split(" ", 3), ""][:4]
        self._weights_chunks[int(index)] = chunk.strip()
        self._weights_total = int(total)
        if len(self._weights_chunks) == self._weights_total:
            blob = "".join(self._weights_chunks[i] for i in range(self._weights_total))
            self._weights = base64.b64decode(blob)
            (self.store / "final_weights.safetensors").write_bytes(self._weights)

    # -- the researcher's verbs -------------------------------------------------------------------------
    @property
    def history(self) -> Any:
        """A pandas DataFrame (round, site, phase, metric, value); aggregated rows have site ``"aggregate"``."""
        return History(self.view.rows).frame()

    def metric(self, name: str, *, phase: str = "evaluate", site: str = "aggregate") -> Any:
        """One metric over rounds as a pandas Series, e.g. ``job.metric("dice")``."""
        return History(self.view.rows).metric(name, phase=phase, site=site)

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def wait(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> Job:
        """Block until the job ends (or ``timeout`` seconds pass: ``JobTimeout``, the job keeps running)."""
        if not self._finished.wait(timeout):
            raise JobTimeout(self.id, timeout or 0.0, self.status)
        if raise_on_failure and self.status == "failed":
            raise JobFailed(self.id, self.describe_failure())
        return self

    def describe_failure(self) -> str:
        """Why the job failed: the sites' errors first (the cause), then what the hub did about them."""
        sites_by_cause: dict[str, list[str]] = {}
        for err in self.errors:
            if err["type"] == "site_error":
                cause = err.get("message") or err.get("kind", "an error")
                # A site names itself at the end of its message; the grouping below names the sites once.
                cause = self.in_cells(cause.removesuffix(f" at site {err['site']}"))
            elif err["type"] == "update_rejected":
                cause = f"the hub rejected the update ({err.get('reason', 'no reason given')})"
            else:
                continue
            sites = sites_by_cause.setdefault(cause, [])
            if err["site"] not in sites:
                sites.append(err["site"])
        causes = []
        for cause, sites in sites_by_cause.items():
            others = len(sites) - 1
            more = f" (and {others} other site{'s' if others > 1 else ''})" if others else ""
            causes.append(f"{cause}, at site {sites[0]}{more}")
        if causes and self.message:
            return f"{'; '.join(causes)}; as a result {self.message}"
        return "; ".join(causes) or self.message

    def in_cells(self, message: str) -> str:
        """A site's message with its "at plan.py line 12" told as the researcher wrote it: "at cell In[5], line 7
        (`loss = model(x)`)". The site sends the line number only where its policy allows (``error_line_numbers``);
        the cells are those the plan was assembled from when it was submitted here."""
        match = _PLAN_LINE.search(message)
        if match is None:
            return message
        try:
            where = json.loads((self.store / PLAN_LINES).read_text()).get(match.group(1))
        except (OSError, ValueError):  # submitted elsewhere, or before the lab kept its lines
            return message
        if not isinstance(where, dict):
            return message
        return f"{message[: match.start()]}at {describe(where)}{message[match.end() :]}"

    def cancel(self) -> None:
        """Stop the study at the hub; sites drop the job's worker when the run stops."""
        if not self.done:
            self._client.stop_run(self.id)
            self._settle("cancelled", "cancelled by the researcher")

    def final_weights(self) -> dict[str, Any]:
        """The last released global model as a torch state dict, read from safetensors (nothing unpickled)."""
        from safetensors.torch import load

        if self._weights is None:
            if self.status == "failed":
                raise JobFailed(self.id, f"{self.describe_failure()}; no global model was released")
            raise NoModelReleased(self.id, self.status, self._why_no_model())
        return load(self._weights)

    def audit_heads(self) -> dict[str, str]:
        """Per site, the last audit head received from it, for ``flip-site audit verify
        --expected-head`` there: a log cut back or wiped after sending it fails that check."""
        with self._lock:
            return self.view.audit_heads()

    def _why_no_model(self) -> str:
        released = max(
            (int(e["round"]) for e in self.events if e.get("type") == "aggregate" and e.get("phase") == "train"),
            default=0,
        )
        of = f" of {self.rounds}" if self.rounds else ""
        if self.status == "pending":
            return (
                f"job {self.id} has not started yet (it waits for the sites and their approval): "
                "wait for it with job.wait()"
            )
        if self.status == "running":
            return f"job {self.id} is still running (round {max(self.round, 1)}{of}): wait for it with job.wait()"
        if self.status == "cancelled":
            if not released:
                return f"job {self.id} was cancelled before any round was released: there is no global model"
            return (
                f"job {self.id} was cancelled after round {released}{of} was released; the hub sends the "
                "model when a job finishes on its own, so a cancelled job's model does not come back: "
                "submit the study again to get one"
            )
        return (
            f"job {self.id} {self.status} but its global model has not reached this notebook: "
            f"re-attach with fed.job({self.id})"
        )

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "status": self.status,
            "round": self.round,
            "rounds": self.rounds,
            "plan_hash": self.plan_hash,
            "message": self.message,
            "sites": {k: v.get("state") for k, v in self.site_states.items()},
        }
