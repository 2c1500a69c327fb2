"""A job's folder: what a re-attached job reads back from it."""

from __future__ import annotations

import shutil
from pathlib import Path

from flip_lab import Job

RECORDED = Path(__file__).parent / "notebooks" / "recorded_job"  # a 3-site, 2-round job from the local federation


def test_events_written_twice_to_a_job_folder_count_once(tmp_path: Path) -> None:
    # The notebook's kernel and the Jupyter server's panel may both follow one job into the same folder.
    single, doubled = tmp_path / "single", tmp_path / "doubled"
    shutil.copytree(RECORDED, single)
    shutil.copytree(RECORDED, doubled)
    lines = (RECORDED / "events.jsonl").read_text().splitlines()
    (doubled / "events.jsonl").write_text("\n".join(lines[:5] + lines + lines[3:]) + "\n")

    once = Job(None, 1, single, follow=False)  # type: ignore[arg-type]
    twice = Job(None, 2, doubled, follow=False)  # type: ignore[arg-type]

    assert len(twice.events) == len(once.events) == len([line for line in lines if line.strip()])
    assert twice.history.equals(once.history)
    assert twice.status == once.status == "completed"
