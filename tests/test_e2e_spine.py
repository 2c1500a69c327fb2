"""The spine end to end: a real SuperLink and three real site kernels on 127.0.0.1, studies sent from Python."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import flip_lab
from flip_lab.errors import HubUnreachable, JobFailed

PLANS = Path(__file__).parent / "plans"

pytestmark = pytest.mark.e2e


def test_fedavg_study_improves_and_streams_per_site_rows_while_running(federation, tiny_plan):
    seen_while_running: list[int] = []
    job = federation.submit(tiny_plan, rounds=2, lr=0.02, batch_size=16, expected_sites=3, round_timeout=240)

    def on_event(event):
        if event["type"] == "reply" and job.status == "running":
            seen_while_running.append(event["round"])

    job.subscribe(on_event)
    job.wait(timeout=600)
    assert job.status == "completed"
    history = job.history
    sites = set(history.site) - {"aggregate"}
    assert len(sites) == 3
    assert seen_while_running, "per-site replies must arrive before the job ends"
    loss = job.metric("loss")
    assert list(loss.index) == [1, 2] and loss[2] < loss[1]
    weights = job.final_weights()
    assert set(weights) == set(tiny_plan.build({}).spec["model_shapes"])


def test_the_same_study_with_the_same_seed_repeats_its_metrics_and_weights(federation, tiny_plan):
    import torch

    runs = []
    for _ in range(2):
        job = federation.submit(
            tiny_plan, rounds=2, seed=7, lr=0.02, batch_size=16, expected_sites=3, round_timeout=240
        )
        job.wait(timeout=600)
        history = job.history
        plan_metrics = history[history.metric.isin(["loss", "dice", "num_examples"])]
        runs.append(
            (plan_metrics.sort_values(["round", "site", "phase", "metric"]).reset_index(drop=True), job.final_weights())
        )
    (first, first_weights), (second, second_weights) = runs
    assert len(first) > 0
    assert first[["round", "site", "phase", "metric"]].equals(second[["round", "site", "phase", "metric"]])
    assert first.value.tolist() == second.value.tolist()
    assert all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)


def test_plan_that_raises_is_reported_by_site_round_and_kind_without_its_text(federation):
    plan = flip_lab.Plan.from_file(PLANS / "raising_plan.py")
    job = federation.submit(plan, rounds=1, expected_sites=3, round_timeout=240, check=False)  # past the dry run
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=600)
    errors = [e for e in job.errors if e["type"] == "site_error"]
    assert {e["site"] for e in errors} == {s["site"] for s in federation.sites()}
    assert all(e["round"] == 1 and e["kind"] == "plan_error" for e in errors)
    assert all("ValueError" in e["message"] and "line" not in e["message"] for e in errors)  # policy default
    text = str(failed.value) + repr(job.events)
    assert "CANARY-7f3a" not in text and "first pixel" not in text
    hub_log = (federation.workdir / "hub" / "superlink.log").read_text(errors="replace")
    assert "CANARY-7f3a" not in hub_log
    assert all(s["online"] for s in federation.sites()), "a researcher's error must not take a site down"


def test_reattach_by_id_from_a_new_connection(federation, tiny_plan, tmp_path):
    job = federation.submit(tiny_plan, rounds=2, expected_sites=3, round_timeout=240)
    while not job.events:
        time.sleep(0.2)
    other = flip_lab.connect(federation.address, workdir=tmp_path)
    again = other.job(job.id)
    again.wait(timeout=600)
    assert again.status == "completed"
    assert len(again.history) == len(job.wait(timeout=60).history)


def test_cancel_stops_the_job(federation, tiny_plan):
    job = federation.submit(tiny_plan, rounds=50, expected_sites=3, round_timeout=240)
    while job.round < 1:
        time.sleep(0.2)
    job.cancel()
    assert job.wait(timeout=60, raise_on_failure=False).status == "cancelled"
    info = federation._client.run(job.id)
    deadline = time.monotonic() + 30
    while info.status != "finished" and time.monotonic() < deadline:
        time.sleep(0.5)
        info = federation._client.run(job.id)
    assert info.job_status == "cancelled"


def test_unreachable_hub_is_reported_with_its_address(tiny_plan, tmp_path):
    from flip_lab.local import free_port

    port = free_port()
    fed = flip_lab.connect(f"127.0.0.1:{port}", workdir=tmp_path)
    with pytest.raises(HubUnreachable, match=f"127.0.0.1:{port}"):
        fed.submit(tiny_plan, rounds=1)


def test_second_federation_in_the_same_folder_is_refused(federation):
    with pytest.raises(flip_lab.FederationError, match="already running"):
        flip_lab.local_federation(1, workdir=federation.workdir)
    assert all(s["online"] for s in federation.sites())


# -- the README's commands on this module's federation (tests/test_readme.py lists which test runs which) --------
def test_jobs_lists_and_cancel_stops_a_study(federation, tiny_plan, capsys):
    from flip_lab.cli import main as flip_lab_main

    job = federation.submit(tiny_plan, rounds=50, expected_sites=3, round_timeout=240)
    while job.round < 1:
        time.sleep(0.2)
    workdir = str(federation.workdir)
    assert flip_lab_main(["jobs", "--workdir", workdir]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [str(job.id), "running"] in [row[:2] for row in listed]
    assert flip_lab_main(["cancel", str(job.id), "--workdir", workdir]) == 0
    assert capsys.readouterr().out == f"job {job.id} cancelled\n"
    assert job.wait(timeout=60, raise_on_failure=False).status == "cancelled"


class _Borrowed:
    """This module's federation as ``LocalFederation.start`` would return it, left running at the end."""

    def __init__(self, fed):
        self.fed = fed

    def __enter__(self):
        return self.fed

    def __exit__(self, *exc):
        return None


def test_the_demo_runs_a_study_and_prints_its_metrics(federation, tiny_plan, monkeypatch, capsys):
    """``flip-lab demo`` on this module's (smaller) hospitals with the tiny plan: starting its own four hospitals and
    training its UNet takes minutes on 2 cores. Starting a federation and the demo's plan are tested on their own
    (test_local_lifecycle, test_data_plan)."""
    from flip_lab import cli
    from flip_lab.local import LocalFederation

    monkeypatch.setattr(LocalFederation, "start", classmethod(lambda cls, *args, **kwargs: _Borrowed(federation)))
    monkeypatch.setattr(cli, "demo_plan", lambda: tiny_plan)
    assert cli.main(["demo", "--sites", "3", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 rounds of fedavg" in out and "final round, evaluation on each site's held-out test set:" in out
    table = out.split("held-out test set:")[1]
    assert "dice" in table and all(name in table for name in federation.site_dirs)
