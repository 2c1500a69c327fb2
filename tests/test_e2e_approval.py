"""Manual approval with a real site: nothing runs until the data owner approves the plan's exact hash."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import flip_lab

pytestmark = pytest.mark.e2e
TINY = (Path(__file__).parent / "plans" / "tiny_plan.py").read_text()


@pytest.fixture(scope="module")
def manual_site(tmp_path_factory):
    fed = flip_lab.local_federation(1, workdir=tmp_path_factory.mktemp("manual"), scale=0.3, approval="manual")
    yield fed, next(iter(fed.site_dirs.values()))
    fed.shutdown()


def flip_site(*args):
    return subprocess.run([sys.executable, "-m", "site_kernel.cli", *args], capture_output=True, text=True, timeout=60)


def wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_plan_waits_for_approval_then_runs_and_a_changed_plan_waits_again(manual_site):
    fed, site_dir = manual_site
    plan = flip_lab.Plan.from_source(TINY, name="approve-me")
    job = fed.submit(plan, rounds=1, min_sites=1, expected_sites=1, approval_timeout=300, round_timeout=120)
    wait_for(lambda: any(e.get("state") == "waiting_approval" for e in job.events))
    waiting = next(e for e in job.events if e.get("state") == "waiting_approval")
    assert "waiting for approval at site" in waiting["detail"]
    assert not list((site_dir / "logs").glob(f"researcher-{job.id}.log")), "an unapproved plan must never start"

    listed = flip_site("plans", "list", "--site", str(site_dir))
    assert job.plan_hash[:12] in listed.stdout and "pending" in listed.stdout
    shown = flip_site("plans", "show", job.plan_hash[:16], "--site", str(site_dir))
    assert "def train(model, data, config):" in shown.stdout  # the data owner reads the source in full
    approved = flip_site("plans", "approve", job.plan_hash[:16], "--site", str(site_dir), "--note", "reviewed")
    assert approved.returncode == 0, approved.stderr
    job.wait(timeout=300)
    assert job.status == "completed"

    changed = flip_lab.Plan.from_source(TINY.replace('lr=config["lr"]', 'lr=config["lr"] * 1'), name="approve-me")
    job2 = fed.submit(changed, rounds=1, min_sites=1, expected_sites=1, approval_timeout=4, round_timeout=60)
    job2.wait(timeout=120, raise_on_failure=False)
    assert job2.plan_hash != job.plan_hash
    assert job2.status == "failed" and "approved" in job2.message
    assert any(e.get("state") == "waiting_approval" for e in job2.events)


def test_rejected_plan_never_runs(manual_site):
    fed, site_dir = manual_site
    plan = flip_lab.Plan.from_source(
        TINY.replace("def dice(", "def dice_score(").replace("dice(logits", "dice_score(logits"), name="reject-me"
    )
    job = fed.submit(plan, rounds=1, min_sites=1, expected_sites=1, approval_timeout=300, round_timeout=60)
    wait_for(lambda: any(e.get("state") == "waiting_approval" for e in job.events))
    rejected = flip_site("plans", "reject", job.plan_hash[:16], "--site", str(site_dir), "--reason", "no")
    assert rejected.returncode == 0, rejected.stderr
    job.wait(timeout=120, raise_on_failure=False)
    assert job.status == "failed"
    assert any(e.get("detail") == "the data owner rejected this plan" for e in job.events)
    assert not list((site_dir / "logs").glob(f"researcher-{job.id}.log"))
