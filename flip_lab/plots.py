"""A study's figures as plain functions returning matplotlib ``Figure`` objects.

Figures are built with matplotlib's object API and rendered by the Agg canvas, never through ``pyplot``: nothing
touches pyplot's global figure list or a GUI backend, so the dashboard can render from a background thread, and a
figure returned as a cell's value shows once (pyplot's inline backend would show it a second time at the end of the
cell). The returned figures show themselves in notebooks as PNG.

>>> fig = learning_curves(job.history, metric="dice")      # doctest: +SKIP
>>> fig.savefig("curves.png")                              # doctest: +SKIP
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import FlipError
from .history import AGGREGATE

AGGREGATE_STYLE = {"color": "black", "linewidth": 2.5, "marker": "o", "zorder": 3}


class PlotError(FlipError):
    """The data handed to a plot function cannot be drawn; the message says what was expected."""


class FlipFigure(Figure):
    """A matplotlib Figure on the Agg canvas that notebooks display as PNG without pyplot."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        FigureCanvasAgg(self)

    def to_png(self, dpi: int = 100) -> bytes:
        buffer = io.BytesIO()
        # The figure's constrained layout already fits its labels; bbox_inches="tight" would draw it twice.
        self.savefig(buffer, format="png", dpi=dpi)
        return buffer.getvalue()

    def _repr_png_(self) -> bytes:
        return self.to_png()


def new_figure(ncols: int = 1, *, width: float = 6.0, height: float = 4.0) -> tuple[FlipFigure, list[Axes]]:
    fig = FlipFigure(figsize=(width * ncols, height), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _check_history(history: pd.DataFrame) -> None:
    missing = {"round", "site", "phase", "metric", "value"} - set(getattr(history, "columns", []))
    if missing:
        raise PlotError(
            f"expected a job history table (job.history) with columns round, site, phase, metric, "
            f"value; missing {sorted(missing)}"
        )


def _select(history: pd.DataFrame, metric: str, phase: str) -> pd.DataFrame:
    _check_history(history)
    return history[(history["metric"] == metric) & (history["phase"] == phase)]


def learning_curves(
    history: pd.DataFrame, metric: str = "dice", phase: str = "evaluate", *, ax: Axes | None = None
) -> Figure:
    """``metric`` over rounds: one thin line per site, the aggregate as a thick black line labelled ``aggregate``.

    ``history`` is ``job.history``. With ``ax``, draws into that Axes and returns its figure. An empty selection
    (no rounds yet) gives an empty, labelled plot rather than an error, so a live dashboard can draw from round 0.
    """
    if ax is None:
        _, (ax,) = new_figure()
    rows = _select(history, metric, phase)
    for site, part in sorted(rows.groupby("site"), key=lambda kv: (kv[0] == AGGREGATE, str(kv[0]))):
        part = part.groupby("round")["value"].mean().sort_index()
        style = AGGREGATE_STYLE if site == AGGREGATE else {"linewidth": 1.2, "marker": ".", "alpha": 0.85}
        ax.plot(part.index.to_numpy(), part.to_numpy(), label=str(site), **style)  # type: ignore[arg-type]
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({phase}) per site" if not rows.empty else f"{metric} ({phase}): no rounds yet")
    if not rows.empty:
        ax.xaxis.get_major_locator().set_params(integer=True)  # type: ignore[call-arg]
        first, last = int(rows["round"].min()), int(rows["round"].max())
        if first == last:  # matplotlib pads one point by ±4 %, ticking rounds 0.96 to 1.04
            ax.set_xlim(first - 0.5, last + 0.5)
            ax.set_xticks([first])
        ax.legend(loc="best", fontsize="small")
        low, high = float(rows["value"].min()), float(rows["value"].max())
        if low == high and low >= 0:
            # matplotlib centres a constant on a ±0.04 range; a Dice of 0 would sit amid negative ticks.
            top = max(1.0, 2 * high)
            ax.set_ylim(-0.03 * top, 1.03 * top)
    ax.grid(alpha=0.3)
    fig = ax.get_figure(root=True)
    assert isinstance(fig, Figure)
    return fig


def site_comparison(
    history: pd.DataFrame, metric: str = "dice", phase: str = "evaluate", *, at_round: int | None = None
) -> Figure:
    """A bar per site (and the aggregate, hatched) for ``metric`` at the final round (or ``at_round``)."""
    rows = _select(history, metric, phase)
    if rows.empty:
        raise PlotError(
            f"the history has no {metric!r} values for phase {phase!r}; metrics present: "
            f"{sorted(set(history['metric']))}"
        )
    at = int(rows["round"].max()) if at_round is None else int(at_round)
    rows = rows[rows["round"] == at]
    if rows.empty:
        raise PlotError(f"the history has no {metric!r} values at round {at}")
    values = rows.groupby("site")["value"].mean()
    order = sorted(values.index, key=lambda s: (s == AGGREGATE, str(s)))
    fig, (ax,) = new_figure(width=max(4.0, 1.0 + 0.9 * len(order)))
    bars = ax.bar(
        [str(s) for s in order],
        [float(values[s]) for s in order],
        color=["#455a64" if s == AGGREGATE else "#1e88e5" for s in order],
    )
    for bar, site in zip(bars, order, strict=True):
        if site == AGGREGATE:
            bar.set_hatch("//")
    ax.bar_label(bars, fmt="%.3f", fontsize="small")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({phase}) at round {at}")
    ax.grid(axis="y", alpha=0.3)
    return fig


def cross_site_matrix(matrix: pd.DataFrame, *, metric: str = "dice", fmt: str = ".3f") -> Figure:
    """A heatmap of ``matrix``: rows are models (a site's local model, or ``global``), columns the test sites."""
    if not isinstance(matrix, pd.DataFrame) or matrix.empty:
        raise PlotError("expected a non-empty pandas DataFrame with one row per model and one column per test site")
    values = matrix.to_numpy(dtype=float)
    fig, (ax,) = new_figure(width=1.5 + 1.1 * matrix.shape[1], height=1.2 + 0.8 * matrix.shape[0])
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    ax.set_yticks(range(matrix.shape[0]), [str(r) for r in matrix.index])
    ax.set_xlabel("test site")
    ax.set_ylabel("model")
    finite = values[np.isfinite(values)]
    middle = float(finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), value in np.ndenumerate(values):
        if np.isfinite(value):
            ax.text(
                j,
                i,
                format(value, fmt),
                ha="center",
                va="center",
                color="white" if value < middle else "black",
                fontsize="small",
            )
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{metric}: model (row) on test site (column)")
    return fig


def harmonisation_distributions(report: Mapping[str, Mapping[str, Any]]) -> Figure:
    """Per-site intensity histograms before (left) and after (right) harmonisation.

    ``report`` maps each site to ``{"before": HIST, "after": HIST}`` where ``HIST`` is
    ``{"edges": [n + 1 floats], "counts": [n numbers]}``; ``"density"`` is accepted in place of ``"counts"``
    (``site_kernel.data.harmonisation_report`` gives densities, and extra keys such as ``percentiles`` are ignored).
    Histograms are drawn as normalised step lines so sites with different case counts compare by shape.
    """
    if not report:
        raise PlotError("expected {site: {'before': {'edges': [...], 'counts': [...]}, 'after': {...}}}, got nothing")
    fig, axes = new_figure(2, width=5.5)
    for side, ax in zip(("before", "after"), axes, strict=True):
        for site, stages in sorted(report.items()):
            hist = stages.get(side) if isinstance(stages, Mapping) else None
            if not hist:
                raise PlotError(f"site {site!r} has no {side!r} histogram; expected keys 'before' and 'after'")
            edges = np.asarray(hist.get("edges", []), dtype=float)
            counts = np.asarray(hist.get("counts", hist.get("density", [])), dtype=float)
            if edges.size == 0 and counts.size == 0:
                continue  # a site with no cases has an empty histogram: nothing to draw
            if edges.size != counts.size + 1:
                raise PlotError(
                    f"site {site!r} {side}: {edges.size} edges for {counts.size} counts; "
                    f"a histogram needs one edge more than counts"
                )
            area = float((counts * np.diff(edges)).sum())
            ax.stairs(counts / area if area > 0 else counts, edges, label=str(site), linewidth=1.4)
        ax.set_title(f"{side} harmonisation")
        ax.set_xlabel("intensity")
        ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def dashboard_figure(history: pd.DataFrame, metric: str | None) -> FlipFigure:
    """The dashboard's picture: the evaluation metric and the training loss over rounds, per site and aggregated."""
    fig, (left, right) = new_figure(2, width=4.8, height=3.4)
    learning_curves(history, metric or "dice", "evaluate", ax=left)
    learning_curves(history, "loss", "train", ax=right)
    return fig
