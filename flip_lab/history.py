"""A study's metric history: one row per (round, site, phase, metric), filled while the study runs."""

from __future__ import annotations

import threading
from typing import Any

import pandas as pd

from .jobview import AGGREGATE

__all__ = ["AGGREGATE", "COLUMNS", "History"]
COLUMNS = ["round", "site", "phase", "metric", "value"]


class History:
    """Thread-safe rows; ``frame()`` gives a pandas DataFrame with columns round, site, phase, metric, value.

    Aggregated values use the site name ``"aggregate"``; the number of examples behind each site's reply is kept
    as the metric ``num_examples``.
    """

    def __init__(self, rows: list[tuple[int, str, str, str, float]] | None = None) -> None:
        # ``rows`` may be a list another owner fills (a ``flip_lab.jobview.JobView``'s rows): read, not copied.
        self._rows: list[tuple[int, str, str, str, float]] = [] if rows is None else rows
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._rows)

    def add_reply(self, event: dict[str, Any]) -> None:
        rows = [
            (int(event["round"]), str(event["site"]), str(event["phase"]), str(k), float(v))
            for k, v in event.get("metrics", {}).items()
            if v is not None
        ]
        rows.append(
            (
                int(event["round"]),
                str(event["site"]),
                str(event["phase"]),
                "num_examples",
                float(event.get("num_examples", 0)),
            )
        )
        with self._lock:
            self._rows.extend(rows)

    def add_aggregate(self, event: dict[str, Any]) -> None:
        rows = [
            (int(event["round"]), AGGREGATE, str(event["phase"]), str(k), float(v))
            for k, v in event.get("metrics", {}).items()
            if v is not None
        ]
        with self._lock:
            self._rows.extend(rows)

    def frame(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._rows)
        return pd.DataFrame(rows, columns=COLUMNS)

    def metric(self, name: str, *, phase: str = "evaluate", site: str = AGGREGATE) -> pd.Series:
        """One metric over rounds, e.g. ``history.metric("dice")`` for the aggregated evaluation Dice."""
        df = self.frame()
        sel = df[(df.metric == name) & (df.phase == phase) & (df.site == site)]
        return sel.set_index("round")["value"].sort_index()
