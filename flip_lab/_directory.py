"""Which sites a hub has, by their own names, and what each publishes: asked through the hub as a directory request.

A real hub relays Flower runs and knows its sites only as node ids, so ``Federation.sites()`` and
``Federation.catalogue()`` start a small run whose bundle is a directory request (no plan, no code:
``flip_lab._bundle.directory_bundle``). The hub's study process asks every online site once
(``flip_lab.hub.directory``); each site answers with its name and public catalogue
(``site_kernel.data.public_catalogue``) and records that it did. The answers come back as events in the run's
log. A ``Directory`` keeps the last answers for as long as no new node comes online, and no longer than ``TTL_S``
for catalogues (``catalogue()``, ``submit``) or ``NAMES_TTL_S`` for names (``sites()``, which the side panel polls),
so neither the panel nor every ``submit`` starts a run, and a site's audit log is not filled with answers.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from flip_common.protocol import event_of
from flip_common.textsafe import shown

TTL_S = 30.0  # how old the catalogues that ``submit`` checks a contract against may be
NAMES_TTL_S = 600.0  # how old the names may be: a node's name changes only with its site's settings
RUN_TIMEOUT_S = 60.0  # the hub answers within its own timeout (hub.directory.DIRECTORY_TIMEOUT_S) plus a start
MAX_CATALOGUE_CHARS = 256 << 10
DIRECTORY_FAB_ID = "flip-lab/flip-directory"  # how the hub's run list names a directory request
_MAX_DEPTH = 8


def clean_name(name: object) -> str:
    """A site's name as sent, made safe to show (hidden and terminal characters escaped) and kept short."""
    return shown(name)[:100]


def clean_catalogue(catalogue: Any) -> dict[str, Any]:
    """A public catalogue as a site sent it, reduced to JSON data with every text made safe to show.

    Raises ``TypeError`` when it is not a catalogue (a mapping with a ``datasets`` mapping)."""
    if not isinstance(catalogue, dict) or not isinstance(catalogue.get("datasets"), dict):
        raise TypeError("not a public catalogue")
    return _clean(catalogue, 0)


def _clean(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return None
    if isinstance(value, dict):
        return {shown(k)[:100]: _clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v, depth + 1) for v in value]
    if isinstance(value, str):
        return shown(value)[:300]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return None


@dataclass
class Answers:
    """One directory request's answers: ``sites`` by node id ({"site", "catalogue"}), ``errors`` by node id."""

    sites: dict[int, dict[str, Any]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    asked_at: float = 0.0
    wall_s: float = 0.0
    run_id: int = 0

    def knows(self, node_id: int) -> bool:
        return node_id in self.sites or node_id in self.errors


def read_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        try:
            event = event_of(line)
        except json.JSONDecodeError:
            continue
        if event is not None:
            events.append(event)
    return events


def _finished(text: str) -> bool:
    return any(e.get("type") == "directory_finished" for e in read_events(text))


def ask(client: Any, timeout: float = RUN_TIMEOUT_S) -> Answers:
    """Start a directory request at the hub of ``client`` (a ``ControlClient``) and read its answers."""
    from ._bundle import directory_bundle

    started = time.monotonic()
    run_id = client.start_run(directory_bundle())
    text, after = "", 0.0
    deadline = started + timeout
    while time.monotonic() < deadline:
        for chunk, latest in client.stream_logs(run_id, after):
            text, after = text + chunk, latest
            if "directory_finished" in chunk:
                break
        if _finished(text):
            break
        info = client.run(run_id)
        if info is not None and info.status == "finished":
            time.sleep(0.3)  # the last log upload can trail the status change
            text += "".join(chunk for chunk, _ in client.stream_logs(run_id, after))
            break
        time.sleep(0.2)
    else:
        client.stop_run(run_id)
    answers = Answers(asked_at=time.time(), wall_s=round(time.monotonic() - started, 3), run_id=run_id)
    for event in read_events(text):
        try:
            node = int(event["node_id"]) if "node_id" in event else None
            if event.get("type") == "directory_site" and node is not None:
                answers.sites[node] = {
                    "site": clean_name(event.get("site", "")) or f"node-{node}",
                    "catalogue": clean_catalogue(event.get("catalogue")),
                }
            elif event.get("type") == "directory_error" and node is not None:
                answers.errors[node] = clean_name(event.get("message", ""))
        except (TypeError, ValueError):
            continue
    return answers


class Directory:
    """The last answers of a hub's sites, asked again when older than the caller allows or when a node is new to
    them."""

    def __init__(self, client: Any, ttl: float = TTL_S) -> None:
        self._client = client
        self.ttl = ttl
        self._answers: Answers | None = None
        self._lock = threading.Lock()  # one request at a time; a second caller waits for the first's answers

    def answers(self, online: set[int], max_age: float | None = None) -> Answers:
        with self._lock:
            current = self._answers
            if (
                current is None
                or time.time() - current.asked_at > (self.ttl if max_age is None else max_age)
                or not all(current.knows(n) for n in online)
            ):
                current = self._answers = ask(self._client)
                for node in online - set(current.sites) - set(current.errors):  # asked, not answered: not again
                    current.errors[node] = "no answer to the directory request"
            return current
