"""The hub's one push-then-poll loop (flip_lab.hub.grid.Exchange), against a stand-in for Flower's grid."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from flip_lab.hub import grid as hub_grid
from flip_lab.hub.grid import Exchange


class _Grid:
    """Answers the pushed messages of the nodes in ``answers`` over successive polls, plus a straggler's reply."""

    def __init__(self, answers: dict[int, int]) -> None:
        self.answers = answers  # node -> the poll at which it answers
        self.pushed: dict[str, Any] = {}
        self.polls = 0

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for i, message in enumerate(messages):
            self.pushed[f"m{i}"] = message
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Any]:
        self.polls += 1
        replies = [_reply("older-message")]  # a reply to a message nobody waits for any more
        for mid in message_ids:
            node = self.pushed[mid].metadata.dst_node_id
            if self.answers.get(node) == self.polls:
                replies.append(_reply(mid))
        return replies


def _reply(to: str) -> Any:  # what the loop reads of Flower's Message
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=to))


def _messages(nodes: list[int]) -> list[Any]:
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n)) for n in nodes]


def test_replies_come_as_they_land_and_the_unanswered_stay_waiting(monkeypatch):
    monkeypatch.setattr(hub_grid, "POLL_S", 0.0)
    grid = _Grid({1: 1, 2: 3})
    exchange = Exchange(grid, _messages([1, 2, 3]))
    seen = []
    for node, _reply in exchange.replies(time.monotonic() + 0.5):
        seen.append((node, grid.polls))
    assert seen == [(1, 1), (2, 3)]  # each as soon as it landed; the straggler's reply is skipped
    assert list(exchange.waiting.values()) == [3]  # node 3 never answered before the deadline


def test_the_check_may_drop_messages_it_no_longer_waits_for(monkeypatch):
    monkeypatch.setattr(hub_grid, "POLL_S", 0.0)
    monkeypatch.setattr(hub_grid, "LIVENESS_S", 0.0)
    exchange = Exchange(_Grid({}), _messages([4, 5]))
    checked = []

    def drop_node_4(waiting: dict[str, int]) -> None:
        checked.append(sorted(waiting.values()))
        for mid in [m for m, n in waiting.items() if n == 4]:
            del waiting[mid]

    replies = list(exchange.replies(time.monotonic() + 0.05, check=drop_node_4))
    assert replies == []
    assert checked[0] == [4, 5] and all(c == [5] for c in checked[1:])
    assert list(exchange.waiting.values()) == [5]


def test_nothing_is_pushed_for_no_messages():
    grid = _Grid({})
    exchange = Exchange(grid, [])
    assert list(exchange.replies(time.monotonic() + 1.0)) == [] and grid.polls == 0


def test_a_site_gone_between_rounds_is_said_once_and_asked_again_when_back():
    """A local federation unregisters a dead site at once, so no exchange waits for it: the researcher must still
    hear that the site is gone (once), and the site takes part again should it come back."""
    from flip_lab.hub.grid import StreamingGrid

    class Nodes:
        def __init__(self):
            self.online = {1, 2, 3}

        def get_node_ids(self):
            return sorted(self.online)

    class Sink:
        def __init__(self):
            self.events = []

        def emit(self, type_, **fields):
            self.events.append({"type": type_, **fields})

    nodes, sink = Nodes(), Sink()
    grid = StreamingGrid(nodes, sink, site_names={1: "a", 2: "b", 3: "c"}, min_sites=2)
    assert grid.get_node_ids() == [1, 2, 3] and sink.events == []
    nodes.online = {1, 3}
    assert grid.get_node_ids() == [1, 3]
    assert grid.get_node_ids() == [1, 3]
    assert [(e["site"], e["kind"], e["round"], e["phase"]) for e in sink.events] == [("b", "site_offline", 1, "train")]
    nodes.online = {1, 2, 3}
    assert grid.get_node_ids() == [1, 2, 3] and len(sink.events) == 1
