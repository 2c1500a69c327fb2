"""Plots: plain functions returning matplotlib Figures with the lines, bars and labels a reader expects."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from flip_lab.display import JobView
from flip_lab.plots import (
    PlotError,
    cross_site_matrix,
    harmonisation_distributions,
    learning_curves,
    site_comparison,
)

RECORDED = Path(__file__).parent / "notebooks" / "recorded_job" / "events.jsonl"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    events = [json.loads(line) for line in RECORDED.read_text().splitlines() if line.strip()]
    return JobView.from_events(events).frame()


def test_learning_curves_draw_one_line_per_site_and_the_aggregate(history: pd.DataFrame) -> None:
    fig = learning_curves(history, metric="dice", phase="evaluate")
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["aggregate", "site0", "site1", "site2"]
    assert lines["aggregate"].get_linewidth() > lines["site0"].get_linewidth()
    expected = history[(history.site == "site1") & (history.metric == "dice") & (history.phase == "evaluate")]
    assert list(lines["site1"].get_xdata()) == [1, 2]
    np.testing.assert_allclose(lines["site1"].get_ydata(), expected.sort_values("round")["value"])
    assert ax.get_ylabel() == "dice" and ax.get_xlabel() == "round"
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "aggregate"


@pytest.mark.parametrize(("rounds", "ticks"), [([1], [1.0]), ([1, 2, 3], [1.0, 2.0, 3.0])])
def test_learning_curves_tick_whole_rounds_only(rounds: list[int], ticks: list[float]) -> None:
    """One round is one tick at 1, not 0.96 to 1.04 around a lone point."""
    history = pd.DataFrame(
        [
            {"round": r, "site": site, "phase": "evaluate", "metric": "dice", "value": 0.5 + r / 10}
            for r in rounds
            for site in ("north", "aggregate")
        ]
    )
    (ax,) = learning_curves(history).axes
    fig = ax.get_figure()
    fig.canvas.draw()
    low, high = ax.get_xlim()
    shown = [t for t in ax.get_xticks() if low <= t <= high]
    assert shown == ticks


def test_learning_curves_of_a_job_with_no_rounds_yet() -> None:
    empty = pd.DataFrame(columns=["round", "site", "phase", "metric", "value"])
    (ax,) = learning_curves(empty).axes
    assert ax.get_lines() == [] and "no rounds yet" in ax.get_title()


def test_a_table_that_is_not_a_history_is_refused() -> None:
    with pytest.raises(PlotError, match=r"job\.history"):
        learning_curves(pd.DataFrame({"dice": [0.5]}))


def test_site_comparison_shows_the_final_round(history: pd.DataFrame) -> None:
    (ax,) = site_comparison(history, "dice").axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["site0", "site1", "site2", "aggregate"]
    final = history[(history["round"] == 2) & (history.metric == "dice") & (history.phase == "evaluate")]
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, [final.set_index("site").loc[s, "value"] for s in labels])
    assert "round 2" in ax.get_title()


def test_site_comparison_names_the_metrics_it_has(history: pd.DataFrame) -> None:
    with pytest.raises(PlotError, match="'loss'"):
        site_comparison(history, "auc")


def test_cross_site_matrix_is_a_labelled_heatmap() -> None:
    matrix = pd.DataFrame(
        [[0.9, 0.6, 0.5], [0.55, 0.88, 0.61], [0.8, 0.79, 0.82]],
        index=["site0", "site1", "global"],
        columns=["site0", "site1", "site2"],
    )
    fig = cross_site_matrix(matrix)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.get_images()[0].get_array(), matrix.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["site0", "site1", "global"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["site0", "site1", "site2"]
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:.3f}" for v in matrix.to_numpy().ravel())
    assert ax.get_xlabel() == "test site" and ax.get_ylabel() == "model"


def _hist(values: np.ndarray, key: str) -> dict:
    counts, edges = np.histogram(values, bins=20, density=key == "density")
    return {"edges": edges.tolist(), key: counts.tolist()}


@pytest.mark.parametrize("key", ["counts", "density"])
def test_harmonisation_distributions_before_and_after(key: str) -> None:
    rng = np.random.default_rng(0)
    report = {
        site: {"before": _hist(rng.normal(mu, 30, 500), key), "after": _hist(rng.normal(0, 1, 500), key)}
        for site, mu in (("north", 100.0), ("south", 400.0))
    }
    before, after = harmonisation_distributions(report).axes
    assert "before" in before.get_title() and "after" in after.get_title()
    for ax in (before, after):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["north", "south"]
        for patch in ax.patches:  # each step line is normalised to unit area
            values, edges, _baseline = patch.get_data()
            assert float((values * np.diff(edges)).sum()) == pytest.approx(1.0)


def test_harmonisation_distributions_name_the_broken_site() -> None:
    report = {"north": {"before": {"edges": [0, 1, 2], "counts": [1]}, "after": {"edges": [0, 1], "counts": [1]}}}
    with pytest.raises(PlotError, match=r"north.*before"):
        harmonisation_distributions(report)


def test_figures_render_to_png_off_the_main_thread(history: pd.DataFrame) -> None:
    pngs: list[bytes] = []
    worker = threading.Thread(target=lambda: pngs.append(learning_curves(history)._repr_png_()))
    worker.start()
    worker.join(30)
    assert pngs and pngs[0].startswith(PNG)
