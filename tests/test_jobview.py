"""One fold of a job's events: the notebook's ``Job``, its dashboard and the server's panel read the same view.

The same event lists are fed to ``flip_lab.jobview`` directly, to a ``Job`` re-attached from its folder, to the
dashboard's ``display.JobView`` and to the panel's ``JobBoard``; each must report the same job.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flip_lab.display import JobView as DashboardView
from flip_lab.display import round_words
from flip_lab.job import Job
from flip_lab.jobview import AGGREGATE, JobView, fold
from flip_lab.server.views import JobBoard, job_summary

T0 = 1_700_000_000.0
PLAN = "cd" * 32


def ev(type_: str, /, **fields: object) -> dict:
    return {"type": type_, **fields, "t": T0}


def finished_with_troubles() -> list[dict]:
    """Two rounds of three: one site fails in round 2, an update is rejected, a round is discarded, then the end."""
    return [
        ev("job_started", rounds=3, strategy="fedavg", min_sites=2, sites=["a", "b"], plan_hash=PLAN),
        ev("site_state", round=0, site="a", state="preparing_data", detail="strict v2"),
        ev("site_state", round=1, site="a", state="training"),
        ev("site_state", round=1, site="b", state="training"),
        ev(
            "reply",
            round=1,
            phase="train",
            site="a",
            metrics={"loss": 0.9},
            num_examples=40,
            compute_s=1.0,
            audit_head="h1",
            approval="approved",
        ),
        ev(
            "reply",
            round=1,
            phase="evaluate",
            site="a",
            metrics={"dice": 0.4, "loss": 0.8},
            num_examples=10,
            compute_s=0.5,
            audit_head="h2",
            approval="approved",
        ),
        ev("aggregate", round=1, phase="train", metrics={"loss": 0.85}, contributors=["a", "b"], wall_s=2.0),
        ev("aggregate", round=1, phase="evaluate", metrics={"dice": 0.45}, contributors=["a", "b"], wall_s=1.0),
        ev("site_state", round=2, site="b", state="failed", detail="ValueError at site b"),
        ev("site_error", round=2, phase="train", site="b", kind="plan_error", message="ValueError at site b"),
        ev("update_rejected", round=2, site="a", reason="non-finite values"),
        ev("round_discarded", round=2, phase="train", reason="too few sites"),
        ev("job_finished", status="failed", message="round 2 had too few sites", rounds_completed=1),
    ]


def still_running() -> list[dict]:
    return [
        ev("job_started", rounds=3, strategy="fedprox", min_sites=1, sites=[], plan_hash=PLAN),
        ev("aggregate", round=1, phase="evaluate", metrics={"dice": 0.5}, contributors=["a"], wall_s=1.0),
        ev("site_state", round=2, site="a", state="training"),
    ]


def job_from(events: list[dict], store: Path) -> Job:
    """A job re-attached from its folder, as after a kernel restart: its events come from events.jsonl."""
    store.mkdir(parents=True, exist_ok=True)
    (store / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return Job(None, 7, store, follow=False)  # type: ignore[arg-type]  # a finished job asks no hub


@pytest.mark.parametrize("events", [finished_with_troubles(), still_running()], ids=["finished", "running"])
def test_the_job_the_dashboard_and_the_panel_report_the_same_job(events: list[dict], tmp_path: Path) -> None:
    view = JobView.from_events(events)
    job = job_from(events, tmp_path / "job")
    dashboard = DashboardView.from_events(events, job_id=7)
    board = JobBoard()
    board.add("7", status="pending", submitted="2026-01-01T00:00:00")
    for event in events:
        board.apply("7", event)
    panel = board.get("7")
    assert panel is not None

    assert (job.status, job.round, job.released, job.rounds) == (view.status, view.round, view.released, view.rounds)
    assert (dashboard.status, dashboard.released, dashboard.rounds) == (view.status, view.released, view.rounds)
    assert (panel["status"], panel["round"], panel["released"], panel["rounds"]) == (
        view.status,
        view.round,
        view.released,
        view.rounds,
    )
    assert panel["strategy"] == dashboard.strategy == view.strategy
    assert job.errors == dashboard.errors == view.errors
    assert [(n["site"], n["round"], n["kind"]) for n in panel["errors"]] == [
        (e.get("site", ""), e["round"], e.get("kind", e["type"])) for e in view.errors
    ]
    reported = {name: site.state for name, site in view.sites.items() if site.reported}
    assert panel["site_states"] == reported == {name: s["state"] for name, s in job.site_states.items()}
    assert job.audit_heads() == dashboard.audit_heads() == view.audit_heads()
    assert job.history.equals(dashboard.frame())
    assert (
        panel["metrics"]
        == view.aggregate_series("evaluate")
        == {name: sorted(series.items()) for name, series in _aggregated(job).items()}
    )


def _aggregated(job: Job) -> dict[str, dict[int, float]]:
    frame = job.history
    rows = frame[(frame.site == AGGREGATE) & (frame.phase == "evaluate")]
    out: dict[str, dict[int, float]] = {}
    for round_, metric, value in zip(rows["round"], rows["metric"], rows["value"], strict=True):
        out.setdefault(metric, {})[int(round_)] = float(value)
    return out


def test_the_fold_reads_the_round_in_progress_and_the_rounds_completed() -> None:
    view = JobView.from_events(still_running())
    assert (view.status, view.round, view.released, view.rounds) == ("running", 2, 1, 3)
    assert round_words(DashboardView.from_events(still_running())) == "round 2 of 3"
    fold(view, ev("job_finished", status="cancelled", message="cancelled", rounds_completed=1))
    assert (view.status, view.round, view.released, view.done) == ("cancelled", 2, 1, True)


def test_a_late_job_started_does_not_undo_a_verdict(tmp_path: Path) -> None:
    """The job settled (cancelled by the researcher) before the hub's job_started line reached it: it stays
    cancelled everywhere, as the panel always had it."""
    events = [
        ev("job_finished", status="cancelled", message="cancelled", rounds_completed=0),
        ev("job_started", rounds=3),
    ]
    job = job_from(events, tmp_path / "job")
    assert job.status == "cancelled" and job.done
    assert JobView.from_events(events).status == "cancelled"
    assert job.rounds == 3, "what the late event says is still taken"


def test_unknown_events_and_missing_optional_fields_change_nothing_else() -> None:
    view = JobView.from_events(
        [ev("job_started", rounds=2), ev("a_new_kind_of_event", round=9), ev("site_state", site="a", state="training")]
    )
    assert (view.events, view.round, view.status) == (3, 0, "running")
    assert view.sites["a"].state == "training" and view.sites["a"].detail == ""


def test_the_sites_the_hub_names_are_listed_but_have_no_state_of_their_own_yet() -> None:
    view = JobView.from_events([ev("job_started", rounds=1, sites=["a", "b"])])
    assert set(view.sites) == {"a", "b"} and not any(s.reported for s in view.sites.values())
    assert job_summary("1", view)["site_states"] == {}, "the panel shows only states a site reported"
