"""The hub's event sink: what a completed study says about the sites that contributed to no round."""

from __future__ import annotations

from flip_lab.hub.events import EventSink


def _sink() -> EventSink:
    sink = EventSink()
    for round_ in (1, 2):
        sink.emit("reply", round=round_, phase="train", site="northgate", metrics={}, num_examples=10)
        sink.emit("reply", round=round_, phase="train", site="poisoner", metrics={}, num_examples=3)
        sink.emit("update_rejected", round=round_, site="poisoner", reason="update norm 1e6 above 10")
        sink.emit(
            "site_error",
            round=round_,
            phase="train",
            site="broken",
            kind="plan_error",
            message="train() raised ValueError at site broken",
        )
    return sink


def test_a_site_that_failed_every_round_is_named_with_its_first_error_once() -> None:
    said = _sink().absent_sites()
    assert "site broken contributed to no round: train() raised ValueError" in said
    assert "at site broken" not in said  # its own message's suffix is not said twice
    assert "site poisoner contributed to no round: the hub rejected its update (update norm 1e6 above 10)" in said
    assert "northgate" not in said


def test_a_site_that_failed_once_but_contributed_another_round_is_not_named() -> None:
    sink = EventSink()
    sink.emit("site_error", round=1, phase="train", site="flaky", kind="timeout", message="timed out")
    sink.emit("reply", round=2, phase="train", site="flaky", metrics={}, num_examples=5)
    assert sink.absent_sites() == ""
