"""What the panel shows, computed from what the hub reports: pure functions and one small tracker, no I/O.

``fold_event`` is the server's half of the panel's job reducer (``extensions/flip-lab/src/state.ts`` is the other
half): both fold the same hub events into the same ``JobSummary``, so a panel that reconnects gets from the snapshot
exactly what it would have built from the live events.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any

from flip_common.protocol import FINAL

from .messages import JobSummary, SiteErrorNote, SiteRow

# The hub events the panel uses; per-site replies stay server side (the notebook dashboard shows those).
PANEL_EVENTS = frozenset(
    {"job_started", "site_state", "aggregate", "round_discarded", "site_error", "update_rejected", "job_finished"}
)
MAX_ERRORS = 5
FLAP_WINDOW_S = 600.0


def new_job_summary(job_id: str, *, status: str = "pending", submitted: str = "") -> JobSummary:
    return {
        "id": job_id,
        "status": status,
        "round": 0,
        "released": 0,
        "rounds": None,
        "message": "",
        "submitted": submitted,
        "strategy": "",
        "metrics": {},
        "site_states": {},
        "errors": [],
    }


def fold_event(job: JobSummary, event: dict[str, Any]) -> None:
    """Apply one hub event (``flip_common.protocol.Event``) to ``job`` in place; unknown kinds are ignored."""
    kind = event.get("type")
    if kind == "job_started":
        if job["status"] not in FINAL:
            job["status"] = "running"
        job["rounds"] = int(event.get("rounds") or 0) or job["rounds"]
        job["strategy"] = str(event.get("strategy", ""))
    elif kind == "site_state":
        job["site_states"][str(event["site"])] = str(event["state"])
        job["round"] = max(job["round"], int(event.get("round", 0)))
    elif kind == "aggregate":
        job["round"] = max(job["round"], int(event["round"]))
        job["released"] = max(job["released"], int(event["round"]))
        if event.get("phase") == "evaluate":
            for name, value in event.get("metrics", {}).items():
                series = [p for p in job["metrics"].get(name, []) if p[0] != int(event["round"])]
                series.append((int(event["round"]), float(value)))
                job["metrics"][name] = sorted(series)
    elif kind in ("site_error", "update_rejected", "round_discarded"):
        note: SiteErrorNote = {
            "site": str(event.get("site", "")),
            "round": int(event.get("round", 0)),
            "kind": str(event.get("kind", kind)),
            "message": str(event.get("message") or event.get("reason") or ""),
        }
        job["errors"] = [*job["errors"], note][-MAX_ERRORS:]
    elif kind == "job_finished":
        job["status"] = str(event["status"])
        job["message"] = str(event.get("message", ""))
        job["released"] = max(job["released"], int(event.get("rounds_completed") or 0))


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
        self._jobs: dict[str, JobSummary] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> JobSummary | None:
        return self._jobs.get(job_id)

    def rows(self) -> list[JobSummary]:
        """Newest first."""
        return sorted(self._jobs.values(), key=lambda j: j["submitted"], reverse=True)

    def clear(self) -> None:
        self._jobs.clear()

    def add(self, job_id: str, *, status: str, submitted: str) -> JobSummary:
        self._jobs[job_id] = new_job_summary(job_id, status=status, submitted=submitted)
        return self._jobs[job_id]

    def discard(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def apply(self, job_id: str, event: dict[str, Any]) -> bool:
        """Fold a hub event into its job; False for jobs not listed and events the panel does not use."""
        job = self._jobs.get(job_id)
        if job is None or event.get("type") not in PANEL_EVENTS:
            return False
        fold_event(job, event)
        return True

    def update_from_hub(self, job_id: str, status: str, details: str = "") -> JobSummary | None:
        """Take Flower's status for a job whose own events have not said more; the job if it changed."""
        job = self._jobs.get(job_id)
        if job is None or job["status"] not in ("pending", "starting") or status == job["status"]:
            return None
        job["status"] = status
        if status in FINAL and not job["message"]:
            job["message"] = details
        return job
