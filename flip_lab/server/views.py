"""What the panel shows, computed from what the hub reports: pure functions and one small tracker, no I/O.

``job_summary`` reads the panel's ``JobSummary`` from a job's events folded by ``flip_lab.jobview``, the fold the
notebook's ``Job`` and dashboard use; ``extensions/flip-lab/src/state.ts`` folds the same events into the same
``JobSummary`` in the browser, so a panel that reconnects gets from the snapshot exactly what it would have built
from the live events.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any

from flip_common.protocol import FINAL

from ..jobview import JobView
from .messages import JobSummary, SiteErrorNote, SiteRow

# The hub events the panel uses; per-site replies stay server side (the notebook dashboard shows those).
PANEL_EVENTS = frozenset(
    {"job_started", "site_state", "aggregate", "round_discarded", "site_error", "update_rejected", "job_finished"}
)
MAX_ERRORS = 5
FLAP_WINDOW_S = 600.0


def job_summary(job_id: str, view: JobView, *, submitted: str = "") -> JobSummary:
    """What the panel shows of a job, read from its events' fold (``flip_lab.jobview``)."""
    notes: list[SiteErrorNote] = [
        {
            "site": str(event.get("site", "")),
            "round": int(event.get("round", 0)),
            "kind": str(event.get("kind", event.get("type"))),
            "message": str(event.get("message") or event.get("reason") or ""),
        }
        for event in view.errors[-MAX_ERRORS:]
    ]
    return {
        "id": job_id,
        "status": view.status,
        "round": view.round,
        "released": view.released,
        "rounds": view.rounds or None,
        "message": view.message,
        "submitted": submitted,
        "strategy": view.strategy,
        "metrics": view.aggregate_series("evaluate"),
        "site_states": {name: site.state for name, site in view.sites.items() if site.reported},
        "errors": notes,
    }


def dataset_summary(catalogue: dict[str, Any]) -> str:
    """One line per site from ``site_kernel.data.public_catalogue``: modality, case counts, labels.

    >>> dataset_summary({"datasets": {"default": {"modality": ["MR"], "cases": 60, "train_cases": 45,
    ...                                           "test_cases": 15, "labelled": True}}})
    'MR · 60 cases (45 train, 15 test) · labelled'
    """
    parts = []
    for name, entry in sorted(catalogue.get("datasets", {}).items()):
        modality = "/".join(entry.get("modality") or []) or "unknown modality"
        text = f"{modality} · {entry.get('cases', 0)} cases"
        if "train_cases" in entry and "test_cases" in entry:
            text += f" ({entry['train_cases']} train, {entry['test_cases']} test)"
        text += " · labelled" if entry.get("labelled") else " · unlabelled"
        parts.append(text if name == "default" else f"{name}: {text}")
    return "; ".join(parts) if parts else "no datasets registered"


class SiteBoard:
    """The sites as the panel shows them, updated from each poll; remembers when each was last seen online and
    how often it dropped out, which is what makes a flapping site visible in words."""

    def __init__(self) -> None:
        self._rows: dict[str, SiteRow] = {}
        self._drops: dict[str, deque[float]] = {}

    def rows(self) -> list[SiteRow]:
        return [dict(row) for row in self._rows.values()]  # type: ignore[misc]

    def clear(self) -> None:
        self._rows.clear()
        self._drops.clear()

    def update(self, sites: list[dict[str, Any]], datasets: dict[str, str], now: float) -> bool:
        """Take ``Federation.sites()`` rows; return whether anything a person would notice changed."""
        before = {name: _visible(row) for name, row in self._rows.items()}
        rows: dict[str, SiteRow] = {}
        for site in sites:
            name = str(site["site"])
            previous = self._rows.get(name)
            online = bool(site.get("online"))
            drops = self._drops.setdefault(name, deque())
            if previous is not None and previous["state"] == "online" and not online:
                drops.append(now)
            while drops and now - drops[0] > FLAP_WINDOW_S:
                drops.popleft()
            last_seen = now if online else (previous["last_seen"] if previous else _epoch(site.get("last_seen")))
            rows[name] = {
                "site": name,
                "state": "online" if online else "offline",
                "last_seen": last_seen,
                "drops": len(drops),
                "datasets": datasets.get(name, ""),
            }
        self._rows = rows
        return before != {name: _visible(row) for name, row in rows.items()}

    def mark_unknown(self) -> bool:
        """The hub is not answering: nobody can tell which sites are online. Return whether that is news."""
        changed = any(row["state"] != "unknown" for row in self._rows.values())
        for row in self._rows.values():
            row["state"] = "unknown"
        return changed


def _epoch(iso: Any) -> float | None:
    """Flower reports times as ISO strings; the panel wants epoch seconds (or nothing)."""
    if not iso:
        return None
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def _visible(row: SiteRow) -> tuple[Any, ...]:
    # last_seen of an online site moves every poll; the panel only needs to hear when something else changes.
    return row["state"], row["drops"], row["datasets"], row["last_seen"] if row["state"] != "online" else None


class JobBoard:
    """The jobs the panel lists: folded from the hub's events and, until those arrive, from Flower's run status."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[JobView, str]] = {}  # job id -> its events' fold, when the hub accepted it

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> JobSummary | None:
        if job_id not in self._jobs:
            return None
        view, submitted = self._jobs[job_id]
        return job_summary(job_id, view, submitted=submitted)

    def rows(self) -> list[JobSummary]:
        """Newest first."""
        newest = sorted(self._jobs.items(), key=lambda item: item[1][1], reverse=True)
        return [job_summary(job_id, view, submitted=submitted) for job_id, (view, submitted) in newest]

    def clear(self) -> None:
        self._jobs.clear()

    def add(self, job_id: str, *, status: str, submitted: str) -> JobSummary:
        self._jobs[job_id] = (JobView(status=status), submitted)
        return job_summary(job_id, self._jobs[job_id][0], submitted=submitted)

    def discard(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def apply(self, job_id: str, event: dict[str, Any]) -> bool:
        """Fold a hub event into its job; False for jobs not listed and events the panel does not use."""
        if job_id not in self._jobs or event.get("type") not in PANEL_EVENTS:
            return False
        self._jobs[job_id][0].apply(event)
        return True

    def update_from_hub(self, job_id: str, status: str, details: str = "") -> JobSummary | None:
        """Take Flower's status for a job whose own events have not said more; the job if it changed."""
        if job_id not in self._jobs:
            return None
        view, submitted = self._jobs[job_id]
        if view.status not in ("pending", "starting") or status == view.status:
            return None
        view.status = status
        if status in FINAL and not view.message:
            view.message = details
        return job_summary(job_id, view, submitted=submitted)
