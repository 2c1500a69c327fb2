"""The data layer's site log, ``SITE/logs/data.log``: what registration and harmonisation did, for the data owner.

It records internal paths and quarantine reasons, so it stays at the site like every file under ``SITE/logs``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path


def site_log(site_dir: Path, message: str) -> None:
    """Append one timestamped line (newlines in ``message`` are flattened so each event stays one line)."""
    path = Path(site_dir) / "logs" / "data.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with path.open("a", encoding="utf-8") as log:
        log.write(f"{stamp} {' '.join(message.splitlines())}\n")
