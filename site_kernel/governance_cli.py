"""The data owner's governance commands, mounted under ``flip-site``::

    flip-site plans list [--state STATE] --site DIR     plans waiting, approved, rejected
    flip-site plans show HASH --site DIR                one plan in full, source included
    flip-site plans approve HASH [--note N] --site DIR  approve (a unique hash prefix will do)
    flip-site plans reject HASH --reason R --site DIR   reject or revoke
    flip-site audit show [--tail N] --site DIR          the audit log, newest last
    flip-site audit verify [--expected-head H] --site DIR
                                                        check the hash chain (exit 1: tampered)
    flip-site policy show --site DIR                    the policy in force, every key
    flip-site policy init [--demo] [--force] --site DIR write the documented default policy
    flip-site privacy --site DIR                        epsilon budget, spent, remaining, per job

Every command returns an exit code: 0 done, 1 a check failed (tampered log), 2 an error explained
on stderr.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flip_common.textsafe import shown, visible

from . import contract_view
from .approvals import ApprovalStore, PlanRecord
from .audit import AuditLog
from .errors import PolicyMissing, SiteKernelError
from .policy import load_policy, write_default_policy
from .privacy import PrivacyLedger

Command = Callable[[argparse.Namespace], int]


def add_governance_commands(subparsers: Any) -> None:
    """Add the ``plans``, ``audit``, ``policy`` and ``privacy`` commands to argparse subparsers.

    Each leaf command sets ``func``: call ``args.func(args)`` and exit with what it returns.
    """
    plans = subparsers.add_parser("plans", help="review, approve and reject plans").add_subparsers(
        dest="plans_command", required=True
    )
    p = _leaf(plans, "list", "plans and their state", _plans_list)
    p.add_argument("--state", choices=["pending", "approved", "rejected"])
    p = _leaf(plans, "show", "one plan in full", _plans_show)
    p.add_argument("hash", help="plan hash or a unique prefix of it")
    p = _leaf(plans, "approve", "approve a plan", _plans_approve)
    p.add_argument("hash", help="plan hash or a unique prefix of it")
    p.add_argument("--note", default="", help="why, for the audit log")
    p.add_argument("--by", default=None, help="who decides (default: the current user)")
    p = _leaf(plans, "reject", "reject (or revoke) a plan", _plans_reject)
    p.add_argument("hash", help="plan hash or a unique prefix of it")
    p.add_argument("--reason", required=True, help="why; the researcher is told the plan was refused")
    p.add_argument("--by", default=None, help="who decides (default: the current user)")

    audit = subparsers.add_parser("audit", help="read and check the audit log").add_subparsers(
        dest="audit_command", required=True
    )
    p = _leaf(audit, "show", "print the audit log", _audit_show)
    p.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N entries")
    p = _leaf(audit, "verify", "check the hash chain", _audit_verify)
    p.add_argument("--expected-head", default=None, help="a head hash known from outside, e.g. a researcher's")

    policy = subparsers.add_parser("policy", help="the site's governance policy").add_subparsers(
        dest="policy_command", required=True
    )
    _leaf(policy, "show", "the policy in force", _policy_show)
    p = _leaf(policy, "init", "write the documented default policy", _policy_init)
    p.add_argument("--demo", action="store_true", help="demo site: automatic approval, labelled as such")
    p.add_argument("--force", action="store_true", help="replace an existing policy.toml")

    p = subparsers.add_parser("privacy", help="the differential privacy budget and what was spent")
    p.add_argument("--site", required=True, type=Path, help="the site folder")
    p.set_defaults(func=_guarded(_privacy_show))


def _leaf(group: Any, name: str, help: str, func: Command) -> argparse.ArgumentParser:
    p = group.add_parser(name, help=help)
    p.add_argument("--site", required=True, type=Path, help="the site folder")
    p.set_defaults(func=_guarded(func))
    return p


def _guarded(func: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except SiteKernelError as err:
            print(f"flip-site: {err}", file=sys.stderr)
            return 2

    run.__doc__ = func.__doc__
    return run


def _policy_line(site: Path) -> str:
    try:
        return f"site policy: {load_policy(site).label}"
    except PolicyMissing:
        return "site policy: NONE (nothing runs until the data owner writes policy.toml)"
    except SiteKernelError as err:
        return f"site policy: INVALID ({err})"


def _plans_list(args: argparse.Namespace) -> int:
    store = ApprovalStore(args.site)
    records = store.list(args.state)
    print(_policy_line(args.site))
    if not records:
        print("no plans" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(f"{'HASH':14}{'STATE':10}{'SUBMITTED':31}{'DECIDED BY':14}FROM")
    hidden = 0
    for r in records:
        origin = ", ".join(f"{k}={v}" for k, v in sorted(r.meta.items()) if isinstance(v, (str, int, float)))
        flag = "! " if _hides_text(r, store.runs(r.hash)) else ""
        hidden += bool(flag)
        print(
            f"{r.hash[:12]:14}{r.state:10}{shown(r.submitted_at):31}"
            f"{shown(r.decided_by or '-'):14}{flag}{shown(origin)}"
        )
    if hidden:
        print(f"! {hidden} plan(s) hold hidden or control characters: `plans show` marks them")
    return 0


def _hides_text(r: PlanRecord, runs: list[dict[str, Any]]) -> bool:
    """Whether anything the data owner reads of this plan needed escaping to be shown truthfully."""
    texts = [*_strings(r.meta), *_strings(r.contract), *r.model_shapes, r.decided_by or "", r.note]
    texts += _strings([[run.get("settings"), run.get("submitter")] for run in runs])
    return any(visible(t)[1] for t in texts) or visible(r.source, multiline=True)[1]


def _strings(value: Any) -> list[str]:
    """Every key and string in a JSON value (JSON text would hide controls behind \\u escapes)."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def _plans_show(args: argparse.Namespace) -> int:
    store = ApprovalStore(args.site)
    r = store.show(args.hash)
    if _hides_text(r, store.runs(r.hash)):
        print(
            "WARNING: this plan holds hidden or terminal-control characters (a carriage return, an "
            "escape sequence, a bidi or zero-width character); each is shown below as \\xNN, \\r "
            "or <U+XXXX> where it stands. Code rarely needs them: read those lines with care, or "
            "reject the plan."
        )
    print(f"plan      {r.hash}")
    print(f"state     {r.state}" + (f" by {shown(r.decided_by)} at {shown(r.decided_at)}" if r.decided_by else ""))
    if r.note:
        print(f"note      {shown(r.note)}")
    meta = json.dumps(r.meta, sort_keys=True, ensure_ascii=False)
    print(f"submitted {shown(r.submitted_at)}  {shown(meta)}")
    print("\n".join(contract_view.applied_lines(r.contract)))
    print("model     " + ", ".join(f"{shown(k)} {tuple(v)}" for k, v in r.model_shapes.items()))
    _print_runs(store, r)
    # Split on "\n" alone and show any \r: str.splitlines would hide a lone \r (a line break to
    # Python, a return to column 0 on a terminal) and break at \v, \f, \x85 or U+2028, which
    # Python does not, so the numbering would not match the code.
    lines = r.source.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    print(f"--- plan.py ({len(lines)} lines, shown in full) ---")
    constant = contract_view.source_constant(r.source, r.contract)
    for number, line in enumerate(lines, start=1):
        print(f"{number:4} | {visible(line, multiline=True)[0]}")
        if constant and constant[0] == number:
            print(f"       {constant[1]}")  # no line number and no bar: the site's note, not source
    return 0


def _print_runs(store: ApprovalStore, r: PlanRecord, most: int = 10) -> None:
    """The run settings of the plan's studies: what an approval of it covers (see run_settings)."""
    runs, approved = store.runs(r.hash), store.approved_settings(r.hash)
    more = f", the last {most} shown" if len(runs) > most else ""
    print(f"studies   {len(runs)} on record{more}")
    for run in runs[-most:]:
        settings = run.get("settings") or {}
        covered = "approved" if run.get("settings_hash") in approved else "not approved"
        config = settings.get("config") or {}
        print(
            f"  run {shown(run.get('run_id'))}  "
            f"settings {shown(run.get('settings_hash', ''))[:12]} "
            f"({covered})  rounds {shown(config.get('rounds'))}, strategy "
            f"{shown(config.get('strategy'))}, seed {shown(config.get('seed'))}, initial weights "
            f"{shown(settings.get('init_weights', ''))[:12]}, name {shown(settings.get('name'))}"
        )
        if who := run.get("submitter"):
            print(
                f"      submitted by {shown(who.get('submitter'))} ({shown(who.get('organisation'))}, "
                f"{shown(who.get('organisation_kind'))}), verified with this site's CA"
                + (f"; project {shown(who.get('project'))}" if who.get("project") else "")
            )
        train = json.dumps(settings.get("train_config") or {}, sort_keys=True, ensure_ascii=False)
        rest = {k: v for k, v in config.items() if k not in ("rounds", "strategy", "seed", "extra")}
        print(f"      train config {shown(train)}")
        print(f"      study config {shown(json.dumps(rest, sort_keys=True, ensure_ascii=False))}")


def _plans_approve(args: argparse.Namespace) -> int:
    r = ApprovalStore(args.site).approve(args.hash, by=args.by or getpass.getuser(), note=args.note)
    print(f"approved plan {r.hash} (by {r.decided_by})")
    return 0


def _plans_reject(args: argparse.Namespace) -> int:
    r = ApprovalStore(args.site).reject(args.hash, by=args.by or getpass.getuser(), reason=args.reason)
    print(f"rejected plan {r.hash} (by {r.decided_by}): {r.note}")
    return 0


def _audit_show(args: argparse.Namespace) -> int:
    log = AuditLog(args.site / "audit.jsonl")
    entries = log.tail(args.tail) if args.tail is not None else list(log.entries())
    for e in entries:
        fields = " ".join(
            f"{shown(k)}={shown(json.dumps(v, sort_keys=True, ensure_ascii=False))}"
            for k, v in e.items()
            if k not in ("seq", "ts", "event", "prev", "hash")
        )
        print(f"{shown(e.get('seq')):>6} {shown(e.get('ts'))} {shown(e.get('event')):18} {fields}")
    print(f"head {log.head()}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    # Plans under approvals/ were each logged on arrival: they are evidence the log cannot lack.
    plans = [r.hash for r in ApprovalStore(args.site).list()]
    result = AuditLog(args.site / "audit.jsonl").verify(expected_head=args.expected_head, known_plans=plans)
    print(result)
    return 0 if result.ok else 1


def _policy_show(args: argparse.Namespace) -> int:
    policy = load_policy(args.site)
    print(f"{policy.source}: {policy.label}")
    for key, value in asdict(policy).items():
        if key == "source":
            continue
        key = "sandbox.accept_weaker_isolation" if key == "accept_weaker_isolation" else key  # as in the file
        if isinstance(value, dict):
            for sub, item in value.items():
                print(f"  {key}.{sub} = {json.dumps(list(item) if isinstance(item, tuple) else item)}")
        else:
            print(f"  {key} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")
    return 0


def _policy_init(args: argparse.Namespace) -> int:
    path = write_default_policy(args.site, demo=args.demo, overwrite=args.force)
    print(
        f"wrote {path} ({'automatic approval (demo only)' if args.demo else 'manual approval'}); "
        "every key is described in the file"
    )
    return 0


def _privacy_show(args: argparse.Namespace) -> int:
    dp = load_policy(args.site).dp
    if dp is None:
        print("this site's policy has no [dp] section: updates leave without differential privacy")
        return 0
    ledger = PrivacyLedger(args.site, dp)
    spent, jobs = ledger.spent(), ledger.per_job()
    print(
        f"differential privacy: clip_norm {dp.clip_norm:g}, noise_multiplier "
        f"{dp.noise_multiplier:g} (noise std {dp.noise_std:g}), delta {dp.delta:g}; "
        f"ledger {ledger.path}"
    )
    print(f"budget     {dp.epsilon_budget:g}")
    print(f"spent      {spent:.4g} ({sum(j.rounds for j in jobs)} updates released)")
    fit = ledger.rounds_that_fit(10_000)
    print(f"remaining  {ledger.remaining():.4g} (the next job may train {fit} round(s))")
    if jobs:
        print(f"{'JOB':>20}  {'ROUNDS':>6}  EPSILON (this job alone; jobs compose to the total above)")
        for job in jobs:
            print(f"{job.run_id:>20}  {job.rounds:>6}  {job.epsilon:.4g}")
    return 0
