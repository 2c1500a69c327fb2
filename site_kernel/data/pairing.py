"""Which label belongs to which image: NIfTI label maps, DICOM SEG objects, or a CSV of per-case classes.

- A NIfTI image ``case01.nii.gz`` takes ``case01_seg.nii.gz`` (or ``_label``, ``_labels``, ``_mask``) from its own
  folder, or ``case01.nii.gz`` / ``case01_seg.nii.gz`` from the labels folder.
- A DICOM series takes the NIfTI in the labels folder named after its folder or its SeriesInstanceUID (with or
  without ``_seg``); failing that, the DICOM SEG (in the source or the labels folder) that refers to it: by
  SeriesInstanceUID, else by the SOPInstanceUIDs of its slices, else by a frame of reference no other series shares.
- With a CSV (``labels=cases.csv``) the dataset is a classification dataset: each image takes the class of the
  row naming its NIfTI stem, series folder or SeriesInstanceUID, and label maps are not paired.

A SEG that refers to no series of the source is quarantined as ``unmatched_label``; a second SEG for a series
that already has a label as ``duplicate_label``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydicom.dataset import Dataset

from . import dicom
from .classes import is_class_table, read_class_table
from .errors import InputRejected
from .nifti import is_nifti, nifti_stem
from .seg import SegReference, is_segmentation, read_reference

LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")
LabelFormat = Literal["nifti", "dicom-seg"]
Reject = Callable[[list[Path], InputRejected], None]


@dataclass
class Candidate:
    """An image input before checking: one NIfTI file or the files of one DICOM series."""

    format: str
    paths: list[Path]
    keys: list[str]  # names a label file or a CSV row may give it
    group: str  # patient key for the split
    headers: list[Dataset] = field(default_factory=list)
    seg: Path | None = None  # the DICOM SEG paired with this series, if any


@dataclass
class LabelSources:
    """The labels on offer: NIfTI label maps by key, SEG files, or a class table (then nothing else)."""

    nifti: dict[str, Path] = field(default_factory=dict)
    segs: list[SegReference] = field(default_factory=list)
    classes: dict[str, str] | None = None


def open_labels(labels: Path | None, reject: Reject) -> LabelSources:
    """Index a labels folder (NIfTI maps and SEG files) or read a labels CSV; ``None`` offers nothing."""
    if labels is None:
        return LabelSources()
    if is_class_table(labels):
        return LabelSources(classes=read_class_table(labels))
    sources = LabelSources()
    for path in sorted(p for p in labels.rglob("*") if p.is_file()):
        if is_nifti(path):
            sources.nifti[_base_key(nifti_stem(path))] = path
            continue
        try:
            ds = dicom.read_dataset(path)
        except InputRejected as error:
            if error.reason != "unreadable":  # notes and other non-DICOM files may sit beside label maps
                reject([path], error)
            continue
        if is_segmentation(ds):
            sources.segs.append(read_reference(path, ds))
    return sources


def is_label_name(path: Path) -> bool:
    return nifti_stem(path).lower().endswith(LABEL_SUFFIXES)


def _base_key(stem: str) -> str:
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def pair_segmentations(candidates: list[Candidate], segs: list[SegReference], reject: Reject) -> None:
    """Give each DICOM series the SEG that refers to it (``Candidate.seg``); quarantine SEGs that cannot be paired."""
    series = [c for c in candidates if c.format == "dicom"]
    instances = [{str(h.get("SOPInstanceUID", "")) for h in c.headers} for c in series]
    frames = [str(c.headers[0].get("FrameOfReferenceUID", "")) for c in series]
    for ref in sorted(segs, key=lambda r: str(r.path)):
        matches = [c for c in series if c.keys[0] in ref.series_uids]
        if not matches:
            matches = [c for c, uids in zip(series, instances, strict=True) if uids & ref.instance_uids]
        if not matches and ref.frame_of_reference:
            matches = [c for c, frame in zip(series, frames, strict=True) if frame == ref.frame_of_reference]
        if len(matches) != 1:
            detail = "no series of the source" if not matches else "several series share its frame of reference"
            reject([ref.path], InputRejected("unmatched_label", f"segmentation refers to {detail}"))
        elif matches[0].seg is not None:
            reject([ref.path], InputRejected("duplicate_label", "a second segmentation of one series"))
        else:
            matches[0].seg = ref.path


def find_label(candidate: Candidate, nifti: dict[str, Path], reject: Reject) -> tuple[Path, LabelFormat] | None:
    """The label of ``candidate``: a NIfTI map beside it or named after it, else its paired SEG, else None."""
    found = _find_nifti(candidate, nifti)
    if found is not None and candidate.seg is not None:
        # A label map named after the series is the data owner's explicit choice; the SEG is set aside, visibly.
        reject([candidate.seg], InputRejected("duplicate_label", "series also has a NIfTI label map"))
    if found is not None:
        return found, "nifti"
    return (candidate.seg, "dicom-seg") if candidate.seg is not None else None


def find_class(candidate: Candidate, classes: dict[str, str]) -> str | None:
    """The class the CSV gives ``candidate`` (by NIfTI stem, series folder or SeriesInstanceUID), or None."""
    for key in candidate.keys:
        if key in classes:
            return classes[key]
    return None


def _find_nifti(candidate: Candidate, nifti: dict[str, Path]) -> Path | None:
    if candidate.format == "nifti":
        image = candidate.paths[0]
        for suffix in LABEL_SUFFIXES:
            for ext in (".nii.gz", ".nii"):
                beside = image.with_name(nifti_stem(image) + suffix + ext)
                if beside.is_file():
                    return beside
    for key in candidate.keys:
        if key in nifti:
            return nifti[key]
    return None
