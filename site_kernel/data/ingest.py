"""Registering a folder of DICOM series or NIfTI images (with label maps) as a dataset of this site.

>>> summary = register_dataset(site_dir, "liver_ct", Path("/pacs/export"), labels=Path("/pacs/masks"))
>>> summary.num_cases, summary.skipped
(118, {'unreadable': 3})

Registration reads and checks every case once, then writes ``SITE/data/<name>/manifest.json``. Raw files stay
where they are; the manifest records their paths. Every input that cannot be used is quarantined with its reason
in the manifest and in the site log ``SITE/logs/data.log``, and the rest stays usable.

Pairing images with labels: a NIfTI image ``case01.nii.gz`` takes ``case01_seg.nii.gz`` (or ``_label``,
``_labels``, ``_mask``) from the same folder, or ``case01.nii.gz`` / ``case01_seg.nii.gz`` from ``labels``. A DICOM
series takes the NIfTI in ``labels`` named after the series' folder or its SeriesInstanceUID (with or without
``_seg``). If any case has a label map, cases without one are quarantined (``missing_label``).

Train/test split: patients (DICOM PatientID, else the case itself) are shuffled with ``seed`` and assigned to the
test split until it holds ``test_fraction`` of the cases, so one patient's series never sit in both.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from . import dicom
from .errors import InputRejected, RegistrationError
from .manifest import (
    FORMAT_VERSION,
    CaseEntry,
    Manifest,
    QuarantineEntry,
    align_label,
    check_name,
    fingerprint,
    write_manifest,
)
from .nifti import is_nifti, nifti_stem, read_nifti
from .sitelog import site_log
from .volume import Volume, axcodes

LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask")
_Reject = Callable[[list[Path], InputRejected], None]


@dataclass(frozen=True)
class DatasetSummary:
    """What registration found. ``skipped`` counts quarantined files by reason."""

    name: str
    num_cases: int
    num_train: int
    num_test: int
    modalities: list[str]
    labelled: bool
    skipped: dict[str, int] = field(default_factory=dict)
    manifest_path: Path | None = None


@dataclass
class _Candidate:
    """An image input before checking: one NIfTI file or the files of one DICOM series."""

    format: str
    paths: list[Path]
    keys: list[str]  # names a label file may carry
    group: str  # patient key for the split
    headers: list[Dataset] = field(default_factory=list)


def register_dataset(
    site_dir: Path,
    name: str,
    source: Path,
    *,
    labels: Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.25,
    modality: str | None = None,
) -> DatasetSummary:
    """Register ``source`` (a folder of DICOM series and/or NIfTI files) as dataset ``name`` of ``site_dir``.

    ``modality`` fills in where files do not say (NIfTI without a sidecar); DICOM's Modality tag wins.
    Raises :class:`RegistrationError` when the arguments are wrong or no case is usable.
    """
    check_name(name)
    site_dir, source = Path(site_dir), Path(source)
    if not source.is_dir():
        raise RegistrationError(f"source folder for dataset {name!r} does not exist; pass a folder of DICOM or NIfTI")
    if labels is not None and not Path(labels).is_dir():
        raise RegistrationError(f"labels folder for dataset {name!r} does not exist; pass a folder or None")
    if not 0.0 <= test_fraction < 1.0:
        raise RegistrationError(f"test_fraction must be in [0, 1), got {test_fraction}")
    quarantine: list[QuarantineEntry] = []

    def reject(paths: list[Path], error: InputRejected) -> None:
        # A series whose slices were already quarantined one by one is not counted a second time.
        seen = {p for entry in quarantine for p in entry["paths"]}
        fresh = [str(p) for p in paths if str(p) not in seen]
        if fresh:
            quarantine.append({"paths": fresh, "reason": error.reason, "detail": error.detail})

    label_index = _index_labels(Path(labels)) if labels is not None else {}
    candidates = _discover(source, Path(labels) if labels else None, reject)
    cases: list[CaseEntry] = []
    for candidate in candidates:
        label_path = _find_label(candidate, label_index)
        try:
            volume, used = _check_image(candidate, reject)
            values: list[int] = []
            if label_path is not None:
                values = sorted(int(v) for v in np.unique(align_label(read_nifti(label_path), volume)))
        except InputRejected as error:
            reject(candidate.paths, error)
            continue
        cases.append(_case_entry(candidate, used, volume, label_path, values, modality))
    labelled = any(case["label"] for case in cases)
    if labelled:
        for case in [c for c in cases if not c["label"]]:
            reject([Path(p) for p in case["files"]], InputRejected("missing_label"))
            cases.remove(case)
    skipped = dict(sorted(Counter(q["reason"] for q in quarantine for _ in q["paths"]).items()))
    for entry in quarantine:
        site_log(site_dir, f"dataset={name} quarantined reason={entry['reason']} files={len(entry['paths'])} "
                           f"first={entry['paths'][0]} detail={entry['detail'] or '-'}")
    if not cases:
        site_log(site_dir, f"dataset={name} registration failed: no usable case")
        raise RegistrationError(
            f"dataset {name!r}: no usable image in the source folder ({sum(skipped.values())} files skipped); "
            "see SITE/logs/data.log for the reasons"
        )
    _split(cases, seed, test_fraction)
    manifest: Manifest = {
        "format_version": FORMAT_VERSION, "name": name, "source": str(source.resolve()),
        "labels": str(Path(labels).resolve()) if labels else None, "seed": seed, "test_fraction": test_fraction,
        "labelled": labelled, "cases": cases, "quarantine": quarantine, "skipped": skipped,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    path = write_manifest(site_dir, manifest)
    num_test = sum(c["split"] == "test" for c in cases)
    site_log(site_dir, f"dataset={name} registered cases={len(cases)} test={num_test} skipped={skipped}")
    return DatasetSummary(
        name=name, num_cases=len(cases), num_train=len(cases) - num_test, num_test=num_test,
        modalities=sorted({c["modality"] for c in cases}), labelled=labelled, skipped=skipped, manifest_path=path,
    )


def _discover(source: Path, labels: Path | None, reject: _Reject) -> list[_Candidate]:
    """Walk ``source`` in sorted order: NIfTI images one by one, DICOM files grouped by SeriesInstanceUID."""
    candidates: list[_Candidate] = []
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    labels_root = labels.resolve() if labels else None
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(source).parts):
            continue
        if labels_root is not None and labels_root in path.resolve().parents:
            continue
        if path.suffix.lower() == ".json" and any(path.with_name(path.stem + s).exists() for s in (".nii.gz", ".nii")):
            continue  # a NIfTI's sidecar, read with its image
        if is_nifti(path):
            if not _is_label_name(path):
                stem = nifti_stem(path)
                # The patient key must not depend on where the folder lives, or the split would move with it.
                group = str(path.relative_to(source).with_name(stem))
                candidates.append(_Candidate("nifti", [path], [stem], group=group))
            continue
        try:
            header = dicom.read_header(path)
        except InputRejected as error:
            reject([path], error)
            continue
        uid = str(header.get("SeriesInstanceUID", "")) or f"file:{path}"
        series[uid].append((path, header))
    for uid, members in series.items():
        paths = [p for p, _ in members]
        folders = {p.parent for p in paths}
        keys = [uid] + ([folders.pop().name] if len(folders) == 1 else [])
        patient = str(members[0][1].get("PatientID", "")) or uid
        candidates.append(_Candidate("dicom", paths, keys, group=patient, headers=[h for _, h in members]))
    return candidates


def _check_image(candidate: _Candidate, reject: _Reject) -> tuple[Volume, list[Path]]:
    """Read a candidate fully. Bad DICOM slices are quarantined one by one; the rest must still form a series."""
    if candidate.format == "nifti":
        return read_nifti(candidate.paths[0]), candidate.paths
    dicom.order_slices(candidate.headers)  # mixed or gapped series: refuse before decoding pixels
    good: list[tuple[Path, Dataset, np.ndarray]] = []
    for path in candidate.paths:
        try:
            ds, pixels = dicom.read_pixels(path)
        except InputRejected as error:
            reject([path], error)
            continue
        good.append((path, ds, pixels))
    if not good:
        raise InputRejected("corrupt", "no readable slice left in the series")
    volume = dicom.assemble([ds for _, ds, _ in good], [px for _, _, px in good])
    return volume, [p for p, _, _ in good]


def _is_label_name(path: Path) -> bool:
    return nifti_stem(path).lower().endswith(LABEL_SUFFIXES)


def _base_key(stem: str) -> str:
    for suffix in LABEL_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _index_labels(labels: Path) -> dict[str, Path]:
    return {_base_key(nifti_stem(p)): p for p in sorted(labels.rglob("*")) if p.is_file() and is_nifti(p)}


def _find_label(candidate: _Candidate, label_index: dict[str, Path]) -> Path | None:
    if candidate.format == "nifti":
        image = candidate.paths[0]
        for suffix in LABEL_SUFFIXES:
            for ext in (".nii.gz", ".nii"):
                beside = image.with_name(nifti_stem(image) + suffix + ext)
                if beside.is_file():
                    return beside
    for key in candidate.keys:
        if key in label_index:
            return label_index[key]
    return None


def _case_entry(
    candidate: _Candidate, used: list[Path], volume: Volume, label: Path | None, values: list[int], modality: str | None
) -> CaseEntry:
    found = volume.modality if volume.modality != "unknown" else (modality or "unknown")
    return {
        "id": "", "split": "train", "format": "dicom" if candidate.format == "dicom" else "nifti",
        "files": [str(p) for p in used], "label": str(label) if label else None,
        "modality": found.upper(), "vendor": volume.vendor,
        "shape": list(volume.shape), "spacing": [round(s, 4) for s in volume.spacing],
        "axcodes": axcodes(volume.affine), "label_values": values,
        "group": hashlib.sha256(candidate.group.encode()).hexdigest()[:16],
        "fingerprint": fingerprint(used + ([label] if label else [])),
    }


def _split(cases: list[CaseEntry], seed: int, test_fraction: float) -> None:
    """Number the cases and assign whole patients to the test split, reproducibly from ``seed``."""
    for number, case in enumerate(cases, start=1):
        case["id"] = f"case-{number:04d}"
    groups = sorted({c["group"] for c in cases})
    target = round(test_fraction * len(cases)) if len(groups) > 1 else 0
    test_groups: set[str] = set()
    count = 0
    for index in np.random.default_rng(seed).permutation(len(groups)):
        if count >= target:
            break
        group = groups[int(index)]
        size = sum(c["group"] == group for c in cases)
        if count + size > len(cases) - 1:  # always keep at least one training case
            continue
        test_groups.add(group)
        count += size
    for case in cases:
        case["split"] = "test" if case["group"] in test_groups else "train"
