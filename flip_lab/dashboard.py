"""The live dashboard: a job seen from the notebook while it runs, and its final state kept in the saved notebook.

>>> dash = show(job)          # doctest: +SKIP   (a Job left as a cell's last value does this for you)

The dashboard subscribes to the job (``job.subscribe``): events arrive on the job's background thread, are folded
into a ``flip_lab.display.JobView`` and pushed into ipywidgets traits. ipywidgets 8 sends comm messages from any
thread, so the widgets update in JupyterLab and the classic notebook while the researcher runs other cells. The
curves are a matplotlib figure rendered to PNG into an ``ipywidgets.Image``, at most once per ``min_interval``
seconds, on a timer thread of its own so the job's thread never waits for matplotlib.

Widget state renders nowhere in a notebook executed headless (papermill, nbclient). So ``display()`` also reserves
two display outputs (``IPython.display`` handles with a ``display_id``) right under the widget; when the job
finishes, ``finalize()`` fills them with a static PNG of the curves and an HTML/markdown summary table. nbclient
applies display updates to the cell that created them, so the saved notebook shows the final state even when the
job finished while a later cell (``job.wait()``) was running. Once they hold the final state the widget hides
itself, so a finished job shows its curves and its table once.

Nothing here raises into the researcher's cell: every failure is logged to the ``flip_lab`` logger and the
dashboard carries on with what it has.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from typing import Any

import ipywidgets as widgets

from . import display as _display
from .display import JobLike, JobView
from .plots import dashboard_figure

log = logging.getLogger("flip_lab")

_CURVE_EVENTS = ("reply", "aggregate")
_PARTS = ("headline", "progress", "states", "curves", "governance", "problems")  # the VBox's children, in order
# The tables are plain HTML in HTML widgets, outside JupyterLab's rendered-HTML styles: without padding their
# columns run together. Scoped to the dashboard by its class.
_TABLE_STYLE = (
    "<style>.flip-lab-dashboard table th, .flip-lab-dashboard table td "
    "{padding: 2px 14px 2px 0; vertical-align: top}</style>"
)


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    return get_ipython() is not None


def _execution_count() -> int | None:
    from IPython import get_ipython

    shell = get_ipython()
    return getattr(shell, "execution_count", None) if shell is not None else None


class Dashboard:
    """A live view of ``job``: round progress, per-site states, curves, governance facts, errors.

    ``widget`` is the ipywidgets ``VBox``; its children are, in order: headline (HTML), round progress
    (IntProgress), site states (HTML table), curves (Image, PNG), governance (HTML), errors (HTML). In the browser
    the box carries the CSS class ``flip-lab-dashboard`` and each child ``flip-lab-dashboard-<part>`` (``headline``,
    ``progress``, ``states``, ``curves``, ``governance``, ``problems``): stable hooks for styling and UI tests.
    """

    def __init__(self, job: JobLike, *, min_interval: float = 0.5, dpi: int = 80, pixel_ratio: int = 2) -> None:
        """``dpi``: screen pixels per inch of figure, so the curves show ``dpi`` × the figure's size in inches.
        ``pixel_ratio``: PNG pixels per screen pixel; 2 keeps lines and labels sharp on HiDPI screens."""
        self.job = job
        self.min_interval = min_interval
        self.dpi = dpi
        self.pixel_ratio = max(1, pixel_ratio)
        self.view = JobView(
            job_id=job.id,
            rounds=int(getattr(job, "rounds", 0) or 0),
            plan_hash=str(getattr(job, "plan_hash", "") or ""),
        )
        self.renders = 0
        self.finalized = False
        self.headline = widgets.HTML()
        self.progress = widgets.IntProgress(
            value=0,
            min=0,
            max=max(1, self.view.rounds),
            description="round",
            bar_style="info",
            style={"description_width": "initial"},
        )
        self.states = widgets.HTML()
        self.curves = widgets.Image(format="png", layout=widgets.Layout(max_width="100%"))
        self.governance = widgets.HTML()
        self.problems = widgets.HTML()
        self.widget = widgets.VBox(
            [self.headline, self.progress, self.states, self.curves, self.governance, self.problems]
        )
        self.widget.add_class("flip-lab-dashboard")
        for part, child in zip(_PARTS, self.widget.children, strict=True):
            child.add_class(f"flip-lab-dashboard-{part}")
        self._handles: tuple[Any, Any] | None = None
        self._curve_width: int | None = None  # screen pixels the curves are shown at, once drawn
        self._shown_in: int | None = None
        self._lock = threading.RLock()  # one writer of widget traits at a time
        self._draw_lock = threading.Lock()  # one matplotlib render at a time
        self._timer: threading.Timer | None = None
        self._render_pending = False  # a render is scheduled or running
        self._dirty = False  # the state changed since the running render took its snapshot
        self._last_render = 0.0
        self._refresh_text()
        self._schedule_render()
        job.subscribe(self._on_event)

    def __repr__(self) -> str:
        return f"<Dashboard {_display.headline(self.view)}>"

    # -- events (job's background thread) ------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        try:
            self.view.apply(event)
            self._refresh_text()
            if event.get("type") in _CURVE_EVENTS:
                self._schedule_render()
            elif event.get("type") == "job_finished":
                self._on_finished()
        except Exception:  # a malformed event or a rendering bug must never reach the researcher's cell
            log.exception("the dashboard could not show a %s event", event.get("type"))

    def _refresh_text(self) -> None:
        view = self.view
        rows = _display.site_rows(view)
        governance = _display.GOVERNANCE_COLUMNS
        states = [k for k in (rows[0] if rows else {}) if k == "site" or k not in governance]
        with self._lock:
            self.headline.value = f"<b>{html.escape(_display.headline(view))}</b>"
            self.progress.max = max(1, view.rounds, view.released)
            self.progress.value = view.released
            self.progress.description = f"{view.released}/{view.rounds or '?'} done"  # rounds completed
            self.states.value = _TABLE_STYLE + _display.html_table(rows, columns=states)
            self.governance.value = (
                f"<details open><summary>governance: plan <code title='{html.escape(view.plan_hash)}'>"
                f"{html.escape(view.plan_hash[:16] or 'unknown')}</code></summary>"
                + (_display.html_table(rows, columns=governance) if rows else "")
                + "</details>"
            )
            lines = _display.error_lines(view)
            self.problems.value = (
                ("<ul style='color:#c62828'>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
                if lines
                else ""
            )
            if view.done:
                self.progress.bar_style = "success" if view.status == "completed" else "danger"

    # -- curves ---------------------------------------------------------------------------------------
    def _schedule_render(self) -> None:
        """Render soon, at most once per ``min_interval`` after the previous render ended; events that arrive
        while a render is due or running are drawn by the next one."""
        with self._lock:
            if self._render_pending:
                self._dirty = True
                return
            self._render_pending = True
            self._start_timer(max(0.0, self._last_render + self.min_interval - time.monotonic()))

    def _start_timer(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._render_due)
        self._timer.daemon = True
        self._timer.start()

    def _render_due(self) -> None:
        with self._lock:
            if self._timer is None:  # cancelled by the job's end, which draws for itself
                return
            self._dirty = False
        self.render()
        with self._lock:
            self._last_render = time.monotonic()
            if self._dirty and self._timer is not None:
                self._dirty = False
                self._start_timer(self.min_interval)
            else:
                self._timer = None
                self._render_pending = False

    def render(self) -> bytes | None:
        """Draw the curves now and put the PNG into the widget; returns the PNG (None if drawing failed)."""
        try:
            with self._draw_lock:
                frame = self.view.frame()
                figure = dashboard_figure(frame, _display.primary_metric(frame))
                png = figure.to_png(dpi=self.dpi * self.pixel_ratio)
                width = round(figure.get_figwidth() * self.dpi)
            with self._lock:
                self.curves.value = png
                self.curves.layout.width = f"{width}px"  # the PNG has pixel_ratio × as many pixels
                self._curve_width = width
                self.renders += 1
            return png
        except Exception:
            log.exception("the dashboard could not draw the curves")
            return None

    def _on_finished(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None
            self._render_pending = False
        if self._handles is not None:
            self.finalize()  # draws the final curves into the widget and the static outputs
        else:
            self.render()

    # -- notebook display -----------------------------------------------------------------------------
    def display(self) -> Dashboard:
        """Show the widget here, with two reserved outputs below it for the final static image and table.

        Outside IPython (a plain script) there is nowhere to show it: this does nothing; ``finalize()`` prints the
        summary table, and ``flip_lab.cli.progress_bar(job)`` gives a running account in a terminal.
        """
        from IPython.display import display

        if not _in_ipython():
            return self
        try:
            # The widget's own view, with a text fallback that reads well where widgets do not render.
            bundle = dict(self.widget._repr_mimebundle_())
            bundle["text/plain"] = f"FLIP Lab dashboard for job {self.view.job_id} (a live Jupyter widget)"
            display(bundle, raw=True)
            handles = (
                display({"text/plain": ""}, raw=True, display_id=True),
                display({"text/plain": ""}, raw=True, display_id=True),
            )
            with self._lock:
                self._handles = handles
                self._shown_in = _execution_count()
                done = self.view.done
            if done:  # a finished (or replayed) job: show its final state at once
                self.finalize()
        except Exception:
            log.exception("the dashboard could not be displayed")
        return self

    def _ipython_display_(self) -> None:
        if self._handles is None or self._shown_in != _execution_count():
            self.display()

    def finalize(self) -> Dashboard:
        """Show the final state as a static PNG and a summary table: they stay in the saved notebook.

        Fills the outputs reserved by ``display()`` (wherever that cell is), or displays here when the dashboard
        was never shown. Runs by itself when the job finishes; calling it again refreshes the same outputs.
        Outside IPython it prints the summary table instead.
        """
        try:
            png = self.render()
            summary = _display.StaticSummary(self.view)
            if not _in_ipython():
                print(_display.summary_markdown(self.view, escape=False))
            else:
                from IPython.display import Image, display

                figure = Image(data=png, format="png", width=self._curve_width) if png else None
                if self._handles is None:
                    display(*(o for o in (figure, summary) if o is not None))
                else:
                    if figure is not None:
                        self._handles[0].update(figure)
                    self._handles[1].update(summary)
                    if self.view.done:
                        # The static picture and table under the widget now show the final state, and they are
                        # what the saved notebook keeps: the widget would show the same plots and tables again.
                        with self._lock:
                            self.widget.layout.display = "none"
            self.finalized = True
        except Exception:
            log.exception("the dashboard could not write its final summary")
        return self


def show(job: JobLike, **options: Any) -> Dashboard | None:
    """Create a ``Dashboard`` for ``job`` and display it in the current cell; returns the dashboard.

    Never raises: if the dashboard cannot be built, the failure is logged and ``None`` returned, so a caller such
    as ``Federation.submit(..., display=True)`` still hands the researcher the job.
    """
    try:
        return Dashboard(job, **options).display()
    except Exception:
        log.exception("the dashboard could not be shown; the job runs on (job.history, job.status)")
        return None
