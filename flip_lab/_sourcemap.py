"""Where each line of an assembled plan came from: the notebook cell (or file) and line the researcher wrote.

A plan travels as one module of source text, so a site can only say "plan.py line 12". The lab assembled that text
from the researcher's cells and keeps, per plan line, the cell's file and line, so it can answer in the researcher's
terms (``cell In[5], line 7``) and show the line itself, and run the plan locally with tracebacks that point at the
cells (:mod:`flip_lab._dryrun`).

>>> spans = SourceMap([Span(plan_line=10, length=5, filename="/tmp/ipykernel_1/123.py", line=3)])
>>> spans.origin(12)
('/tmp/ipykernel_1/123.py', 5)
"""

from __future__ import annotations

import linecache
from dataclasses import dataclass, field
from typing import Any

from flip_common.textsafe import shown

_MAX_TEXT = 160  # characters of a line shown in a message


@dataclass(frozen=True)
class Span:
    """Plan lines ``plan_line`` .. ``plan_line + length - 1`` are lines ``line`` .. of ``filename``."""

    plan_line: int
    length: int
    filename: str
    line: int


@dataclass(frozen=True)
class SourceMap:
    spans: list[Span] = field(default_factory=list)

    @classmethod
    def identity(cls, filename: str, source: str) -> SourceMap:
        """A plan that is one file as written (``Plan.from_file``)."""
        return cls([Span(1, source.count("\n") + 1, filename, 1)])

    def origin(self, plan_line: int) -> tuple[str, int] | None:
        for span in self.spans:
            if span.plan_line <= plan_line < span.plan_line + span.length:
                return span.filename, span.line + plan_line - span.plan_line
        return None

    def where(self, plan_line: int) -> dict[str, Any] | None:
        """``{"cell": "cell In[5]", "line": 7, "text": "..."}`` for a plan line, the text made safe to show."""
        found = self.origin(plan_line)
        return None if found is None else located(*found)

    def filenames(self) -> set[str]:
        return {span.filename for span in self.spans}

    def lines(self) -> dict[str, dict[str, Any]]:
        """Every mapped plan line with its cell, line and text: kept beside a job, as the cells are at submit."""
        out: dict[str, dict[str, Any]] = {}
        for span in self.spans:
            for plan_line in range(span.plan_line, span.plan_line + span.length):
                where = self.where(plan_line)
                if where is not None:
                    out[str(plan_line)] = where
        return out


def located(filename: str, line: int) -> dict[str, Any]:
    """``{"cell": "cell In[5]", "line": 7, "text": "..."}`` for a line of a cell or file, its text made safe to show."""
    text = linecache.getline(filename, line).strip()
    if len(text) > _MAX_TEXT:
        text = text[: _MAX_TEXT - 3] + "..."
    return {"cell": cell_label(filename), "line": line, "text": shown(text)}


def cell_label(filename: str) -> str:
    """How IPython names the cell a code object came from (``cell In[5]``), else the file's name."""
    try:
        from IPython import get_ipython
    except ImportError:  # plain Python: no cells
        return filename
    shell = get_ipython()
    number = getattr(getattr(shell, "compile", None), "_filename_map", {}).get(filename) if shell else None
    if number is not None:
        return f"cell In[{number}]"
    if "ipykernel" in filename or filename.startswith("<ipython-input"):
        return "a notebook cell"
    return filename


def describe(where: dict[str, Any]) -> str:
    """``cell In[5], line 7 (`loss = model(x)`)``"""
    text = f" (`{shown(where['text'])}`)" if where.get("text") else ""
    return f"{shown(where['cell'])}, line {shown(where['line'])}{text}"
