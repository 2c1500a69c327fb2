"""The protocol's records, read where they cross a boundary: a record of another shape is refused in words that
name the field, what was expected and what was received (a type, never the value)."""

from __future__ import annotations

import ast
import json
import re
import typing
from pathlib import Path

import pytest

from flip_common.bundle import CONFIG_KEYS
from flip_common.protocol import (
    ERROR_KINDS,
    EVENT_RECORDS,
    ProtocolError,
    SiteErrorReason,
    error_reason,
    parse_site_error,
    read_plan_spec,
    read_site_info,
    read_worker_reply,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"plan_hash": "ab" * 32, "contract": {"modality": "MR"}, "model_shapes": {"w": [2, 3]}, "config": {}}


def test_a_plan_spec_of_the_right_shape_is_read_as_it_is() -> None:
    assert read_plan_spec(json.dumps(SPEC)) == SPEC


@pytest.mark.parametrize(
    "text, words",
    [
        ("not json", r"plan spec: 'flip-plan-spec' expected JSON text, received str"),
        ("[1]", r"'flip-plan-spec' expected a JSON object, received list"),
        (json.dumps({**SPEC, "contract": None}), r"'contract' expected an object, received NoneType"),
        (
            json.dumps({k: v for k, v in SPEC.items() if k != "model_shapes"}),
            r"'model_shapes' expected .*received nothing",
        ),
        (json.dumps({**SPEC, "model_shapes": {"w": [2, "3"]}}), r"'model_shapes.w' expected a list of integers"),
        (json.dumps({**SPEC, "plan_hash": 7}), r"'plan_hash' expected text, received int"),
    ],
)
def test_a_plan_spec_of_another_shape_is_refused_naming_expected_and_received(text: str, words: str) -> None:
    with pytest.raises(ProtocolError, match=words):
        read_plan_spec(text)


def test_a_protocol_error_is_a_value_error_so_the_sites_refusal_of_an_unreadable_plan_still_catches_it() -> None:
    assert issubclass(ProtocolError, ValueError)


def test_site_info_is_checked_and_keeps_only_the_protocols_fields() -> None:
    record = {"site": "north", "audit_head": "h", "compute_s": 1, "started_at": 2.5, "from_a_newer_site": "x"}
    assert read_site_info(record) == {"site": "north", "audit_head": "h", "compute_s": 1.0, "started_at": 2.5}
    with pytest.raises(ProtocolError, match=r"site reply: 'compute_s' expected a number, received str"):
        read_site_info({"compute_s": "fast"})
    with pytest.raises(ProtocolError, match=r"'approval' expected text, received bool"):
        read_site_info({"approval": True})
    with pytest.raises(ProtocolError, match=r"received bool"):
        read_site_info({"started_at": True})


def test_a_worker_frame_of_another_shape_is_refused() -> None:
    assert read_worker_reply({"ok": True, "metrics": {"loss": 0.1}}) == {"ok": True, "metrics": {"loss": 0.1}}
    assert read_worker_reply({"ok": False, "kind": "plan_error", "role": "train"})["kind"] == "plan_error"
    with pytest.raises(ProtocolError, match=r"worker reply: 'ok' expected true or false, received int"):
        read_worker_reply({"ok": 1})
    with pytest.raises(ProtocolError, match=r"'metrics' expected an object of name -> number, received list"):
        read_worker_reply({"ok": True, "metrics": [1.0]})
    with pytest.raises(ProtocolError, match=r"'kind' expected text, received nothing"):
        read_worker_reply({"ok": False})


def test_an_error_reason_is_read_back_as_the_kind_and_message_it_was_written_with() -> None:
    assert parse_site_error(error_reason("not_approved", "plan ab12 is pending at site north")) == (
        "not_approved",
        "plan ab12 is pending at site north",
    )
    assert SiteErrorReason("not a kind!", "m").reason() == "site_error: m", "a kind of another shape is not sent"
    assert len(error_reason("plan_error", "x" * 1000)) == 500
    assert parse_site_error("no kind here") == ("site_error", "no kind here")
    assert parse_site_error("node gone\nmore", code=5) == ("site_offline", "node gone")


def _kinds_in_code() -> set[str]:
    """Every error kind a site or the hub writes: ``Refusal("kind"``, ``WorkerFailure("kind"``, ``kind="kind"``."""
    found: set[str] = set()
    pattern = re.compile(r'(?:Refusal|WorkerFailure)\(\s*"([a-z_]+)"|\bkind="([a-z_]+)"|"kind": "([a-z_]+)"')
    for package in ("site_kernel", "flip_lab/hub"):  # not site_kernel/data, whose "kind" is a preparation step's
        for path in (ROOT / package).glob("*.py"):
            for match in pattern.finditer(path.read_text()):
                found.add(next(group for group in match.groups() if group))
    return found


def test_every_error_kind_the_code_writes_is_one_of_the_protocols() -> None:
    written = _kinds_in_code()
    assert {"not_approved", "timeout", "resource_limit", "bad_reply"} <= written, "the scan sees the kinds"
    assert written - ERROR_KINDS == set()


def test_the_bundles_run_config_keys_are_the_protocols() -> None:
    assert {"flip-plan-source", "flip-plan-spec", "flip-init-weights", "flip-resume-from", "flip-study"} == CONFIG_KEYS


def _required(record: type) -> set[str]:
    """A TypedDict's required fields, read from its hints (``__required_keys__`` misses ``NotRequired`` written as
    a string annotation on Python 3.11)."""
    hints = typing.get_type_hints(record, include_extras=True)
    return {name for name, hint in hints.items() if typing.get_origin(hint) is not typing.NotRequired}


def test_every_event_the_hub_emits_is_a_declared_record_with_its_fields() -> None:
    """Each ``sink.emit("kind", field=...)`` in the hub names a record of ``EVENT_RECORDS``, sends no field the record
    lacks and leaves out none it requires, so the records say what the hub sends."""
    checked = set()
    for path in (ROOT / "flip_lab" / "hub").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "emit"):
                continue
            if not (node.args and isinstance(node.args[0], ast.Constant)):
                continue
            kind, sent = node.args[0].value, {k.arg for k in node.keywords}
            record = EVENT_RECORDS[kind]
            where = f"{path.name}:{node.lineno} {kind}"
            assert sent - set(typing.get_type_hints(record)) == set(), where
            assert _required(record) - {"type", "t"} - sent == set(), where
            checked.add(kind)
    assert {"job_started", "site_state", "reply", "site_error", "job_finished", "directory_site"} <= checked
