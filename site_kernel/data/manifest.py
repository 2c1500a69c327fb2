"""A registered dataset's manifest: ``SITE/data/<name>/manifest.json``, the site's private record of its cases.

The manifest lists every usable case (internal id, train/test split, file paths, geometry, vendor, label values,
segment names or class) and every quarantined input with its reason. It never leaves the site: the public
catalogue is derived from it with counts suppressed and identifiers dropped (:mod:`site_kernel.data.catalogue`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import nibabel as nib
import numpy as np

from .dicom import read_series
from .errors import DatasetNotFound, InputRejected, RegistrationError
from .nifti import read_nifti
from .seg import read_label_map
from .volume import Volume

FORMAT_VERSION = 1
#: Most distinct values a label map may hold. Whole-body atlases stop near 120 classes (TotalSegmentator: 117);
#: a probability or intensity map saved as integers (0-255) shows far more, and is not a label map.
MAX_LABEL_CLASSES = 128
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CaseEntry(TypedDict):
    id: str
    split: Literal["train", "test"]
    format: Literal["dicom", "nifti"]
    files: list[str]
    label: str | None
    modality: str
    vendor: str
    shape: list[int]
    spacing: list[float]
    axcodes: str
    label_values: list[int]
    group: str
    fingerprint: str
    #: How ``label`` is stored; absent in manifests written before DICOM SEG was read (then "nifti").
    label_format: NotRequired[Literal["nifti", "dicom-seg"]]
    #: Segment number (as a string) -> segment label, for label maps read from a DICOM SEG.
    label_names: NotRequired[dict[str, str]]
    #: The case's class in a classification dataset (a name or an integer, as the CSV gives it).
    class_name: NotRequired[str | None]


class QuarantineEntry(TypedDict):
    paths: list[str]
    reason: str
    detail: str


class Manifest(TypedDict):
    format_version: int
    name: str
    source: str
    labels: str | None
    seed: int
    test_fraction: float
    labelled: bool
    cases: list[CaseEntry]
    quarantine: list[QuarantineEntry]
    skipped: dict[str, int]
    registered_at: str
    #: "classification" when registered with a CSV of classes; absent (segmentation) otherwise.
    task: NotRequired[Literal["segmentation", "classification"]]


def check_name(name: str) -> str:
    """Dataset names become folder names and appear in the catalogue: letters, digits, ``_ . -`` only."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistrationError(
            f"dataset name {name!r} is not allowed; use 1-64 letters, digits, '_', '.' or '-' (e.g. 'liver_ct')"
        )
    return name


def manifest_path(site_dir: Path, name: str) -> Path:
    return Path(site_dir) / "data" / check_name(name) / "manifest.json"


def list_datasets(site_dir: Path) -> list[str]:
    """Names of the datasets registered at a site, sorted."""
    data = Path(site_dir) / "data"
    if not data.is_dir():
        return []
    return sorted(p.parent.name for p in data.glob("*/manifest.json"))


def read_manifest(site_dir: Path, name: str) -> Manifest:
    path = manifest_path(site_dir, name)
    if not path.is_file():
        raise DatasetNotFound(name)
    manifest: Manifest = json.loads(path.read_text())
    return manifest


def write_manifest(site_dir: Path, manifest: Manifest) -> Path:
    """Write atomically, so a reader never sees half a manifest."""
    path = manifest_path(site_dir, manifest["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def manifest_hash(manifest: Manifest) -> str:
    """Hash of what determines the harmonised data: cases, their files' fingerprints and the split.

    The registration time is left out, so re-registering unchanged files keeps harmonised caches valid.
    """
    content = {k: v for k, v in manifest.items() if k != "registered_at"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def fingerprint(paths: list[Path]) -> str:
    """Cheap identity of files on disk (path, size, modification time), to notice edits after registration."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def load_case(case: CaseEntry) -> tuple[Volume, np.ndarray | None]:
    """Read one registered case: its image volume and its label map in the image's voxel order (or None)."""
    paths = [Path(p) for p in case["files"]]
    volume = read_series(paths) if case["format"] == "dicom" else read_nifti(paths[0])
    if case["modality"] != "unknown":
        volume.modality = case["modality"]
    if not case["label"]:
        return volume, None
    if case.get("label_format") == "dicom-seg":
        return volume, read_label_map(Path(case["label"]), volume)[0]
    return volume, align_label(read_nifti(Path(case["label"])), volume)


def align_label(label: Volume, image: Volume) -> np.ndarray:
    """Return ``label``'s values in ``image``'s voxel order, or raise :class:`InputRejected`.

    A label map may store the same world grid in another axis order (ITK and DICOM converters differ), so it is
    reoriented by its affine first; then grid and affine must agree to a hundredth of a voxel (else
    ``label_mismatch``). Its values must be what a label map holds: integers 0-255, at most
    :data:`MAX_LABEL_CLASSES` distinct ones (else ``not_a_label_map``).
    """
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(label.affine), nib.orientations.io_orientation(image.affine)
    )
    values = nib.orientations.apply_orientation(label.array, transform)
    affine = label.affine @ nib.orientations.inv_ornt_aff(transform, label.array.shape)
    if values.shape != image.array.shape:
        raise InputRejected("label_mismatch", "label grid differs from image grid")
    tolerance = 0.01 * min(image.spacing)
    if not np.allclose(affine, image.affine, atol=tolerance):
        raise InputRejected("label_mismatch", "label affine differs from image affine")
    rounded = np.rint(values)
    if not np.allclose(values, rounded, atol=1e-3):
        raise InputRejected("not_a_label_map", "values are not integers (a probability or intensity map?)")
    if rounded.min() < 0 or rounded.max() > 255:
        raise InputRejected("not_a_label_map", "values outside the class indices 0-255")
    classes = np.unique(rounded).size
    if classes > MAX_LABEL_CLASSES:
        raise InputRejected(
            "not_a_label_map",
            f"{classes} distinct values, more than the {MAX_LABEL_CLASSES} classes "
            "a label map holds (a probability map saved as 0-255?)",
        )
    return rounded.astype(np.int64)


def describe(entry: dict[str, Any]) -> str:
    """One line for the site's own log (paths stay at the site)."""
    return " ".join(f"{k}={v}" for k, v in entry.items())
