"""A Grid that streams each site's reply the moment it arrives, and never waits longer than it must.

Flower's ``send_and_receive`` polls the SuperLink every 3 s and returns only when every reply is in; FLIP Lab wraps
the run's Grid so that Flower's own strategies keep working unchanged while (a) replies are polled every 50 ms,
(b) each reply is turned into an event for the researcher as it lands, (c) a site that goes offline or fails stops
being waited for, and (d) only the sites that approved this plan are ever sampled; with secure aggregation, (e) each
train round starts with the key setup of ``flip_lab.hub.secagg``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from flip_common.packing import is_packed, pack, unpack
from flip_common.protocol import ProtocolError, SiteInfo, parse_site_error, read_site_info

from .events import EventSink

TRANSIENT_S = 30.0  # how long the hub keeps asking its SuperLink after a server-side error before giving up


def pull_replies(grid: Grid, message_ids: list[str]) -> Iterable[Message]:
    """``grid.pull_messages``, riding out the SuperLink's transient server errors (e.g. its state database busy
    under load) for up to ``TRANSIENT_S`` seconds: asking again is harmless, and a study should not fail on one."""
    import httpx

    deadline = time.monotonic() + TRANSIENT_S
    delay = 0.2
    while True:
        try:
            return grid.pull_messages(message_ids)
        except httpx.HTTPStatusError as err:
            if err.response.status_code < 500 or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


POLL_S = 0.05
LIVENESS_S = 2.0  # how often a round asks which of the sites it waits for are still online


class Exchange:
    """Messages pushed to their sites, then polled for every ``POLL_S`` until each is answered or time runs out:
    the one loop by which the hub talks to sites (rounds, approval queries, secure-aggregation key setup, directory
    requests). Flower's ``send_and_receive`` does the same but polls every 3 s and returns only when all are in.

    >>> exchange = Exchange(grid, messages)               # doctest: +SKIP
    >>> for node, reply in exchange.replies(deadline):    # doctest: +SKIP
    ...     ...
    >>> exchange.waiting                                  # doctest: +SKIP  (message id -> node, never answered)
    """

    def __init__(self, grid: Grid, messages: list[Message]) -> None:
        self.grid = grid
        nodes = [m.metadata.dst_node_id for m in messages]
        # Flower returns no message ids at all for a push too large to send: then nothing is waited for.
        self.waiting: dict[str, int] = dict(zip(grid.push_messages(messages), nodes, strict=False)) if messages else {}

    def replies(
        self, deadline: float, *, check: Callable[[dict[str, int]], None] | None = None
    ) -> Iterator[tuple[int, Message]]:
        """Yield ``(node, reply)`` as each reply lands, until none is awaited or ``deadline`` (``time.monotonic``)
        passes; a reply to a message not awaited (a straggler's, to an older one) is skipped. ``check`` is called
        every ``LIVENESS_S`` with the awaited messages and may drop some (e.g. of sites gone offline)."""
        next_check = time.monotonic() + LIVENESS_S
        while self.waiting and time.monotonic() < deadline:
            for reply in pull_replies(self.grid, list(self.waiting)):
                node = self.waiting.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    yield node, reply
            if check is not None and self.waiting and time.monotonic() >= next_check:
                check(self.waiting)
                next_check = time.monotonic() + LIVENESS_S
            if self.waiting:
                time.sleep(POLL_S)


class NotEnoughSites(RuntimeError):
    """Fewer approved sites are online than the study's minimum: the round cannot be released."""


def site_info(msg: Message) -> SiteInfo:
    """The ``flip`` ConfigRecord a site attaches to every reply (name, audit head, timings), checked:
    ``ProtocolError`` for one of another shape."""
    if msg.has_error() or "flip" not in msg.content.config_records:
        return {}
    return read_site_info(msg.content.config_records["flip"])


class StreamingGrid:
    """Proxy over a run's ``Grid``; see the module docstring."""

    def __init__(
        self,
        grid: Grid,
        sink: EventSink,
        *,
        site_names: dict[int, str],
        min_sites: int,
        on_reply: Callable[[Message, str], None] | None = None,
        secagg: Any = None,
    ) -> None:
        self._grid = grid
        self.sink = sink
        self.site_names = dict(site_names)
        self.min_sites = min_sites
        self.on_reply = on_reply
        self.current_round = 0
        self.dropped: set[int] = set()
        self._said_offline: set[int] = set()  # approved sites found offline between rounds, each told once
        self._next: tuple[int, str] = (1, "train")  # the round and phase the next exchange will be
        self.secagg = secagg  # a flip_lab.hub.secagg.SecureAggregator when the study uses secure aggregation

    def __getattr__(self, name: str) -> Any:  # everything not overridden goes to Flower's grid
        return getattr(self._grid, name)

    def name(self, node_id: int) -> str:
        return self.site_names.get(node_id, f"node-{node_id}")

    def online_sites(self) -> list[int]:
        """The approved sites the next exchange can ask. A site that went offline between rounds (a local
        federation unregisters a dead site at once, so no exchange ever waits for it) is said once as a
        ``site_offline`` error of the round it misses, and asked again should it come back."""
        online = set(self._grid.get_node_ids())
        round_, phase = self._next
        for node in self.site_names:
            if node in online:
                self._said_offline.discard(node)
            elif node not in self.dropped and node not in self._said_offline:
                self._said_offline.add(node)
                self._offline(node, round_, phase, "between rounds; the study goes on without it")
        return [n for n in self.site_names if n in online and n not in self.dropped]

    def get_node_ids(self) -> list[int]:
        nodes = self.online_sites()
        if len(nodes) < self.min_sites:
            missing = sorted(self.name(n) for n in self.site_names if n not in nodes)
            raise NotEnoughSites(
                f"only {len(nodes)} of the approved sites can take part (unavailable: "
                f"{', '.join(missing) or 'none'}); the study's minimum is {self.min_sites}"
            )
        return nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        phase = messages[0].metadata.message_type
        round_ = int(messages[0].content.config_records["config"].get("server-round", 0))
        self.current_round = round_
        state = "training" if phase == "train" else "evaluating"
        for msg in messages:
            record = msg.content.array_records.get("arrays")
            if record is not None and not is_packed(record):  # strategies share one RecordDict among messages
                msg.content["arrays"] = pack(record)
            self.sink.emit("site_state", round=round_, site=self.name(msg.metadata.dst_node_id), state=state)
        if self.secagg is not None and phase == "train":  # key setup first; sites that miss it sit the round out
            messages = self.secagg.prepare(round_, messages)
        exchange = Exchange(self._grid, messages)
        deadline = time.monotonic() + (timeout if timeout is not None else 3600.0)
        replies: list[Message] = []
        for node, reply in exchange.replies(deadline, check=lambda waiting: self._drop_offline(waiting, phase, round_)):
            if not reply.has_error():
                for key, record in list(reply.content.array_records.items()):
                    if is_packed(record):
                        reply.content[key] = unpack(record)
            replies.append(reply)
            self._report(reply, node, phase, round_)
        # A site that missed the deadline sits this round out but is asked again next round: a slow site is not a
        # dead one (a dead one is dropped when it goes offline), and its late reply to this round is never read.
        for node in exchange.waiting.values():
            self.sink.emit(
                "site_error",
                round=round_,
                phase=phase,
                site=self.name(node),
                kind="timeout",
                message=f"no reply within {timeout:g} s; the round goes on without this site",
            )
        if phase in ("train", "evaluate"):
            self._next = (round_, "evaluate") if phase == "train" else (round_ + 1, "train")
        return replies

    def _drop_offline(self, waiting: dict[str, int], phase: str, round_: int) -> None:
        online = set(self._grid.get_node_ids())
        for msg_id, node in list(waiting.items()):
            if node not in online:
                del waiting[msg_id]
                self.dropped.add(node)
                self._offline(node, round_, phase, "during the round; the round goes on without it")

    def _offline(self, node: int, round_: int, phase: str, when: str) -> None:
        self.sink.emit(
            "site_error",
            round=round_,
            phase=phase,
            site=self.name(node),
            kind="site_offline",
            message=f"the site went offline {when}",
        )

    def _report(self, reply: Message, node: int, phase: str, round_: int) -> None:
        site = self.name(node)
        if reply.has_error():
            kind, message = parse_site_error(reply.error.reason, int(reply.error.code))
            self.sink.emit("site_error", round=round_, phase=phase, site=site, kind=kind, message=message)
            if kind == "withheld":
                self.sink.emit("site_state", round=round_, site=site, state="withheld", detail=message)
            else:
                self.sink.emit("site_state", round=round_, site=site, state="failed", detail=message)
            return
        try:
            info = site_info(reply)
        except ProtocolError as err:
            self.sink.emit("site_error", round=round_, phase=phase, site=site, kind="bad_reply", message=str(err))
            self.sink.emit("site_state", round=round_, site=site, state="failed", detail=str(err))
            return
        metrics = dict(reply.content.metric_records.get("metrics", {}))
        num_examples = int(metrics.pop("num-examples", 0))
        self.sink.emit(
            "reply",
            round=round_,
            phase=phase,
            site=site,
            metrics=metrics,
            num_examples=num_examples,
            compute_s=float(info.get("compute_s", 0.0)),
            started_at=float(info.get("started_at", 0.0)),
            audit_head=str(info.get("audit_head", "")),
            approval=str(info.get("approval", "")),
        )
        self.sink.emit("site_state", round=round_, site=site, state="done")
        if self.on_reply is not None:
            self.on_reply(reply, phase)
