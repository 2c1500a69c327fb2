"""Harmonised datasets cached under ``SITE/cache/<key>/`` so later rounds and jobs skip the work.

The key covers everything that determines the arrays: the normalised contract, the dataset manifest's hash
(cases, file fingerprints, split), the site steps, the harmonisation mode and :data:`PIPELINE_VERSION`. Entries
are written to a temporary folder and renamed into place, so a crash never leaves half an entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the harmonisation code changes what it produces, so old entries are not reused.
PIPELINE_VERSION = 1
ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def cache_key(contract: dict[str, Any], manifest_hash: str, steps: list[dict[str, Any]], mode: str) -> str:
    payload = {
        "contract": contract,
        "manifest": manifest_hash,
        "steps": steps,
        "mode": mode,
        "version": PIPELINE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def entry_dir(site_dir: Path, key: str) -> Path:
    return Path(site_dir) / "cache" / key


def load(site_dir: Path, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The cached arrays and metadata for ``key``, or None when absent or unreadable (then it is rebuilt)."""
    folder = entry_dir(site_dir, key)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        with np.load(folder / "data.npz") as data:
            arrays = {name: data[name] for name in ARRAYS}
    except (OSError, ValueError, KeyError):
        return None
    return arrays, meta


def store(site_dir: Path, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
    folder = entry_dir(site_dir, key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=folder.parent))
    try:
        np.savez(staging / "data.npz", **arrays)
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if folder.exists():  # a concurrent job finished first; keep its identical entry
            shutil.rmtree(staging)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder
