"""The data owner's review shows what runs: hidden characters are visible, CRLF plans are shown and
approved as hashed, run settings are recorded and bounded, and a wiped audit log is caught.

What a person sees is asserted through a terminal emulator (pyte), not on the raw bytes printed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pyte
import pytest

from flip_common.textsafe import visible
from site_kernel.approvals import ApprovalStore, plan_hash
from site_kernel.audit import AuditLog
from site_kernel.errors import PolicyError
from site_kernel.governance_cli import add_governance_commands
from site_kernel.policy import load_policy, write_default_policy

CONTRACT = {"modality": "MR", "dims": 2, "size": [8, 8], "spacing": [1.0, 1.0]}
SHAPES = {"fc.weight": [2, 64], "fc.bias": [2]}
# A line that copies pixels into the model, then erases itself and prints an innocent copy.
FORGED = (
    "def train(model, data, config):\n"
    "    model.fc.bias.data[:] = data.images[0, 0, 0, :2]\x1b[2K\x1b[1G    opt.step()\n"
    "    return {}\n"
)


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_governance_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def screen_of(text: str, columns: int = 200, lines: int = 60) -> list[str]:
    """What a terminal shows after printing ``text``: the rows of a pyte screen, right-trimmed."""
    screen = pyte.Screen(columns, lines)
    screen.set_mode(pyte.modes.LNM)  # "\n" returns to column 0, as a tty's output translation does
    pyte.Stream(screen).feed(text)
    return [row.rstrip() for row in screen.display]


def submit(site, source, meta=None, shapes=SHAPES):
    digest = plan_hash(source, CONTRACT, shapes)
    ApprovalStore(site).submit(digest, source, CONTRACT, shapes, meta or {"name": "demo"})
    return digest


def test_an_escape_sequence_cannot_hide_a_plan_line(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, FORGED)
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    seen = "\n".join(screen_of(capsys.readouterr().out))
    assert "data.images[0, 0, 0, :2]" in seen
    assert "\\x1b[2K\\x1b[1G" in seen
    assert "WARNING" in seen and "hidden or terminal-control characters" in seen


def test_a_plan_name_cannot_erase_its_own_row(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, "x = 1\n", meta={"name": "ok\x1b[2K\x1b[1A\x1b[2K\rno plans"})
    assert cli("plans", "list", "--site", str(tmp_path)) == 0
    rows = screen_of(capsys.readouterr().out)
    row = next(r for r in rows if r.startswith(digest[:12]))
    assert "pending" in row and "! " in row and "\\x1b[2K" in row
    assert not any(r.strip() == "no plans" for r in rows)


@pytest.mark.parametrize("char", ["\u202e", "\u2066", "\u200f", "\u061c", "\u200b", "\u2028"])
def test_bidi_and_invisible_characters_are_shown_and_flagged(tmp_path, capsys, char):
    write_default_policy(tmp_path, demo=False)
    source = f'access = "user{char} # admin"\n'
    digest = submit(tmp_path, source)
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    seen = "\n".join(screen_of(capsys.readouterr().out))
    assert f"<U+{ord(char):04X}>" in seen and "WARNING" in seen


def test_metric_and_model_names_are_shown_visibly(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, "x = 1\n", shapes={"fc\x1b[8m.weight": [2]})
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    seen = "\n".join(screen_of(capsys.readouterr().out))
    assert "fc\\x1b[8m.weight (2,)" in seen and "WARNING" in seen


def test_a_crlf_plan_is_shown_and_approved_as_hashed(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    source = "import torch\r\nx = 1\r\n"
    digest = submit(tmp_path, source)
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    rows = screen_of(capsys.readouterr().out)
    assert "   1 | import torch\\r" in rows and "   2 | x = 1\\r" in rows
    assert cli("plans", "approve", digest[:8], "--by", "owner", "--site", str(tmp_path)) == 0
    assert ApprovalStore(tmp_path).state(digest) == "approved"


def test_a_lone_carriage_return_is_not_a_hidden_line(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, "steal()\r# harmless comment\n")
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    rows = screen_of(capsys.readouterr().out)
    assert "   1 | steal()\\r# harmless comment" in rows


@pytest.mark.parametrize(
    ("raw", "multiline", "expected", "changed"),
    [
        ("plain text", False, "plain text", False),
        ("tab\there", True, "tab\there", False),
        ("tab\there", False, "tab\\there", True),
        ("a\nb", False, "a\\nb", True),
        ("\x07\x7f\x85\x9b", False, "\\x07\\x7f\\x85\\x9b", True),
        ("\u00ad\ufeff\u2029", False, "<U+00AD><U+FEFF><U+2029>", True),
        ("lone \ud800", False, "lone <U+D800>", True),
        ("accents é and 中文 stay", False, "accents é and 中文 stay", False),
    ],
)
def test_visible_escapes_exactly_the_hidden_characters(raw, multiline, expected, changed):
    assert visible(raw, multiline=multiline) == (expected, changed)


# -- run settings: recorded, bounded, re-approved --------------------------------------------------
def settings_for(rounds=3, lr=0.01, extra=None, weights=b"w0", name="demo"):
    from site_kernel.run_settings import run_settings

    config = {
        "rounds": rounds,
        "strategy": "fedavg",
        "seed": 0,
        "lr": lr,
        "round_timeout": 30.0,
        "extra": dict(extra or {}),
    }
    train = {"rounds": rounds, "lr": lr, "seed": 0, **(extra or {})}
    spec = {"name": name, "config": config, "train_config": train}
    return run_settings(spec, base64.b64encode(weights).decode())


def policy_with(tmp_path, text):
    write_default_policy(tmp_path, demo=False)
    path = tmp_path / "policy.toml"
    lines = path.read_text().splitlines()
    if text.startswith("["):  # a table goes at the end
        lines.append(text)
    else:  # a top-level key replaces the shipped line
        key = text.split("=")[0].strip()
        lines = [text if line.startswith(f"{key} =") else line for line in lines]
    path.write_text("\n".join(lines) + "\n")
    return load_policy(tmp_path)


@pytest.mark.parametrize(
    ("policy_text", "settings", "problem"),
    [
        ("max_rounds = 5", {"rounds": 6}, "asks for 6 rounds; this site's policy allows at most 5"),
        ("max_rounds = 5", {"rounds": 5}, None),
        ("[allowed_config]\nlr = {max = 0.1}", {"lr": 0.5}, "'lr' = 0.5 is outside"),
        ("[allowed_config]\nlr = {max = 0.1}", {"lr": 0.05}, None),
        ("[allowed_config]\nlr = {max = 0.1}", {"extra": {"copy": 1}}, "'copy' is not among"),
        ("[allowed_config]\ncopy = {values = [0]}", {"extra": {"copy": 1}}, "must be one of [0]"),
        ("[allowed_config]\ncopy = {values = [0]}", {"extra": {"copy": 0}}, None),
    ],
)
def test_policy_bounds_run_settings(tmp_path, policy_text, settings, problem):
    from site_kernel.run_settings import policy_problem

    found = policy_problem(settings_for(**settings), policy_with(tmp_path, policy_text))
    assert (found is None) if problem is None else (problem in found)


def test_a_bad_allowed_config_bound_is_refused_with_its_key(tmp_path):
    with pytest.raises(PolicyError, match=r"allowed_config\.lr.*\{min = A, max = B\}"):
        policy_with(tmp_path, "[allowed_config]\nlr = [0, 1]")


def test_settings_are_audited_shown_and_covered_by_the_approval(tmp_path, capsys):
    from site_kernel.run_settings import changes, settings_hash

    write_default_policy(tmp_path, demo=False)
    digest = submit(tmp_path, "x = 1\n")
    store = ApprovalStore(tmp_path)
    first = settings_for(rounds=3, weights=b"init")
    assert store.record_run(digest, 11, first) and not store.record_run(digest, 11, first)
    entries = AuditLog(tmp_path / "audit.jsonl").entries()
    logged = [e for e in entries if e["event"] == "study_settings"]
    assert len(logged) == 1 and logged[0]["run_id"] == 11
    assert logged[0]["settings"]["init_weights"] == hashlib.sha256(b"init").hexdigest()
    assert logged[0]["settings"]["config"]["rounds"] == 3
    assert cli("plans", "approve", digest[:8], "--by", "owner", "--site", str(tmp_path)) == 0
    assert settings_hash(first) in store.approved_settings(digest)

    later = settings_for(rounds=50, weights=b"init")
    store.record_run(digest, 12, later)
    assert settings_hash(later) not in store.approved_settings(digest)
    assert changes(first, later) == ["rounds 3 -> 50"]
    capsys.readouterr()
    assert cli("plans", "show", digest[:8], "--site", str(tmp_path)) == 0
    rows = screen_of(capsys.readouterr().out)
    run_rows = [r for r in rows if r.startswith("  run ")]
    assert "run 11" in run_rows[0] and "(approved)" in run_rows[0] and "rounds 3," in run_rows[0]
    assert "run 12" in run_rows[1] and "(not approved)" in run_rows[1]
    assert "rounds 50," in run_rows[1]
    assert hashlib.sha256(b"init").hexdigest()[:12] in run_rows[1]


# -- audit rollback --------------------------------------------------------------------------------
def test_a_wiped_audit_log_at_a_site_that_ran_studies_is_tampering(tmp_path, capsys):
    write_default_policy(tmp_path, demo=False)
    assert cli("audit", "verify", "--site", str(tmp_path)) == 0  # a new site: nothing to miss
    assert "intact: 0 entries" in capsys.readouterr().out
    digest = submit(tmp_path, "x = 1\n")
    assert cli("plans", "approve", digest[:8], "--by", "owner", "--site", str(tmp_path)) == 0
    assert cli("audit", "verify", "--site", str(tmp_path)) == 0
    (tmp_path / "audit.jsonl").unlink()
    (tmp_path / "audit.head").unlink()
    capsys.readouterr()
    assert cli("audit", "verify", "--site", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "TAMPERED" in out and "is missing" in out and digest[:12] in out
    AuditLog(tmp_path / "audit.jsonl").append("site_started")  # a fresh log in its place
    assert cli("audit", "verify", "--site", str(tmp_path)) == 1
    assert "holds 1 entries" in capsys.readouterr().out


def test_audit_heads_are_exported_from_a_run_record(tmp_path, capsys):
    from flip_lab.cli import main as flip_lab_main
    from flip_lab.study import audit_heads

    for job, heads in ((3, {"a": "1" * 64, "b": "2" * 64}), (4, {"a": "3" * 64})):
        folder = tmp_path / "jobs" / str(job)
        folder.mkdir(parents=True)
        sites = {k: {"audit_head": v, "approval": "approved"} for k, v in heads.items()}
        (folder / "governance.json").write_text(json.dumps({"sites": sites}))
    assert audit_heads(tmp_path) == {"a": "3" * 64, "b": "2" * 64}
    assert flip_lab_main(["study", "heads", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"flip-site audit verify --expected-head {'3' * 64}" in out


# -- with a real federation ------------------------------------------------------------------------
TINY = (Path(__file__).parent / "plans" / "tiny_plan.py").read_text()


@pytest.fixture(scope="module")
def strict_site(tmp_path_factory):
    import flip_lab

    fed = flip_lab.local_federation(1, workdir=tmp_path_factory.mktemp("review"), scale=0.3, approval="manual")
    name, site_dir = next(iter(fed.site_dirs.items()))
    path = site_dir / "policy.toml"
    path.write_text(
        path.read_text().replace("reapprove_on_settings_change = false", "reapprove_on_settings_change = true")
    )
    yield fed, name, site_dir
    fed.shutdown()


def flip_site(*args):
    return subprocess.run([sys.executable, "-m", "site_kernel.cli", *args], capture_output=True, text=True, timeout=60)


def wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.e2e
def test_changed_settings_wait_for_approval_and_the_log_holds_them(strict_site):
    import flip_lab

    fed, name, site_dir = strict_site
    plan = flip_lab.Plan.from_source(TINY, name="settings")
    job = fed.submit(plan, rounds=1, min_sites=1, expected_sites=1, approval_timeout=300, round_timeout=120)
    wait_for(lambda: any(e.get("state") == "waiting_approval" for e in job.events))
    approved = flip_site("plans", "approve", job.plan_hash[:16], "--site", str(site_dir))
    assert approved.returncode == 0, approved.stderr
    job.wait(timeout=300)
    assert job.status == "completed"

    logged = [
        e
        for e in AuditLog(site_dir / "audit.jsonl").entries()
        if e["event"] == "study_settings" and e["run_id"] == job.id
    ]
    assert len(logged) == 1
    settings = logged[0]["settings"]
    assert settings["config"]["rounds"] == 1 and settings["name"] == "settings"
    built = plan.build({"rounds": 1, "min_sites": 1, "expected_sites": 1})
    assert settings["init_weights"] == hashlib.sha256(built.weights).hexdigest()

    # The same approved plan, other settings: it waits, and the researcher is told why.
    again = fed.submit(plan, rounds=2, min_sites=1, expected_sites=1, approval_timeout=4, round_timeout=60)
    again.wait(timeout=120, raise_on_failure=False)
    assert again.plan_hash == job.plan_hash and again.status == "failed"
    waiting = [e["detail"] for e in again.events if e.get("state") == "waiting_approval"]
    assert waiting == [f"waiting for approval at site {name}: settings changed since approval (rounds 1 -> 2)"]
    assert not list((site_dir / "logs").glob(f"researcher-{again.id}.log"))
    shown_plan = flip_site("plans", "show", job.plan_hash[:16], "--site", str(site_dir))
    assert f"run {again.id}  " in shown_plan.stdout
    assert "(not approved)  rounds 2," in shown_plan.stdout

    # The researcher's last head catches a log cut back (and its sidecar rewritten to match).
    head = job.audit_heads()[name]
    kept = flip_site("audit", "verify", "--expected-head", head, "--site", str(site_dir))
    assert kept.returncode == 0, kept.stdout
    log_path = site_dir / "audit.jsonl"
    entries = log_path.read_bytes().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(entries) if json.loads(line)["hash"] == head)
    log_path.write_bytes(b"".join(entries[:cut]))
    last = json.loads(entries[cut - 1])
    (site_dir / "audit.head").write_text(json.dumps({"seq": last["seq"], "hash": last["hash"]}))
    assert flip_site("audit", "verify", "--site", str(site_dir)).returncode == 0
    rolled = flip_site("audit", "verify", "--expected-head", head, "--site", str(site_dir))
    assert rolled.returncode == 1 and "expected head" in rolled.stdout


def test_round_one_must_train_the_announced_initial_weights(tmp_path):
    import numpy as np
    from safetensors.numpy import save

    from site_kernel.executor import Executor, Refusal

    init = {"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.zeros(2)}
    announced = base64.b64encode(save(init)).decode()
    site = SimpleNamespace(audit=AuditLog(tmp_path / "audit.jsonl"), settings=SimpleNamespace(name="site-a"))
    Executor._check_first_weights(site, {k: v.copy() for k, v in init.items()}, announced, 7)
    swapped = {**init, "fc.bias": np.array([0.5, 0.25])}  # e.g. a hub seeding the model
    with pytest.raises(Refusal, match="weights of round 1 are not the initial weights"):
        Executor._check_first_weights(site, swapped, announced, 7)


def test_other_initial_weights_wait_under_initial_weights_approved(tmp_path):
    from site_kernel.executor import Executor

    policy = policy_with(tmp_path, 'initial_weights = "approved"')
    digest = submit(tmp_path, "x = 1\n")
    store = ApprovalStore(tmp_path)
    store.record_run(digest, 1, settings_for(rounds=3, weights=b"seed0"))
    store.approve(digest, by="owner")
    site = SimpleNamespace(approvals=store)
    hold = Executor._settings_hold
    assert hold(site, digest, settings_for(rounds=9, weights=b"seed0"), policy) is None
    held = hold(site, digest, settings_for(rounds=3, weights=b"other"), policy)
    assert held.startswith("initial weights changed since approval (initial weights ")
    assert "rounds" not in held


APPLIED = {
    "modality": "CT",
    "dims": 2,
    "size": [64, 64],
    "spacing": [3.0, 3.0],
    "intensity": {"kind": "window", "center": 40, "width": 400},
    "labels": {"background": 0, "lesion": 1},
}
OWN = (
    '"""A plan."""\n'
    "CONTRACT = {\n"
    '    "modality": "MR", "dims": 2, "size": [32, 32], "spacing": [6.0, 6.0],\n'
    '    "intensity": {"kind": "window", "center": 40, "width": 400}, "labels": {"background": 0, "lesion": 1},\n'
    "}\n"
    "def train(model, data, config):\n"
    "    return {}\n"
)


def show_plan(site, source, contract, capsys) -> list[str]:
    digest = plan_hash(source, contract, SHAPES)
    ApprovalStore(site).submit(digest, source, contract, SHAPES, {"name": "demo"})
    assert cli("plans", "show", digest[:8], "--site", str(site)) == 0
    return screen_of(capsys.readouterr().out)


def test_the_contract_that_applies_is_labelled_and_the_sources_own_is_marked_as_not_applying(tmp_path, capsys):
    rows = show_plan(tmp_path, OWN, {**APPLIED, "dataset": "liver\x1b[2K"}, capsys)
    heading = next(i for i, row in enumerate(rows) if row.startswith("contract that applies"))
    listing = next(i for i, row in enumerate(rows) if row.startswith("--- plan.py"))
    assert heading < listing
    block = rows[heading + 1 : heading + 9]
    assert '  modality    ["CT"]' in block and "  size        [64, 64]" in block
    assert '  dataset     "liver\\u001b[2K"' in block  # a control character from the study shows as text
    assert "  orientation " + '"RAS"' in block, "the defaults the site fills in are shown too"
    constant_ends = rows.index("   5 | }")
    assert rows[constant_ends + 1] == (
        "       ^ the source's own CONTRACT does NOT apply: the contract above does "
        "(they differ in dataset, modality, size, spacing)"
    )
    assert rows[constant_ends + 2] == "   6 | def train(model, data, config):"


@pytest.mark.parametrize(
    "source, note",
    [
        (
            OWN.replace('"MR"', '"CT"').replace("[32, 32]", "[64, 64]").replace("[6.0, 6.0]", "[3.0, 3.0]"),
            "       ^ the source's own CONTRACT: the same as the contract that applies",
        ),
        (OWN.replace("CONTRACT = {", "CONTRACT = dict(**{"), None),  # not valid Python: nothing to mark
        (
            OWN.replace("CONTRACT = {", "CONTRACT = make({").replace("}\ndef", "})\ndef"),
            "       ^ the source's own CONTRACT, not a plain value: it does not apply, the contract above does",
        ),
        ("def train(model, data, config):\n    return {}\n", None),
    ],
)
def test_the_sources_own_contract_is_marked_for_what_it_is(tmp_path, capsys, source, note):
    rows = show_plan(tmp_path, source, APPLIED, capsys)
    marks = [row for row in rows if row.startswith("       ^")]
    assert marks == ([note] if note else [])
