"""Signed studies, verified by every site itself, on a real hub and real site kernels (127.0.0.1).

The hub of this module forwards every study unchecked (tests/hub_unchecked.py), as a compromised hub would: what is
refused here is refused by each site alone, with its own copy of the federation's CA and revocation list, and
written to its audit log. That the production hub refuses them too is tested in test_governance_hub.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flip_common.identity import SIGNATURE_KEY, SIGNATURE_KEYS, Identity, sign
from flip_lab._bundle import bundle, plan_config, plan_fab
from flip_lab.provision import Researcher, ensure_trust, revoke

UNCHECKED_HUB = Path(__file__).parent / "hub_unchecked.py"
SETTINGS = {"rounds": 1, "expected_sites": 2, "min_sites": 2, "round_timeout": 240}

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    import flip_lab
    import flip_lab.local

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flip_lab.local, "RUNNER", (str(UNCHECKED_HUB), "runner"))
        federation = flip_lab.local_federation(2, workdir=tmp_path_factory.mktemp("identity"), scale=0.3)
    yield federation
    federation.shutdown()


def _finished(fed, run_id: int, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = fed._client.run(run_id)
        if run is not None and run.status == "finished":
            return run
        time.sleep(0.25)
    raise AssertionError(f"run {run_id} did not finish within {timeout} s")


def _audit(site_dir: Path, event: str, run_id: int) -> list[dict]:
    lines = (site_dir / "audit.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == event and e.get("run_id") == run_id]


def _refused_everywhere(fed, run_id: int, reason: str) -> list[dict]:
    """Each site's audit entry refusing ``run_id`` for ``reason``."""
    run = _finished(fed, run_id)
    assert run.job_status == "failed", run.details
    found = []
    for name, site_dir in fed.site_dirs.items():
        entries = _audit(site_dir, "submission_refused", run_id)
        assert entries, f"site {name} did not audit a refusal of run {run_id}"
        assert {e["kind"] for e in entries} == {reason}, entries
        assert not _audit(site_dir, "submission_verified", run_id)
        assert not _audit(site_dir, "study_settings", run_id), "a refused study's settings were recorded"
        found += entries
    return found


def test_a_signed_study_runs_and_each_site_names_its_verified_submitter(fed, tiny_plan, capsys):
    from site_kernel.cli import main as flip_site

    job = fed.submit(tiny_plan, **SETTINGS)
    assert job.wait(timeout=600).status == "completed"
    for site_dir in fed.site_dirs.values():
        (entry,) = _audit(site_dir, "submission_verified", job.id)
        assert (entry["submitter"], entry["organisation"], entry["organisation_kind"]) == (
            "Local researcher",
            "This machine",
            "other",
        )
        capsys.readouterr()
        assert flip_site(["plans", "list", "--site", str(site_dir)]) == 0
        assert "submitter=Local researcher" in capsys.readouterr().out
        assert flip_site(["plans", "show", job.plan_hash[:12], "--site", str(site_dir)]) == 0
        assert "submitted by Local researcher (This machine, other), verified with this site's CA" in (
            capsys.readouterr().out
        )


def test_a_forged_signature_is_refused_and_audited_at_each_site(fed, tiny_plan):
    built = tiny_plan.build(SETTINGS)
    config = plan_config(built)
    config.update(sign(fed.identity, config))
    other = plan_config(tiny_plan.build({**SETTINGS, "seed": 7}))
    config[SIGNATURE_KEY] = sign(fed.identity, other)[SIGNATURE_KEY]  # genuine, but over another statement
    entries = _refused_everywhere(fed, fed._client.start_run(plan_fab(built, config)), "forged")
    assert all("does not verify" in e["reason"] for e in entries)


def test_an_unsigned_study_is_refused_and_audited_at_each_site(fed, tiny_plan):
    built = tiny_plan.build(SETTINGS)
    _refused_everywhere(fed, fed._client.start_run(plan_fab(built, plan_config(built))), "unsigned")


def test_a_researcher_of_another_ca_is_refused_and_audited_at_each_site(fed, tiny_plan, tmp_path):
    stranger = Identity.load(ensure_trust(tmp_path / "elsewhere", Researcher("eve", "Eve", "Elsewhere", "company")))
    fab = bundle(tiny_plan.build(SETTINGS), identity=stranger)
    entries = _refused_everywhere(fed, fed._client.start_run(fab), "unknown_ca")
    assert all("Eve (Elsewhere, company)" in e["reason"] for e in entries)


def test_a_revoked_researcher_is_refused_once_the_site_holds_the_new_list(fed, tiny_plan):
    from site_kernel.cli import main as flip_site

    trust = fed.workdir / "trust"
    mallory = Identity.load(ensure_trust(trust, Researcher("mallory", "Mallory", "Acme Imaging", "company")))
    crl = revoke(trust, "mallory")
    for site_dir in fed.site_dirs.values():  # what each data owner does with the new list
        assert flip_site(["trust", str(site_dir), "--crl", str(crl)]) == 0
    fab = bundle(tiny_plan.build(SETTINGS), identity=mallory)
    entries = _refused_everywhere(fed, fed._client.start_run(fab), "revoked")
    assert all("Mallory (Acme Imaging, company)" in e["reason"] for e in entries)


def test_an_old_signature_replayed_with_more_rounds_is_refused_and_audited(fed, tiny_plan):
    signed = plan_config(tiny_plan.build(SETTINGS))
    signed.update(sign(fed.identity, signed))
    more = tiny_plan.build({**SETTINGS, "rounds": 3})
    replay = {**plan_config(more), **{k: signed[k] for k in SIGNATURE_KEYS}}
    entries = _refused_everywhere(fed, fed._client.start_run(plan_fab(more, replay)), "altered")
    assert all("rounds 1 -> 3" in e["reason"] for e in entries)


def test_the_same_signed_study_submitted_again_is_refused_as_a_replay(fed, tiny_plan):
    fab = bundle(tiny_plan.build(SETTINGS), identity=fed.identity)
    first = fed._client.start_run(fab)
    assert _finished(fed, first).job_status == "completed"
    again = fed._client.start_run(fab)
    entries = _refused_everywhere(fed, again, "replayed")
    assert all(f"already run as job {first}" in e["reason"] for e in entries)
