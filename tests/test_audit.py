"""The hash-chained audit log: appends, tamper detection, concurrent writers, the audit commands."""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing

import pytest

from site_kernel.audit import GENESIS, AuditLog, entry_hash
from site_kernel.errors import AuditError
from site_kernel.governance_cli import add_governance_commands


def filled(tmp_path, n=5):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.append("egress", round=i, outcome="released")
    return log


def lines(log):
    return log.path.read_text().splitlines()


def rewrite(log, new_lines):
    log.path.write_text("".join(line + "\n" for line in new_lines))


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_governance_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_entries_are_chained(tmp_path):
    log = filled(tmp_path, 3)
    entries = list(log.entries())
    assert [e["seq"] for e in entries] == [1, 2, 3]
    assert entries[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(entries))
    assert all(entry_hash(e) == e["hash"] for e in entries)
    assert log.head() == entries[-1]["hash"]
    assert log.verify().ok and log.verify().entries == 3


def test_empty_log_verifies(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    assert log.head() == GENESIS and log.verify().ok


def test_edited_entry_is_detected(tmp_path):
    log = filled(tmp_path)
    rows = lines(log)
    rows[2] = rows[2].replace('"released"', '"withheld"')
    rewrite(log, rows)
    result = log.verify()
    assert not result.ok and result.line == 3 and "edited" in result.problem


def test_edited_entry_with_recomputed_hash_breaks_the_chain(tmp_path):
    log = filled(tmp_path)
    rows = lines(log)
    entry = json.loads(rows[1])
    entry["outcome"] = "withheld"
    entry["hash"] = entry_hash(entry)
    rows[1] = json.dumps(entry)
    rewrite(log, rows)
    result = log.verify()
    assert not result.ok and result.line == 3 and "chain broken" in result.problem


@pytest.mark.parametrize("change", ["delete", "reorder"])
def test_deleted_or_reordered_entry_is_detected(tmp_path, change):
    log = filled(tmp_path)
    rows = lines(log)
    if change == "delete":
        del rows[2]
    else:
        rows[1], rows[2] = rows[2], rows[1]
    rewrite(log, rows)
    assert not log.verify().ok


def test_truncated_tail_is_detected_by_the_sidecar_head(tmp_path):
    log = filled(tmp_path)
    rewrite(log, lines(log)[:-2])
    result = log.verify()
    assert not result.ok and "truncated" in result.problem


def test_truncation_with_forged_sidecar_is_detected_by_an_outside_head(tmp_path):
    log = filled(tmp_path)
    head_seen_by_researcher = log.head()
    rows = lines(log)[:-1]
    rewrite(log, rows)
    last = json.loads(rows[-1])
    log.head_path.write_text(json.dumps({"seq": last["seq"], "hash": last["hash"]}))
    assert log.verify().ok  # locally consistent...
    result = log.verify(expected_head=head_seen_by_researcher)
    assert not result.ok and "truncated" in result.problem  # ...but not what the researcher was told


def test_outside_head_from_before_later_appends_still_verifies(tmp_path):
    log = filled(tmp_path, 2)
    earlier = log.head()
    log.append("plan_approved", plan="ab" * 32, by="owner")
    assert log.verify(expected_head=earlier).ok


def test_sidecar_behind_after_a_crash_is_not_tampering(tmp_path):
    log = filled(tmp_path, 3)
    first = next(log.entries())
    log.head_path.write_text(json.dumps({"seq": 1, "hash": first["hash"]}))
    assert log.verify().ok


def test_missing_sidecar_is_reported(tmp_path):
    log = filled(tmp_path, 2)
    log.head_path.unlink()
    assert not log.verify().ok


@pytest.mark.parametrize("fields", [{"seq": 3}, {"hash": "x"}, {"value": float("nan")}, {"value": object()}])
def test_bad_fields_are_refused(tmp_path, fields):
    log = AuditLog(tmp_path / "audit.jsonl")
    with pytest.raises(AuditError):
        log.append("egress", **fields)
    assert log.verify().ok


def test_damaged_last_line_stops_appends(tmp_path):
    log = filled(tmp_path, 2)
    with open(log.path, "a") as f:
        f.write('{"seq": 3, "trunc')
    with pytest.raises(AuditError, match="not an audit entry"):
        log.append("egress")


def _append_many(path, tag, n):
    log = AuditLog(path, fsync=False)
    for i in range(n):
        log.append("egress", writer=tag, i=i)


def test_concurrent_appends_from_two_processes_keep_the_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(path, tag, 150)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    log = AuditLog(path)
    result = log.verify()
    assert result.ok and result.entries == 300, result
    assert {e["writer"] for e in log.entries()} == {"a", "b"}


def test_audit_commands(tmp_path, capsys):
    filled(tmp_path, 4)
    assert cli("audit", "show", "--tail", "2", "--site", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "round=3" in out and "round=1" not in out and "head " in out
    assert cli("audit", "verify", "--site", str(tmp_path)) == 0
    assert "intact: 4 entries" in capsys.readouterr().out
    log = AuditLog(tmp_path / "audit.jsonl")
    rewrite(log, lines(log)[1:])
    assert cli("audit", "verify", "--site", str(tmp_path)) == 1
    assert "TAMPERED" in capsys.readouterr().out
