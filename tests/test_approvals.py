"""Approval by hash: submission, decisions, prefixes, tamper checks, audit records, commands."""

from __future__ import annotations

import argparse

import pytest

from flip_common.planhash import plan_hash
from site_kernel.approvals import ApprovalStore
from site_kernel.audit import AuditLog
from site_kernel.errors import AmbiguousPlan, ApprovalError, UnknownPlan
from site_kernel.governance_cli import add_governance_commands
from site_kernel.policy import load_policy, write_default_policy

SOURCE = "@plan.model\ndef model():\n    return Net()\n"
CONTRACT = {"modality": "MR", "dims": 2, "size": [64, 64], "spacing": [1.0, 1.0]}
SHAPES = {"conv.weight": [8, 1, 3, 3], "conv.bias": [8]}


def submit(store, source=SOURCE, contract=CONTRACT, shapes=SHAPES, meta=None):
    digest = plan_hash(source, contract, shapes)
    return digest, store.submit(digest, source, contract, shapes, meta or {"job": "7"})


def cli(*argv):
    parser = argparse.ArgumentParser()
    add_governance_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_hash_ignores_key_order_but_not_content():
    base = plan_hash(SOURCE, CONTRACT, SHAPES)
    assert plan_hash(SOURCE, dict(reversed(CONTRACT.items())), dict(reversed(SHAPES.items()))) == base
    assert len(base) == 64


@pytest.mark.parametrize(
    "changed",
    [
        (SOURCE.replace("Net", "Nat"), CONTRACT, SHAPES),
        (SOURCE + " ", CONTRACT, SHAPES),
        (SOURCE, {**CONTRACT, "size": [64, 65]}, SHAPES),
        (SOURCE, CONTRACT, {**SHAPES, "conv.bias": [9]}),
    ],
)
def test_one_changed_character_changes_the_hash(changed):
    assert plan_hash(*changed) != plan_hash(SOURCE, CONTRACT, SHAPES)


def test_new_plan_waits_pending_and_unknown_is_unknown(tmp_path):
    store = ApprovalStore(tmp_path)
    assert store.state("0" * 64) == "unknown"
    digest, state = submit(store)
    assert state == "pending" and store.state(digest) == "pending"
    assert (tmp_path / "approvals" / digest / "plan.py").read_text() == SOURCE


def test_submit_is_idempotent(tmp_path):
    store = ApprovalStore(tmp_path)
    digest, _ = submit(store)
    store.approve(digest, by="owner")
    assert submit(store)[1] == "approved"
    assert [e["event"] for e in store.audit.entries()] == ["plan_submitted", "plan_approved"]


def test_submit_refuses_a_hash_that_does_not_match(tmp_path):
    store = ApprovalStore(tmp_path)
    with pytest.raises(ApprovalError, match="does not match"):
        store.submit("a" * 64, SOURCE, CONTRACT, SHAPES, {})
    assert store.list() == []


def test_approve_and_reject_are_audited(tmp_path):
    store = ApprovalStore(tmp_path)
    digest, _ = submit(store)
    record = store.approve(digest, by="dr-jones", note="reviewed")
    assert record.state == "approved" and record.decided_by == "dr-jones"
    store.reject(digest, by="dr-jones", reason="revoked after review")
    assert store.state(digest) == "rejected"
    events = [(e["event"], e.get("previous")) for e in AuditLog(tmp_path / "audit.jsonl").entries()]
    assert events == [
        ("plan_submitted", None),
        ("plan_approved", "pending"),
        ("plan_rejected", "approved"),
    ]
    assert AuditLog(tmp_path / "audit.jsonl").verify().ok


def test_modified_plan_needs_new_approval(tmp_path):
    store = ApprovalStore(tmp_path)
    digest, _ = submit(store)
    store.approve(digest, by="owner")
    changed, state = submit(store, source=SOURCE.replace("Net()", "Net() "))
    assert changed != digest and state == "pending" and store.state(changed) == "pending"


def test_rejection_needs_a_reason(tmp_path):
    store = ApprovalStore(tmp_path)
    digest, _ = submit(store)
    with pytest.raises(ApprovalError, match="reason"):
        store.reject(digest, by="owner", reason="  ")
    assert store.state(digest) == "pending"


def two_sources_sharing_a_hash_prefix():
    seen = {}
    for i in range(100_000):  # a birthday search: two 4-digit prefixes collide within a few hundred tries
        source = SOURCE + f"# {i}\n"
        prefix = plan_hash(source, CONTRACT, SHAPES)[:4]
        if prefix in seen:
            return seen[prefix], source, prefix
        seen[prefix] = source
    raise AssertionError("no collision found")


def test_unique_prefix_resolves_and_short_or_ambiguous_ones_do_not(tmp_path):
    store = ApprovalStore(tmp_path)
    first, second, shared = two_sources_sharing_a_hash_prefix()
    a, _ = submit(store, source=first)
    b, _ = submit(store, source=second)
    with pytest.raises(AmbiguousPlan) as info:
        store.approve(shared, by="owner")
    assert sorted(info.value.matches) == sorted([a, b])
    assert store.approve(a[:12], by="owner").hash == a and store.state(b) == "pending"
    for bad in (a[:3], "zzzz", "0000" if not a.startswith("0000") else "ffff"):
        with pytest.raises(UnknownPlan):
            store.resolve(bad)


def test_state_never_accepts_a_prefix(tmp_path):
    store = ApprovalStore(tmp_path)
    digest, _ = submit(store)
    store.approve(digest, by="owner")
    assert store.state(digest[:12]) == "unknown"


def test_files_edited_on_disk_are_not_shown_or_approved(tmp_path):
    store = ApprovalStore(tmp_path)
    digest, _ = submit(store)
    (tmp_path / "approvals" / digest / "plan.py").write_text(SOURCE + "import os\n")
    with pytest.raises(ApprovalError, match="no longer match"):
        store.approve(digest, by="owner")
    assert store.state(digest) == "pending"


def test_automatic_policy_approves_on_arrival_and_says_so(tmp_path):
    write_default_policy(tmp_path, demo=True)
    store = ApprovalStore(tmp_path, policy=load_policy(tmp_path))
    _, state = submit(store)
    assert state == "approved"
    last = list(store.audit.entries())[-1]
    assert last["event"] == "plan_approved" and last["note"] == "automatic approval (demo only)"


def test_list_filters_by_state(tmp_path):
    store = ApprovalStore(tmp_path)
    a, _ = submit(store)
    b, _ = submit(store, source=SOURCE + "# other\n")
    store.approve(a, by="owner")
    assert [r.hash for r in store.list("approved")] == [a]
    assert [r.hash for r in store.list("pending")] == [b]
    assert len(store.list()) == 2


def test_plans_commands(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    store = ApprovalStore(tmp_path)
    digest, _ = submit(store, meta={"job": "7", "researcher": "alice"})
    site = str(tmp_path)
    assert cli("plans", "list", "--site", site) == 0
    out = capsys.readouterr().out
    assert "manual approval" in out and digest[:12] in out and "pending" in out and "researcher=alice" in out
    assert cli("plans", "show", digest[:8], "--site", site) == 0
    out = capsys.readouterr().out
    assert "   2 | def model():" in out and digest in out
    assert cli("plans", "approve", digest[:8], "--note", "ok", "--by", "owner", "--site", site) == 0
    assert store.state(digest) == "approved"
    assert cli("plans", "reject", digest[:8], "--reason", "revoked", "--site", site) == 0
    assert store.state(digest) == "rejected"
    assert cli("plans", "approve", "ffff", "--site", site) == 2
    assert "no plan starts with ffff" in capsys.readouterr().err
