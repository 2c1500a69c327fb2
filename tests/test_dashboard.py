"""The live dashboard: state from recorded event streams, updates from the job's thread, the final static summary."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path

import nbformat
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from flip_lab import Job
from flip_lab.dashboard import Dashboard, show
from flip_lab.display import JobView, site_rows
from flip_lab.plots import dashboard_figure

NOTEBOOKS = Path(__file__).parent / "notebooks"
RECORDED = NOTEBOOKS / "recorded_job"  # a 3-site, 2-round job recorded on the local federation
PNG = b"\x89PNG\r\n\x1a\n"
T0 = 1_800_000_000.0


def recorded_events() -> list[dict]:
    return [json.loads(line) for line in (RECORDED / "events.jsonl").read_text().splitlines() if line.strip()]


def replayed_job(tmp_path: Path) -> Job:
    store = tmp_path / "job"
    shutil.copytree(RECORDED, store)
    return Job(None, 11, store, follow=False)  # type: ignore[arg-type]


def empty_job(tmp_path: Path, rounds: int = 2) -> Job:
    return Job(None, 12, tmp_path / "live", rounds=rounds, follow=False)  # type: ignore[arg-type]


def troubled_stream() -> list[dict]:
    """A job where one site waits for approval, one withholds its reply and one fails, as the hub reports them."""
    return [
        {
            "type": "job_started",
            "rounds": 3,
            "strategy": "fedprox",
            "min_sites": 2,
            "sites": [],
            "plan_hash": "ab" * 32,
            "t": T0,
        },
        {
            "type": "site_state",
            "round": 0,
            "site": "north",
            "state": "waiting_approval",
            "detail": "waiting for approval at site north",
            "t": T0 + 1,
        },
        {
            "type": "site_state",
            "round": 0,
            "site": "east",
            "state": "preparing_data",
            "detail": "strict v2",
            "t": T0 + 1,
        },
        {
            "type": "site_state",
            "round": 0,
            "site": "west",
            "state": "preparing_data",
            "detail": "strict v2",
            "t": T0 + 1,
        },
        {"type": "site_state", "round": 1, "site": "east", "state": "training", "t": T0 + 2},
        {"type": "site_state", "round": 1, "site": "west", "state": "training", "t": T0 + 2},
        {
            "type": "reply",
            "round": 1,
            "phase": "train",
            "site": "east",
            "metrics": {"loss": 0.7},
            "num_examples": 40,
            "compute_s": 1.0,
            "audit_head": "e1" * 32,
            "approval": "approved",
            "t": T0 + 3,
        },
        {
            "type": "site_error",
            "round": 1,
            "phase": "train",
            "site": "west",
            "kind": "withheld",
            "message": "metric 'hist' is not allowed by the site's egress policy",
            "t": T0 + 3,
        },
        {
            "type": "site_state",
            "round": 1,
            "site": "west",
            "state": "withheld",
            "detail": "metric 'hist' is not allowed by the site's egress policy",
            "t": T0 + 3,
        },
        {
            "type": "site_state",
            "round": 1,
            "site": "east",
            "state": "failed",
            "detail": "worker ran out of memory",
            "t": T0 + 4,
        },
        {"type": "round_discarded", "round": 1, "phase": "train", "reason": "1 contributor, fewer than 2", "t": T0 + 4},
    ]


def test_replayed_stream_shows_final_state(tmp_path: Path) -> None:
    dash = Dashboard(replayed_job(tmp_path))
    headline, progress, states, curves, governance, problems = dash.widget.children
    assert (progress.value, progress.max, progress.bar_style) == (2, 2, "success")
    assert "completed, 2 of 2 rounds" in headline.value
    for site in ("site0", "site1", "site2"):
        assert site in states.value
    assert states.value.count(">done<") == 3
    events = recorded_events()
    heads = {e["site"]: e["audit_head"] for e in events if e["type"] == "reply"}  # the last reply per site wins
    for head in heads.values():
        assert f"title='{head}'" in governance.value
    assert events[0]["plan_hash"] in governance.value
    assert "automatic approval (demo only)" in governance.value
    assert problems.value == ""
    assert bytes(curves.value).startswith(PNG)


@pytest.mark.parametrize(
    ("site", "label", "detail"),
    [
        ("north", "waiting for approval", "waiting for approval at site north"),
        ("west", "withheld by policy", "metric 'hist' is not allowed by the site's egress policy"),
        ("east", "failed", "worker ran out of memory"),
    ],
)
def test_site_states_carry_the_sites_detail(site: str, label: str, detail: str) -> None:
    rows = {row["site"]: row for row in site_rows(JobView.from_events(troubled_stream()))}
    assert rows[site]["state"] == label
    assert rows[site]["detail"] == detail


def test_problems_and_governance_of_a_troubled_job(tmp_path: Path) -> None:
    job = empty_job(tmp_path, rounds=3)
    dash = Dashboard(job)
    for event in troubled_stream():
        job._apply(event)
    problems = dash.widget.children[5].value
    assert "withheld" in problems and "fewer than 2" in problems
    assert "strict v2" in dash.governance.value  # the policy label the approving sites reported
    assert "e1e1e1e1" in dash.governance.value
    assert dash.progress.value == 0 and dash.progress.max == 3


def test_updates_from_a_background_thread_reach_the_widget(tmp_path: Path) -> None:
    """The job's thread delivers events while the main thread keeps working and reads the widget's state."""
    events = recorded_events()
    pause_at = next(i for i, e in enumerate(events) if e["type"] == "aggregate" and e["phase"] == "evaluate")
    job = empty_job(tmp_path)
    dash = Dashboard(job, min_interval=0.05)
    main_has_looked = threading.Event()

    def hub_thread() -> None:
        for i, event in enumerate(events):
            job._apply(event)  # what the job's hub-reading thread does with every event
            if i == pause_at:
                main_has_looked.wait(60)

    feeder = threading.Thread(target=hub_thread, daemon=True)
    feeder.start()
    deadline = time.monotonic() + 60  # generous: the suite runs modules side by side on 2 cores
    busy = 0
    while True:
        busy += sum(range(1000))  # the researcher's own work in the meantime
        if dash.widget.children[1].value >= 1 or time.monotonic() > deadline:
            break
    assert dash.widget.children[1].value == 1
    assert feeder.is_alive() and busy > 0
    assert "running, round 1 of 2" in dash.widget.children[0].value
    main_has_looked.set()
    job.wait(timeout=60)  # the final redraw renders the plots: seconds on a loaded machine
    feeder.join(5)
    assert dash.widget.children[1].value == 2
    assert dash.widget.children[1].bar_style == "success"
    assert bytes(dash.widget.children[3].value).startswith(PNG)


def test_curves_are_throttled(tmp_path: Path) -> None:
    rounds = 40
    job = empty_job(tmp_path, rounds=rounds)
    dash = Dashboard(job, min_interval=0.5)
    start = time.monotonic()
    for r in range(1, rounds + 1):
        for site in ("a", "b", "c"):
            job._apply(
                {
                    "type": "reply",
                    "round": r,
                    "phase": "evaluate",
                    "site": site,
                    "metrics": {"dice": r / rounds},
                    "num_examples": 4,
                    "compute_s": 0.1,
                    "t": T0 + r,
                }
            )
        job._apply(
            {
                "type": "aggregate",
                "round": r,
                "phase": "evaluate",
                "metrics": {"dice": r / rounds},
                "contributors": ["a", "b", "c"],
                "wall_s": 0.0,
                "t": T0 + r,
            }
        )
    job._apply(
        {
            "type": "job_finished",
            "status": "completed",
            "message": "all rounds released",
            "rounds_completed": rounds,
            "t": T0 + 99,
        }
    )
    elapsed = time.monotonic() - start
    assert dash.renders <= 2 + elapsed / 0.5  # 160 curve events, a handful of renders
    assert dash.progress.value == rounds


def test_a_misbehaving_event_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = empty_job(tmp_path)
    dash = Dashboard(job)
    with caplog.at_level(logging.ERROR, logger="flip_lab"):
        dash._on_event({"type": "reply", "site": "x", "metrics": {"dice": "n/a"}})  # the subscriber callback
        dash._on_event({"type": "site_state"})
    assert "could not show a reply event" in caplog.text
    for event in recorded_events():
        job._apply(event)
    assert dash.progress.value == 2


def test_show_never_raises_into_the_cell(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="flip_lab"):
        assert show(object()) is None  # type: ignore[arg-type]  # not a job at all
    assert "the dashboard could not be shown" in caplog.text


@pytest.fixture
def shell() -> InteractiveShell:
    return InteractiveShell.instance()


def test_finalize_fills_the_outputs_reserved_under_the_widget(tmp_path: Path, shell: InteractiveShell) -> None:
    job = empty_job(tmp_path)
    with capture_output() as shown:
        dash = show(job)
    assert dash is not None
    widget_view, figure_slot, table_slot = shown.outputs
    assert "application/vnd.jupyter.widget-view+json" in widget_view.data
    with capture_output() as later:  # the job ends while another cell runs
        for event in recorded_events():
            job._apply(event)
    updates = [o for o in later.outputs if o.update]
    figure = next(o for o in updates if "image/png" in o.data)
    table = next(o for o in updates if "text/html" in o.data)
    assert figure.transient["display_id"] == figure_slot.transient["display_id"]
    assert table.transient["display_id"] == table_slot.transient["display_id"]
    assert "<table>" in table.data["text/html"] and "site2" in table.data["text/html"]
    assert "| site0 | done |" in table.data["text/markdown"]
    assert dash.finalized
    assert dash.widget.layout.display == "none", "the finished job's plots show once: in the static output"


def test_show_as_a_cells_last_expression_displays_once(tmp_path: Path, shell: InteractiveShell) -> None:
    shell.user_ns.update(job=empty_job(tmp_path), show=show)
    with capture_output() as first:
        shell.run_cell("dash = show(job); dash", store_history=True)
    with capture_output() as again:  # asking for it in a later cell shows it there too
        shell.run_cell("dash", store_history=True)
    views = [o for o in first.outputs if "application/vnd.jupyter.widget-view+json" in o.data]
    assert len(views) == 1
    assert sum("application/vnd.jupyter.widget-view+json" in o.data for o in again.outputs) == 1


def test_finalize_without_show_displays_here(tmp_path: Path, shell: InteractiveShell) -> None:
    dash = Dashboard(replayed_job(tmp_path))
    with capture_output() as out:
        dash.finalize()
    kinds = [set(o.data) for o in out.outputs]
    assert any("image/png" in k for k in kinds) and any("text/html" in k for k in kinds)


def test_headless_notebook_keeps_the_final_state(tmp_path: Path) -> None:
    """Executed by nbclient (as papermill does): the saved notebook holds a PNG and the summary table."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / "live_dashboard.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = nb.cells[1].outputs  # the cell that showed the dashboard; the job ended two cells later
    data = [o.get("data", {}) for o in outputs]
    assert any("application/vnd.jupyter.widget-view+json" in d for d in data)
    assert any(d.get("image/png") for d in data)
    table = next(d["text/html"] for d in data if "text/html" in d)
    assert "completed, 2 of 2 rounds" in table and "site1" in table
    assert "completed True" in nb.cells[3].outputs[0]["text"]


def test_curves_are_drawn_at_twice_the_pixels_they_are_shown_at(tmp_path: Path, shell: InteractiveShell) -> None:
    dash = Dashboard(replayed_job(tmp_path), dpi=80, pixel_ratio=2)
    png = bytes(dash.curves.value)
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the PNG's IHDR
    shown = int(dash.curves.layout.width.removesuffix("px"))
    assert shown == 768  # the dashboard figure is 9.6 inches wide, at 80 screen pixels per inch
    assert (width, height) == (2 * shown, 2 * round(3.4 * 80))
    with capture_output() as out:
        dash.finalize()
    static = next(o for o in out.outputs if "image/png" in o.data)
    assert static.metadata["image/png"]["width"] == shown  # the saved notebook's picture is shown as large


@pytest.mark.parametrize(("value", "top"), [(0.0, 1.0), (0.9, 1.8)])
def test_a_metric_that_stays_flat_is_drawn_from_zero(tmp_path: Path, value: float, top: float) -> None:
    """A model that has learnt only the background keeps a Dice of 0: its curve must not float amid negative ticks."""
    job = empty_job(tmp_path, rounds=3)
    for r in (1, 2, 3):
        for site in ("north", "east"):
            job._apply(
                {
                    "type": "reply",
                    "round": r,
                    "phase": "evaluate",
                    "site": site,
                    "metrics": {"dice": value, "loss": 1 / r},
                    "num_examples": 4,
                    "compute_s": 0.1,
                    "t": T0 + r,
                }
            )
    dice_axes, _loss = dashboard_figure(job.history, "dice").axes
    low, high = dice_axes.get_ylim()
    assert -0.05 * top < low <= 0 and high >= top


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ([{"type": "job_started", "rounds": 3}], "running, sites preparing"),
        (
            [
                {"type": "job_started", "rounds": 3},
                {"type": "site_state", "round": 1, "site": "a", "state": "training"},
            ],
            "running, round 1 of 3",
        ),
        # round 1 released, round 2 under way: the round in progress, as the side panel says it ("round 2 of 3")
        (
            [
                {"type": "job_started", "rounds": 3},
                {"type": "aggregate", "round": 1, "phase": "evaluate", "metrics": {}},
                {"type": "site_state", "round": 2, "site": "a", "state": "training"},
            ],
            "running, round 2 of 3",
        ),
        (
            [
                {"type": "job_started", "rounds": 3},
                {"type": "site_state", "round": 2, "site": "a", "state": "training"},
                {"type": "job_finished", "status": "cancelled", "rounds_completed": 1},
            ],
            "cancelled, 1 of 3 rounds",
        ),
        (
            [
                {"type": "job_started", "rounds": 1},
                {"type": "job_finished", "status": "completed", "rounds_completed": 1},
            ],
            "completed, 1 of 1 round",
        ),
    ],
)
def test_round_words_say_the_round_in_progress_then_the_rounds_completed(events: list[dict], words: str) -> None:
    """The same words as the panel's job headline (extensions/flip-lab/test/format.test.ts)."""
    from flip_lab.display import headline

    assert headline(JobView.from_events(events, job_id=7)) == f"Job 7: {words}"


def test_a_job_cancelled_during_round_2_reads_one_round_completed(tmp_path: Path) -> None:
    """A cancelled run sends no final event of its own: the job settles it from the rounds released, not from the
    round the sites had reached."""
    job = empty_job(tmp_path, rounds=3)
    dash = Dashboard(job)
    for event in [
        {"type": "job_started", "rounds": 3, "t": T0},
        {"type": "aggregate", "round": 1, "phase": "train", "metrics": {"loss": 0.5}, "t": T0 + 1},
        {"type": "site_state", "round": 2, "site": "a", "state": "training", "t": T0 + 2},
    ]:
        job._apply(event)
    assert "running, round 2 of 3" in dash.headline.value
    job._settle("cancelled", "cancelled")
    assert job.events[-1]["rounds_completed"] == 1
    assert "cancelled, 1 of 3 rounds" in dash.headline.value
