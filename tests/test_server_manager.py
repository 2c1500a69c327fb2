"""The server extension's manager without HTTP: views, refusals in words, and a real local federation with two
sites whose jobs (submitted from elsewhere, as a notebook would) are tracked round by round."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import flip_lab
from flip_lab.errors import HubUnreachable
from flip_lab.jobview import JobView
from flip_lab.local import free_port, read_state, running_state, stop_pids
from flip_lab.server.manager import Busy, FederationManager, NotConnected, PanelError
from flip_lab.server.views import JobBoard, SiteBoard, dataset_summary, job_summary

PLANS = Path(__file__).parent / "plans"
torch.set_num_threads(1)


def wait_for(check: Callable[[], Any], timeout: float, what: str, manager: FederationManager | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if manager is not None:
            manager.poll()
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Recorder:
    """A listener that keeps every message, as a panel's socket would receive them."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, message: dict[str, Any]) -> None:
        with self._lock:
            self.messages.append(message)

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [m for m in self.messages if m["type"] == kind]


# -- views: pure -------------------------------------------------------------------------------------------
def test_dataset_summary_reads_counts_and_suppressed_counts_in_words():
    catalogue = {
        "datasets": {
            "default": {"modality": ["CT"], "cases": 110, "train_cases": 82, "test_cases": 28, "labelled": True},
            "extra": {"modality": ["MR", "CT"], "cases": "<5", "labelled": False},
        }
    }
    assert dataset_summary(catalogue) == (
        "CT · 110 cases (82 train, 28 test) · labelled; extra: MR/CT · <5 cases · unlabelled"
    )
    assert dataset_summary({"datasets": {}}) == "no datasets registered"


def test_site_board_counts_drops_of_a_flapping_site_and_remembers_when_it_was_seen():
    board = SiteBoard()
    assert board.update([{"site": "a", "online": True}], {"a": "MR"}, now=100.0)
    assert not board.update([{"site": "a", "online": True}], {"a": "MR"}, now=102.0), "only last_seen moved"
    for t, online in [(110, False), (120, True), (130, False), (140, True)]:
        board.update([{"site": "a", "online": online}], {"a": "MR"}, now=float(t))
    row = board.rows()[0]
    assert (row["state"], row["drops"], row["last_seen"]) == ("online", 2, 140.0)
    board.update([{"site": "a", "online": False}], {"a": "MR"}, now=150.0)
    assert board.rows()[0]["last_seen"] == 140.0
    board.update([{"site": "a", "online": True}], {"a": "MR"}, now=150.0 + 601)
    assert board.rows()[0]["drops"] == 0, "drops older than ten minutes are forgotten"
    assert board.mark_unknown() and board.rows()[0]["state"] == "unknown"


def test_the_job_view_gives_the_summary_the_panel_shows():
    view = JobView()
    for event in [
        {"type": "job_started", "rounds": 2, "strategy": "fedavg"},
        {"type": "reply", "round": 1, "phase": "evaluate", "site": "a", "metrics": {"dice": 0.1}},
        {"type": "aggregate", "round": 1, "phase": "evaluate", "metrics": {"dice": 0.5}},
        {"type": "site_error", "round": 2, "site": "a", "kind": "plan_error", "message": "ValueError"},
        {"type": "job_finished", "status": "failed", "message": "round 2 had too few sites"},
    ]:
        view.apply(event)
    job = job_summary("7", view)
    assert (job["status"], job["round"], job["released"], job["rounds"]) == ("failed", 1, 1, 2)
    assert job["metrics"] == {"dice": [(1, 0.5)]}, "per-site replies are not the aggregated series"
    assert job["errors"] == [{"site": "a", "round": 2, "kind": "plan_error", "message": "ValueError"}]


def test_round_is_the_round_in_progress_and_released_the_rounds_completed():
    """The panel says "round 2 of 3" while round 2 runs, and "1 of 3 rounds" for a job cancelled during it, as
    the notebook's dashboard does (flip_lab.display.round_words)."""
    view = JobView.from_events(
        [
            {"type": "job_started", "rounds": 3},
            {"type": "aggregate", "round": 1, "phase": "evaluate", "metrics": {"dice": 0.5}},
            {"type": "site_state", "round": 2, "site": "a", "state": "training"},
        ]
    )
    job = job_summary("7", view)
    assert (job["round"], job["released"]) == (2, 1)
    view.apply({"type": "job_finished", "status": "cancelled", "rounds_completed": 1})
    job = job_summary("7", view)
    assert (job["round"], job["released"]) == (2, 1)


def test_job_board_takes_flowers_status_only_until_the_hub_events_speak():
    board = JobBoard()
    board.add("7", status="pending", submitted="2026-01-01")
    assert board.update_from_hub("7", "starting")["status"] == "starting"
    assert board.update_from_hub("7", "starting") is None, "no change, no message"
    assert board.apply("7", {"type": "job_started", "rounds": 3})
    assert board.update_from_hub("7", "pending") is None, "the hub's own events are more precise"
    assert not board.apply("7", {"type": "reply", "round": 1}), "per-site replies stay server side"
    assert not board.apply("8", {"type": "job_started"}), "unknown jobs are ignored"
    board.add("9", status="running", submitted="2026-01-02")
    assert [j["id"] for j in board.rows()] == ["9", "7"]


def test_a_run_that_failed_before_any_event_carries_flowers_reason():
    board = JobBoard()
    board.add("7", status="pending", submitted="")
    assert board.update_from_hub("7", "failed", "the ServerApp crashed")["message"] == "the ServerApp crashed"


# -- refusals without a federation --------------------------------------------------------------------------
def test_a_hub_that_does_not_answer_is_refused_in_words_and_nothing_changes(tmp_path):
    manager = FederationManager(tmp_path)
    with pytest.raises(HubUnreachable, match=r"cannot reach the FLIP hub at 127\.0\.0\.1:\d+.*Is the federation up"):
        manager.connect(f"127.0.0.1:{free_port()}")
    assert manager.connection()["state"] == "disconnected"


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda m: m.cancel("12"), NotConnected, "not connected to a federation"),
        (lambda m: m.catalogue(), NotConnected, "start the local one or connect to a hub"),
        (lambda m: m.stop_local(), NotConnected, "nothing to stop"),
        (lambda m: m.start_local(0), PanelError, "between 1 and 16 sites"),
        (lambda m: m.start_local(True), PanelError, "between 1 and 16 sites"),
        (lambda m: m.connect(), PanelError, "either a hub address"),
        (lambda m: m.connect("h:1", workdir="/x"), PanelError, "either a hub address"),
    ],
)
def test_requests_that_cannot_be_done_say_what_to_do(tmp_path, call, error, words):
    with pytest.raises(error, match=words):
        call(FederationManager(tmp_path))


def test_a_saved_local_federation_that_is_gone_is_reported_as_stopped(tmp_path):
    (tmp_path / "connection.json").write_text(
        '{"kind": "local", "address": "127.0.0.1:1", "workdir": "%s", "ca_file": ""}' % (tmp_path / "gone")
    )
    manager = FederationManager(tmp_path)
    info = manager.restore()
    assert info["state"] == "stopped" and "start it again" in info["message"]
    assert not (tmp_path / "connection.json").exists()


# -- a real local federation ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A manager that started a real local federation (two small simulated hospitals) and a recorder on it."""
    manager = FederationManager(tmp_path_factory.mktemp("lab"), local_options={"scale": 0.3})
    recorder = Recorder()
    manager.subscribe(recorder)
    manager.start_local(2)
    yield manager, recorder
    manager.close()
    stop_pids(list((read_state(manager.local_workdir) or {}).get("pids", [])))


@pytest.mark.e2e
def test_start_local_reports_progress_and_lists_both_sites_online_with_their_data(running):
    manager, recorder = running
    states = [m["connection"]["state"] for m in recorder.messages if m["type"] in ("snapshot", "connection")]
    assert states[:2] == ["starting", "connected"]
    info = manager.connection()
    assert info["kind"] == "local" and info["workdir"] == str(manager.local_workdir)
    sites = wait_for(lambda: [s for s in manager.sites() if s["state"] == "online"], 30, "two sites online", manager)
    assert len(sites) == 2
    assert all(" cases (" in s["datasets"] and s["last_seen"] for s in sites)
    assert set(manager.catalogue()) == {s["site"] for s in sites}
    with pytest.raises(Busy, match="already running"):
        manager.start_local(2)


@pytest.mark.e2e
def test_a_job_submitted_from_a_notebook_is_tracked_round_by_round(running):
    manager, recorder = running
    notebook = flip_lab.attach(manager.local_workdir)  # another process would do the same; no shared objects
    job = notebook.submit(flip_lab.Plan.from_file(PLANS / "tiny_plan.py"), rounds=2, round_timeout=240)
    job_id = str(job.id)
    summary = wait_for(
        lambda: next((j for j in manager.jobs() if j["id"] == job_id and j["status"] == "completed"), None),
        300,
        f"job {job_id} to complete in the manager",
        manager,
    )
    assert (summary["round"], summary["rounds"]) == (2, 2)
    assert [r for r, _ in summary["metrics"]["dice"]] == [1, 2]
    assert set(summary["site_states"]) == {s["site"] for s in manager.sites()}
    mine = [m for m in recorder.messages if m.get("job", {}).get("id") == job_id or m.get("job_id") == job_id]
    assert mine[0]["type"] == "job", "a job is introduced before its events"
    rounds = sorted(
        m["event"]["round"]
        for m in mine
        if m["type"] == "job_event" and m["event"]["type"] == "aggregate" and m["event"]["phase"] == "evaluate"
    )
    assert rounds == [1, 2]
    assert not [m for m in mine if m["type"] == "job_event" and m["event"]["type"] == "reply"]


@pytest.mark.e2e
def test_a_new_manager_on_the_same_folder_picks_up_the_federation_and_its_jobs(running):
    """What a Jupyter server restart looks like to the manager."""
    manager, _ = running
    finished = [j for j in manager.jobs() if j["status"] == "completed"]
    assert finished
    successor = FederationManager(manager.store, local_options={"scale": 0.3}, stop_local_on_exit=False)
    info = successor.restore()
    assert (info["state"], info["address"]) == ("connected", manager.connection()["address"])
    again = wait_for(
        lambda: {j["id"]: j for j in successor.jobs()}.get(finished[0]["id"]),
        30,
        "the finished job in the new manager",
        successor,
    )
    assert (again["status"], again["round"], again["metrics"]) == ("completed", 2, finished[0]["metrics"])
    successor.close()
    assert running_state(manager.local_workdir) is not None, "closing a successor stops nothing"


@pytest.mark.e2e
def test_cancel_stops_a_running_job(running):
    manager, _ = running
    job = flip_lab.attach(manager.local_workdir).submit(
        flip_lab.Plan.from_file(PLANS / "tiny_plan.py"), rounds=50, round_timeout=240
    )
    job_id = str(job.id)
    wait_for(
        lambda: any(j["id"] == job_id and j["status"] == "running" for j in manager.jobs()),
        120,
        "the long job to run",
        manager,
    )
    manager.cancel(job_id)
    summary = wait_for(
        lambda: next((j for j in manager.jobs() if j["id"] == job_id and j["status"] == "cancelled"), None),
        30,
        "the job to read cancelled",
        manager,
    )
    assert summary["round"] < 50
    job.wait(60, raise_on_failure=False)
    assert job.status == "cancelled", "the hub itself stopped the run"


@pytest.mark.e2e
def test_a_federation_stopped_outside_the_panel_is_reported_in_words(running):
    manager, recorder = running
    state = read_state(manager.local_workdir)
    stop_pids(list(state["pids"]))
    info = wait_for(
        lambda: manager.connection()["state"] == "stopped" and manager.connection(),
        30,
        "the manager to notice",
        manager,
    )
    assert "no longer running" in info["message"] and "Start it again" in info["message"]
    assert {s["state"] for s in manager.sites()} == {"unknown"}
    assert recorder.of("connection")[-1]["connection"]["state"] == "stopped"
    manager.stop_local()
    assert manager.connection()["state"] == "disconnected"
    assert running_state(manager.local_workdir) is None
