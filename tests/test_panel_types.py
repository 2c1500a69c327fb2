"""The panel's TypeScript types (``extensions/flip-lab/src/types.ts``) say what the server sends, field for field.

The server extension's messages are TypedDicts (``flip_lab/server/messages.py``) and the hub events it forwards are
``flip_common.protocol``'s records; the panel declares its own copy of each. These tests read types.ts as text and
fail on a field, an event kind or a message type that one side has and the other does not.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from flip_common import protocol
from flip_lab.server import messages
from flip_lab.server.views import PANEL_EVENTS

TYPES_TS = Path(__file__).resolve().parents[1] / "extensions" / "flip-lab" / "src" / "types.ts"


def _without_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.DOTALL)


def interfaces(text: str) -> dict[str, dict[str, bool]]:
    """Each ``export interface`` of a TypeScript file: field name -> whether it is optional."""
    found = {}
    for name, body in re.findall(r"export interface (\w+) \{(.*?)\n\}", _without_comments(text), flags=re.DOTALL):
        found[name] = {field: bool(mark) for field, mark in re.findall(r"^\s*(\w+)(\??):", body, flags=re.MULTILINE)}
    return found


def unions(text: str) -> dict[str, str]:
    """Each ``export type X = ...``, its right-hand side as text (up to the next export)."""
    return dict(
        re.findall(r"^export type (\w+) =(.*?)(?=^export |\Z)", _without_comments(text), flags=re.DOTALL | re.MULTILINE)
    )


def literals(text: str) -> set[str]:
    return set(re.findall(r"'([^']*)'", text))


def stream_variants(text: str) -> dict[str, set[str]]:
    """``StreamMessage``'s variants: the message type -> its field names."""
    found = {}
    for body in re.findall(r"\{([^{}]*)\}", unions(text)["StreamMessage"]):
        fields = dict(re.findall(r"(\w+)\??:\s*([^;]+)", body))
        found[literals(fields["type"]).pop()] = set(fields)
    return found


def keys(record: type) -> dict[str, bool]:
    """A TypedDict's field name -> whether it may be left out."""
    return {name: name in record.__optional_keys__ for name in typing.get_type_hints(record, include_extras=True)}


TS = TYPES_TS.read_text()
MIRRORED = [
    (messages.ConnectionInfo, "IConnectionInfo"),
    (messages.SiteRow, "ISiteRow"),
    (messages.SiteErrorNote, "ISiteErrorNote"),
    (messages.JobSummary, "IJobSummary"),
]


@pytest.mark.parametrize("record, interface", MIRRORED, ids=[ts for _, ts in MIRRORED])
def test_each_message_record_has_the_same_fields_in_types_ts(record: type, interface: str) -> None:
    declared = interfaces(TS)[interface]
    assert declared == keys(record), f"{interface} in types.ts differs from {record.__name__} in messages.py"


def test_the_stream_messages_are_the_same_on_both_sides() -> None:
    python = {}
    for record in typing.get_args(messages.StreamMessage):
        hints = typing.get_type_hints(record)
        python[typing.get_args(hints["type"])[0]] = set(hints)
    assert stream_variants(TS) == python


def test_hub_events_the_panel_receives_are_declared_kind_by_kind_and_field_by_field() -> None:
    kinds = unions(TS)["HubEventType"]
    assert literals(kinds) == set(PANEL_EVENTS), "HubEventType in types.ts lists the events the server forwards"
    fields: set[str] = set()
    for kind in PANEL_EVENTS:
        fields |= set(typing.get_type_hints(protocol.EVENT_RECORDS[kind]))
    declared = interfaces(TS)["IHubEvent"]
    assert set(declared) == fields, "IHubEvent declares every field of the forwarded events, and no other"
    assert [name for name, optional in declared.items() if not optional] == ["type"], "each kind carries some"


def test_status_and_state_words_are_the_same_on_both_sides() -> None:
    declared = unions(TS)
    assert literals(declared["JobStatus"]) == set(typing.get_args(protocol.JobStatus))
    assert literals(declared["ConnectionState"]) == set(typing.get_args(messages.ConnectionState))


def test_the_reader_sees_a_missing_or_an_extra_field() -> None:
    """The check itself: a field dropped from types.ts, or one only types.ts has, shows as a difference."""
    dropped = TS.replace("  drops: number;\n", "")
    assert "drops" in keys(messages.SiteRow) and "drops" not in interfaces(dropped)["ISiteRow"]
    extra = TS.replace("export interface ISiteErrorNote {", "export interface ISiteErrorNote {\n  phase: string;")
    assert interfaces(extra)["ISiteErrorNote"] != keys(messages.SiteErrorNote)
