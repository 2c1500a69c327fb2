"""What a job looks like to a person: its state folded from events, and a static summary for saved notebooks.

``JobView`` is ``flip_lab.jobview``'s fold of the hub's events (``flip_common.protocol.Event``), the same fold the
``Job`` and the Jupyter server's panel use, with what the dashboard, the static summary and the study record show
of it: round progress, each site's state with the site's own detail text, the governance facts (plan hash, each
site's approval and policy label, the head of each site's audit log as reported with its last reply) and the metric
history. It needs nothing but events, so a replayed ``events.jsonl`` gives exactly what the live job gave.

``StaticSummary`` renders a view as HTML, markdown and plain text: what survives in a notebook executed headless
(papermill, nbclient), where widget state renders nowhere.
"""

from __future__ import annotations

import html
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from flip_common.textsafe import shown

from . import jobview
from .history import AGGREGATE, History

STATE_LABELS = {
    "pending": "pending",
    "waiting_approval": "waiting for approval",
    "preparing_data": "preparing data",
    "training": "training",
    "evaluating": "evaluating",
    "done": "done",
    "failed": "failed",
    "withheld": "withheld by policy",
    "offline": "offline",
}
STATE_COLOURS = {
    "done": "#2e7d32",
    "failed": "#c62828",
    "withheld": "#ef6c00",
    "waiting_approval": "#6a1b9a",
    "training": "#1565c0",
    "evaluating": "#00838f",
    "preparing_data": "#5d4037",
    "offline": "#616161",
}


class JobLike(Protocol):
    """What the dashboard and the study record need from a ``flip_lab.Job``."""

    id: int
    events: list[dict[str, Any]]

    def subscribe(self, callback: Any, *, replay: bool = True) -> None: ...


@dataclass
class JobView(jobview.JobView):
    """A job's state for the dashboard and the static summary: ``flip_lab.jobview``'s fold with a lock (the
    dashboard folds on the job's thread and renders on the kernel's) and the metric history as a table."""

    job_id: int | str = ""
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def apply(self, event: dict[str, Any]) -> None:
        with self.lock:
            jobview.fold(self, event)

    @property
    def history(self) -> History:
        return History(self.rows)

    @property
    def current_round(self) -> int:
        """The round in progress: the highest round any site or aggregate has reached."""
        with self.lock:
            return max(self.released, self.round)

    def frame(self) -> pd.DataFrame:
        return self.history.frame()

    def primary_metric(self, phase: str = "evaluate") -> str | None:
        """``primary_metric`` without building the history table: cheap enough to call on every event."""
        with self.lock:
            return _pick_primary(self.metric_names.get(phase, set()))

    def audit_heads(self) -> dict[str, str]:
        with self.lock:
            return super().audit_heads()

    def governance(self) -> dict[str, Any]:
        with self.lock:
            return super().governance()


def primary_metric(frame: pd.DataFrame, phase: str = "evaluate") -> str | None:
    """The metric a person looks at first: Dice when there is one, else the first non-loss metric, else loss."""
    return _pick_primary(set(frame.loc[frame["phase"] == phase, "metric"]))


def _pick_primary(found: set[str]) -> str | None:
    names = sorted(found - {"num_examples"})
    if "dice" in names:
        return "dice"
    others = [n for n in names if n != "loss"]
    return others[0] if others else (names[0] if names else None)


def _short(text: str, n: int = 12) -> str:
    return text[:n] + "…" if len(text) > n else text


GOVERNANCE_COLUMNS = ["site", "approval", "policy", "audit head"]


def site_rows(view: JobView) -> list[dict[str, str]]:
    """One row per site: what the state table and the static summary show, as text."""
    with view.lock:
        metric = view.primary_metric()
        rows = []
        for name, s in sorted(view.sites.items()):
            value = s.metrics.get(metric) if metric else None
            # Every text here comes from a site or the hub: shown with visible escapes, so a reply
            # cannot move the cursor or reorder what the researcher reads in a terminal.
            rows.append(
                {
                    "site": shown(name),
                    "state": shown(STATE_LABELS.get(s.state, s.state)),
                    "round": str(s.round),
                    (shown(metric) if metric else "metric"): "" if value is None else f"{value:.4f}",
                    "detail": shown(s.detail) if s.state != "preparing_data" else "",
                    "approval": shown(s.approval),
                    "policy": shown(s.policy),
                    "audit head": shown(s.audit_head),
                }
            )
    return rows


def html_table(
    rows: list[dict[str, str]], *, columns: list[str] | None = None, short: tuple[str, ...] = ("audit head",)
) -> str:
    """Rows as an HTML table (cell text escaped; long hashes shortened, in full in the cell's tooltip)."""
    if not rows:
        return "<p><em>no site has reported yet</em></p>"
    if columns is not None:
        rows = [{k: v for k, v in row.items() if k in columns} for row in rows]
    head = "".join(f"<th style='text-align:left'>{html.escape(k)}</th>" for k in rows[0])
    body = []
    for row in rows:
        cells = []
        for key, value in row.items():
            text = html.escape(_short(value, 16) if key in short else value)
            if key == "state":
                state = next((k for k, v in STATE_LABELS.items() if v == value), value)
                colour = STATE_COLOURS.get(state, "#424242")
                text = f"<span style='color:{colour};font-weight:600'>{text}</span>"
            title = f" title='{html.escape(value)}'" if key in short else ""
            cells.append(f"<td style='text-align:left'{title}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def round_words(view: JobView) -> str:
    """Where a job is, in the words the side panel uses for it too (``extensions/flip-lab/src/format.ts``): while
    it runs, the round in progress ("round 2 of 3"); once it has ended, the rounds completed ("3 of 3 rounds")."""
    with view.lock:
        of = f" of {view.rounds}" if view.rounds else ""
        if view.done:
            return f"{view.released}{of} round{'' if (view.rounds or view.released) == 1 else 's'}"
        current = view.current_round
        if view.status == "running":
            return f"round {current}{of}" if current else "sites preparing"
        return f"round {current}{of}" if current else ""


def headline(view: JobView) -> str:
    with view.lock:
        where = round_words(view)
        text = f"Job {view.job_id}: {view.status}" + (f", {where}" if where else "")
        if view.strategy:
            text += f", {view.strategy}"
        if view.message:
            text += f" ({shown(view.message)})"
        return text


def error_lines(view: JobView) -> list[str]:
    with view.lock:
        return [
            shown(
                f"round {e.get('round', '?')} {e.get('site', '')} {e.get('phase', '')}: "
                f"{e.get('kind', e.get('type'))}: "
                f"{e.get('message') or e.get('reason') or ''}"
            ).replace("  ", " ")
            for e in view.errors
        ]


def aggregate_line(view: JobView) -> str:
    """The released model's last aggregated evaluation, e.g. ``aggregate at round 5: dice 0.8123, loss 0.2012``."""
    metrics = final_metrics(view).get(AGGREGATE)
    if not metrics:
        return "no aggregated evaluation was released"
    rounds = view.frame()
    last = int(rounds.loc[(rounds["site"] == AGGREGATE) & (rounds["phase"] == "evaluate"), "round"].max())
    return f"aggregate at round {last}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))


def summary_html(view: JobView) -> str:
    errors = error_lines(view)
    parts = [
        f"<h4>{html.escape(headline(view))}</h4>",
        (
            f"<p>{html.escape(aggregate_line(view))}; plan hash <code>{html.escape(view.plan_hash or 'unknown')}"
            "</code></p>"
        ),
        html_table(site_rows(view)),
    ]
    if errors:
        parts.append("<ul>" + "".join(f"<li>{html.escape(e)}</li>" for e in errors) + "</ul>")
    return "<div class='flip-summary'>" + "".join(parts) + "</div>"


# No maintained library escapes text for markdown (markdown-it and mistune render it, they do not escape), and
# Jupyter's renderer passes inline HTML through: HTML is escaped first, then every markdown punctuation mark that
# could start markup is backslash-escaped, and line breaks, which could end a table row, become spaces.
_MD_MARKUP = re.compile(r"([\\`*_\[\]{}()#+\-!|~])")


def md_escape(text: str) -> str:
    """``text`` as literal markdown: what it says is shown, nothing in it becomes markup."""
    return _MD_MARKUP.sub(r"\\\1", html.escape(" ".join(str(text).splitlines()), quote=False))


def _md_code(text: str) -> str:
    """``text`` as a code span, whose content markdown shows literally once it cannot close the span."""
    return "`" + " ".join(str(text).splitlines()).replace("`", "'") + "`"


def summary_markdown(view: JobView, *, escape: bool = True) -> str:
    """The summary as markdown; ``escape=False`` gives the same text unescaped, for plain-text output."""
    md = md_escape if escape else str
    cell = md_escape if escape else (lambda text: text.replace("|", "\\|"))
    rows = site_rows(view)
    lines = [
        f"**{md(headline(view))}**",
        "",
        f"{md(aggregate_line(view))}; plan hash {_md_code(view.plan_hash or 'unknown')}",
        "",
    ]
    if rows:
        keys = list(rows[0])
        lines.append("| " + " | ".join(md(k) for k in keys) + " |")
        lines.append("|" + "---|" * len(keys))
        lines.extend("| " + " | ".join(cell(row[k]) for k in keys) + " |" for row in rows)
    lines += [f"- {md(e)}" for e in error_lines(view)]
    return "\n".join(lines) + "\n"


class StaticSummary:
    """The job's final state as a table that renders anywhere (HTML, markdown, plain text)."""

    def __init__(self, view: JobView) -> None:
        self.view = view

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {
            "text/html": summary_html(self.view),
            "text/markdown": summary_markdown(self.view),
            "text/plain": summary_markdown(self.view, escape=False),
        }

    def __repr__(self) -> str:
        return summary_markdown(self.view, escape=False)


def final_metrics(view: JobView, phase: str = "evaluate") -> dict[str, dict[str, float]]:
    """Per site (and ``aggregate``) the metrics of the last round that has any, for records and comparisons."""
    frame = view.frame()
    frame = frame[(frame["phase"] == phase) & (frame["metric"] != "num_examples")]
    out: dict[str, dict[str, float]] = {}
    for site, rows in frame.groupby("site"):
        last = rows[rows["round"] == rows["round"].max()]
        out[str(site)] = {str(m): float(v) for m, v in zip(last["metric"], last["value"], strict=True)}
    return dict(sorted(out.items(), key=lambda kv: (kv[0] == AGGREGATE, kv[0])))
