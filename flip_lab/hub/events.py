"""The hub's side of the event stream: one ``FLIP-EVENT {json}`` line per event on the ServerApp's stdout.

Flower uploads a ServerApp's output to the SuperLink every 0.2 s and serves it through the Control API's
``StreamLogs``, so a researcher anywhere reads these lines with the same credentials that started the run; nothing
else has to be exposed. Final weights use the same channel in base64 chunks (``FLIP-WEIGHTS``).
"""

from __future__ import annotations

import base64
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flip_common.protocol import EVENT_PREFIX, WEIGHTS_PREFIX

_CHUNK = 48_000  # characters per log line; keeps each line far below any log buffer limit


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class EventSink:
    """Writes events to stdout (for the Control API) and, when given a folder, to ``events.jsonl`` there."""

    def __init__(self, record_dir: Path | None = None) -> None:
        self.record_dir = record_dir
        if record_dir is not None:
            record_dir.mkdir(parents=True, exist_ok=True)
        self._updates: set[tuple[str, int]] = set()  # (site, round) of every training update received ...
        self._rejected: set[tuple[str, int]] = set()  # ... and of those the hub rejected
        self._first_error: dict[str, str] = {}  # site -> the first thing that went wrong there

    def emit(self, event_type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": event_type, **{k: _finite(v) for k, v in fields.items()}, "t": time.time()}
        self._note(event)
        line = json.dumps(event, separators=(",", ":"), default=float)
        print(EVENT_PREFIX + line, flush=True)
        if self.record_dir is not None:
            with open(self.record_dir / "events.jsonl", "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        return event

    def _note(self, event: dict[str, Any]) -> None:
        kind, site, round_ = event["type"], str(event.get("site", "")), int(event.get("round") or 0)
        if kind == "reply" and event.get("phase") == "train":
            self._updates.add((site, round_))
        elif kind == "update_rejected":
            self._rejected.add((site, round_))
            self._first_error.setdefault(site, f"the hub rejected its update ({event.get('reason', 'no reason')})")
        elif kind == "site_error":
            self._first_error.setdefault(site, str(event.get("message") or event.get("kind") or "an error"))

    def absent_sites(self) -> str:
        """The sites that failed and contributed to no round, with the first thing that went wrong at each, in
        words ("" where every site that failed still contributed): a study completed by the others says so."""
        contributed = {site for site, _ in self._updates - self._rejected}
        absent = {site: why for site, why in self._first_error.items() if site not in contributed}
        if not absent:
            return ""
        # A site's own message ends with its name; it is said once here.
        return "; ".join(
            f"site {site} contributed to no round: {why.removesuffix(f' at site {site}')}"
            for site, why in sorted(absent.items())
        )

    def checkpoint(self, arrays: dict[str, np.ndarray], round_: int) -> None:
        """Keep the model released at ``round_`` in the run's folder, replacing the previous one atomically, so a
        job interrupted by a hub crash can resume from it (``load_checkpoint``)."""
        if self.record_dir is None:
            return
        from safetensors.numpy import save

        # bytes written by Python, not safetensors' save_file: that one resolves the path to an absolute one,
        # which a study process, working in its hub folder by relative paths (flip_lab.hub.study), cannot pass
        tmp = self.record_dir / "checkpoint.safetensors.tmp"
        tmp.write_bytes(save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={"round": str(round_)}))
        tmp.replace(self.record_dir / "checkpoint.safetensors")

    def emit_weights(self, arrays: dict[str, np.ndarray], round_: int) -> None:
        """Stream the released global model as base64 safetensors in numbered chunks."""
        from safetensors.numpy import save

        blob = base64.b64encode(save({k: np.ascontiguousarray(v) for k, v in arrays.items()})).decode()
        chunks = [blob[i : i + _CHUNK] for i in range(0, len(blob), _CHUNK)] or [""]
        for i, chunk in enumerate(chunks):
            print(f"{WEIGHTS_PREFIX}{round_} {i} {len(chunks)} {chunk}", flush=True)
        if self.record_dir is not None:
            (self.record_dir / "final_weights.b64").write_text(blob)
        sys.stdout.flush()


def load_checkpoint(record_dir: Path) -> tuple[dict[str, np.ndarray], int]:
    """The last released model of a run and its round; ``FileNotFoundError`` if no round was released."""
    from safetensors.numpy import load

    # read as bytes for the reason given in ``EventSink.checkpoint``; safetensors reads metadata only from a
    # path, so the round comes from the header as the format defines it: 8 bytes of length, then JSON
    blob = (record_dir / "checkpoint.safetensors").read_bytes()
    header = json.loads(blob[8 : 8 + int.from_bytes(blob[:8], "little")])
    return dict(load(blob)), int((header.get("__metadata__") or {}).get("round", 0))
