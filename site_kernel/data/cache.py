"""Harmonised datasets cached under ``SITE/cache/<key>/`` so later rounds and jobs skip the work.

A ``dims=2`` entry is one ``data.npz`` of slices (small: a few MB). A ``dims=3`` entry holds each case once as
two ``.npy`` files (``train/0000_image.npy``, ``train/0000_label.npy``) and an ``index.json`` with each case's
shape, spacing and affine (:class:`VolumeWriter`). Plain ``.npy`` because numpy alone reads it, memory-mapped
(``np.load(..., mmap_mode="r")``): the worker reads one case at a time and the operating system's page cache
shares what it read between processes, with no new dependency (zarr would add chunking and compression that
volumes of a few hundred MB do not need, and a package to trust inside the sandbox).

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

from flip_common.sitedata import INDEX

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


def load_volumes(site_dir: Path, key: str) -> dict[str, Any] | None:
    """The metadata of a cached ``dims=3`` entry, or None when absent or incomplete (then it is rebuilt)."""
    folder = entry_dir(site_dir, key)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        index = json.loads((folder / INDEX).read_text())
        if not all((folder / c["image"]).is_file() for c in index["cases"]):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dict(meta)


class VolumeWriter:
    """Writes a ``dims=3`` entry one case at a time into a staging folder, renamed into place by :meth:`commit`.

    Memory holds one case at a time, however many cases the dataset has.
    """

    def __init__(self, site_dir: Path, key: str) -> None:
        self.folder = entry_dir(site_dir, key)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=self.folder.parent))
        self.cases: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {}

    def add(
        self, split: str, image: np.ndarray, label: np.ndarray | None, affine: np.ndarray, class_index: int | None
    ) -> None:
        number = self.counts.get(split, 0)
        self.counts[split] = number + 1
        (self.staging / split).mkdir(exist_ok=True)
        stem = f"{split}/{number:04d}"
        entry: dict[str, Any] = {
            "split": split,
            "image": f"{stem}_image.npy",
            "shape": list(image.shape),
            "spacing": [round(float(s), 6) for s in np.linalg.norm(affine[:3, :3], axis=0)],
            "affine": [[round(float(v), 6) for v in row] for row in affine],
        }
        np.save(self.staging / entry["image"], np.ascontiguousarray(image, np.float32))
        if class_index is not None:
            entry["class"] = int(class_index)
        else:
            entry["label"] = f"{stem}_label.npy"
            np.save(self.staging / entry["label"], np.ascontiguousarray(label, np.uint8))
        self.cases.append(entry)

    def commit(self, meta: dict[str, Any]) -> Path:
        try:
            (self.staging / INDEX).write_text(json.dumps({"cases": self.cases}, indent=1))
            (self.staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            # The sandboxed worker (another user) reads this folder and nothing else of the site: open it to
            # reading, as harmonised arrays under a hash for a name hold nothing the plan may not see.
            for path in [self.staging, *self.staging.rglob("*")]:
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
            if self.folder.exists():  # a concurrent job finished first; keep its identical entry
                shutil.rmtree(self.staging)
            else:
                os.replace(self.staging, self.folder)
        except BaseException:
            self.abort()
            raise
        return self.folder

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
