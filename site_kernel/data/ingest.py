"""Registering a folder of DICOM series or NIfTI images (with label maps) as a dataset of this site.

>>> summary = register_dataset(site_dir, "liver_ct", Path("/pacs/export"), labels=Path("/pacs/masks"))
>>> summary.num_cases, summary.skipped
(118, {'unreadable': 3})

Registration reads and checks every case once, then writes ``SITE/data/<name>/manifest.json``. Raw files stay
where they are; the manifest records their paths. Every input that cannot be used is quarantined with its reason
in the manifest and in the site log ``SITE/logs/data.log``, and the rest stays usable.

Labels (see :mod:`site_kernel.data.pairing`): ``labels`` is a folder of NIfTI label maps and/or DICOM SEG files
(SEG files may also sit in ``source``), or a CSV of per-case classes, which makes the dataset a classification
dataset. Label maps beside NIfTI images are always looked for. If any case has a label, cases without one are
quarantined (``missing_label``); so is a series whose SEG could not be used (the SEG itself under its own reason).

Train/test split: patients (DICOM PatientID, else the case itself) are shuffled with ``seed`` and assigned to the
test split until it holds ``test_fraction`` of the cases, so one patient's series never sit in both.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from . import dicom
from .classes import class_counts, is_class_table
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
from .multiframe import read_enhanced
from .nifti import is_nifti, nifti_stem, read_nifti
from .pairing import (
    Candidate,
    LabelFormat,
    LabelSources,
    Reject,
    find_class,
    find_label,
    is_label_name,
    open_labels,
    pair_segmentations,
)
from .seg import SegReference, is_segmentation, read_label_map, read_reference
from .sitelog import site_log
from .volume import Volume, axcodes


@dataclass(frozen=True)
class DatasetSummary:
    """What registration found. ``skipped`` counts quarantined files by reason; ``label_classes`` counts cases
    per class: label values (``"1"``, ``"1 (liver)"`` with a SEG's segment label) or CSV classes."""

    name: str
    num_cases: int
    num_train: int
    num_test: int
    modalities: list[str]
    labelled: bool
    skipped: dict[str, int] = field(default_factory=dict)
    manifest_path: Path | None = None
    task: str = "segmentation"
    label_classes: dict[str, int] = field(default_factory=dict)


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
    # Resolved now: the manifest is read later by the site's own processes, whose working folder is not the one
    # this was called from, so a relative path would register and then be found nowhere.
    site_dir, source = Path(site_dir), Path(source).expanduser().resolve()
    if not source.is_dir():
        raise RegistrationError(f"source folder for dataset {name!r} does not exist; pass a folder of DICOM or NIfTI")
    labels = Path(labels).expanduser().resolve() if labels is not None else None
    if labels is not None and not (labels.is_dir() or is_class_table(labels)):
        raise RegistrationError(
            f"labels folder or CSV for dataset {name!r} does not exist; pass a folder of label maps or SEG files, "
            "a .csv file of classes, or None"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise RegistrationError(f"test_fraction must be in [0, 1), got {test_fraction}")
    quarantine: list[QuarantineEntry] = []

    def reject(paths: list[Path], error: InputRejected) -> None:
        # A series whose slices were already quarantined one by one is not counted a second time.
        seen = {p for entry in quarantine for p in entry["paths"]}
        fresh = [str(p) for p in paths if str(p) not in seen]
        if fresh:
            quarantine.append({"paths": fresh, "reason": error.reason, "detail": error.detail})

    sources = open_labels(labels, reject)
    candidates, segs = _discover(source, labels, reject)
    if sources.classes is None:
        pair_segmentations(candidates, segs + sources.segs, reject)
    cases = [case for c in candidates if (case := _check_case(c, sources, modality, reject)) is not None]
    if sources.classes is not None:
        named = {key for c in candidates for key in c.keys}
        site_log(
            site_dir,
            f"dataset={name} labels CSV rows={len(sources.classes)} "
            f"naming no image={sum(key not in named for key in sources.classes)}",
        )
    labelled = any(case["label"] or case.get("class_name") for case in cases)
    if labelled:
        for case in [c for c in cases if not (c["label"] or c.get("class_name"))]:
            reject([Path(p) for p in case["files"]], InputRejected("missing_label"))
            cases.remove(case)
    skipped = dict(sorted(Counter(q["reason"] for q in quarantine for _ in q["paths"]).items()))
    for entry in quarantine:
        site_log(
            site_dir,
            f"dataset={name} quarantined reason={entry['reason']} files={len(entry['paths'])} "
            f"first={entry['paths'][0]} detail={entry['detail'] or '-'}",
        )
    if not cases:
        site_log(site_dir, f"dataset={name} registration failed: no usable case")
        raise RegistrationError(
            f"dataset {name!r}: no usable image in the source folder ({sum(skipped.values())} files skipped); "
            "see SITE/logs/data.log for the reasons"
        )
    _split(cases, seed, test_fraction)
    manifest: Manifest = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "source": str(source),
        "labels": str(labels) if labels else None,
        "seed": seed,
        "test_fraction": test_fraction,
        "labelled": labelled,
        "cases": cases,
        "quarantine": quarantine,
        "skipped": skipped,
        "registered_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if sources.classes is not None:
        manifest["task"] = "classification"
    path = write_manifest(site_dir, manifest)
    num_test = sum(c["split"] == "test" for c in cases)
    site_log(site_dir, f"dataset={name} registered cases={len(cases)} test={num_test} skipped={skipped}")
    return DatasetSummary(
        name=name,
        num_cases=len(cases),
        num_train=len(cases) - num_test,
        num_test=num_test,
        modalities=sorted({c["modality"] for c in cases}),
        labelled=labelled,
        skipped=skipped,
        manifest_path=path,
        task=manifest.get("task", "segmentation"),
        label_classes=class_counts(cases),
    )


def _discover(source: Path, labels: Path | None, reject: Reject) -> tuple[list[Candidate], list[SegReference]]:
    """Walk ``source`` in sorted order: NIfTI images one by one, DICOM files grouped by SeriesInstanceUID (extra
    copies of one SOP instance dropped; an Enhanced CT/MR file is a series on its own), and DICOM SEG objects set
    aside as labels (a SEG is never an image series of its own)."""
    candidates: list[Candidate] = []
    segs: list[SegReference] = []
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    labels_root = labels
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if any(part.startswith(".") for part in path.relative_to(source).parts):
            continue
        if labels_root is not None and (path.resolve() == labels_root or labels_root in path.resolve().parents):
            continue
        if path.suffix.lower() == ".json" and any(path.with_name(path.stem + s).exists() for s in (".nii.gz", ".nii")):
            continue  # a NIfTI's sidecar, read with its image
        if is_nifti(path):
            if not is_label_name(path):
                stem = nifti_stem(path)
                # The patient key must not depend on where the folder lives, or the split would move with it.
                group = str(path.relative_to(source).with_name(stem))
                candidates.append(Candidate("nifti", [path], [stem], group=group))
            continue
        try:
            ds = dicom.read_dataset(path)
            if is_segmentation(ds):
                segs.append(read_reference(path, ds))
                continue
            header = dicom.check_image_header(ds)
        except InputRejected as error:
            reject([path], error)
            continue
        uid = str(header.get("SeriesInstanceUID", "")) or f"file:{path}"
        series[uid].append((path, header))
    for uid, found in series.items():
        members, copies = dicom.drop_duplicate_instances(found)
        if copies:
            reject(copies, InputRejected("duplicate_instance", f"{len(copies)} extra copies of slices in one series"))
        if len(members) > 1 and any(dicom.is_enhanced(h) for _, h in members):
            reject(
                [p for p, _ in members],
                InputRejected("mixed_series", "an Enhanced CT/MR file shares its series with other image files"),
            )
            continue
        paths = [p for p, _ in members]
        folders = {p.parent for p in paths}
        keys = [uid] + ([folders.pop().name] if len(folders) == 1 else [])
        patient = str(members[0][1].get("PatientID", "")) or uid
        candidates.append(Candidate("dicom", paths, keys, group=patient, headers=[h for _, h in members]))
    return candidates, segs


def _check_case(candidate: Candidate, sources: LabelSources, modality: str | None, reject: Reject) -> CaseEntry | None:
    """Read one candidate and its label; quarantine what cannot be used and return the manifest entry otherwise."""
    class_name = find_class(candidate, sources.classes) if sources.classes is not None else None
    if sources.classes is not None and class_name is None:  # refused before any pixel is read
        reject(candidate.paths, InputRejected("missing_label", "no row in the labels CSV"))
        return None
    label = None if sources.classes is not None else find_label(candidate, sources.nifti, reject)
    names: dict[int, str] = {}
    values: list[int] = []
    try:
        volume, used = _check_image(candidate, reject)
        if label is not None and label[1] == "nifti":
            values = _values(_read_label(label[0], volume))
    except InputRejected as error:
        reject(candidate.paths, error)
        return None
    if label is not None and label[1] == "dicom-seg":
        try:
            array, names = read_label_map(label[0], volume)
        except InputRejected as error:
            reject([label[0]], error)
            reject(candidate.paths, InputRejected("missing_label", "its segmentation was quarantined"))
            return None
        values = _values(array)
    entry = _case_entry(candidate, used, volume, label, values, modality)
    if label is not None and label[1] == "dicom-seg":
        entry["label_format"] = "dicom-seg"
        entry["label_names"] = {str(number): text for number, text in sorted(names.items())}
    if class_name is not None:
        entry["class_name"] = class_name
    return entry


def _check_image(candidate: Candidate, reject: Reject) -> tuple[Volume, list[Path]]:
    """Read a candidate fully. Bad DICOM slices are quarantined one by one; the rest must still form a series."""
    if candidate.format == "nifti":
        return read_nifti(candidate.paths[0]), candidate.paths
    if dicom.is_enhanced(candidate.headers[0]):
        return read_enhanced(candidate.paths[0]), candidate.paths
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


def _read_label(path: Path, image: Volume) -> np.ndarray:
    """The NIfTI label map at ``path`` on ``image``'s grid; a refusal says that the label map, not the image, is at
    fault (the image's files carry the reason in the manifest, as the case cannot be used without its label)."""
    try:
        return align_label(read_nifti(path), image)
    except InputRejected as error:
        raise InputRejected(error.reason, f"label map: {error.detail or error.reason}") from error


def _values(label_map: np.ndarray) -> list[int]:
    return sorted(int(v) for v in np.unique(label_map))


def _case_entry(
    candidate: Candidate,
    used: list[Path],
    volume: Volume,
    label: tuple[Path, LabelFormat] | None,
    values: list[int],
    modality: str | None,
) -> CaseEntry:
    found = volume.modality if volume.modality != "unknown" else (modality or "unknown")
    label_path = label[0] if label else None
    return {
        "id": "",
        "split": "train",
        "format": "dicom" if candidate.format == "dicom" else "nifti",
        "files": [str(p) for p in used],
        "label": str(label_path) if label_path else None,
        "modality": found.upper(),
        "vendor": volume.vendor,
        "shape": list(volume.shape),
        "spacing": [round(s, 4) for s in volume.spacing],
        "axcodes": axcodes(volume.affine),
        "label_values": values,
        "group": hashlib.sha256(candidate.group.encode()).hexdigest()[:16],
        "fingerprint": fingerprint(used + ([label_path] if label_path else [])),
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
