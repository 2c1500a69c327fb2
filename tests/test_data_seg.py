"""DICOM SEG objects as label maps: paired with their series, aligned voxel for voxel, bad ones quarantined."""

from __future__ import annotations

import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.sr.codedict import codes

from site_kernel.data import prepare, public_catalogue, register_dataset
from site_kernel.data.dicom import write_series
from site_kernel.data.manifest import load_case, read_manifest

torch.set_num_threads(1)

SHAPE = (14, 12, 6)  # [column, row, slice]
#: What highdicom copies from the source images into a SEG (patient and study modules).
PATIENT = {
    "PatientName": "CANARY^SEG",
    "PatientID": "P-SEG-1",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "StudyID": "1",
    "StudyDate": "20240101",
    "StudyTime": "120000",
    "ReferringPhysicianName": "",
    "AccessionNumber": "",
    "Manufacturer": "TEST",
}
CONTRACT = {
    "modality": "CT",
    "dims": 2,
    "size": [16, 16],
    "spacing": [1.5, 2.0],
    "intensity": {"kind": "window", "center": 200, "width": 600},
    "labels": {"background": 0, "lesion": 1},
}


def _series(folder: Path, seed: str, *, reverse: bool = False) -> list[Path]:
    stored = np.random.default_rng(len(seed)).integers(0, 400, SHAPE).astype(np.int16)
    affine = np.diag([-1.5, -2.0, 3.0, 1.0])
    affine[:3, 3] = [10.0, 5.0, -20.0]
    return write_series(
        folder,
        stored,
        affine,
        modality="CT",
        tags={**PATIENT, "PatientID": f"P-{seed}"},
        uid_seed=seed,
        reverse_file_order=reverse,
    )


def _mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:7, 3:8, 1:3] = 1  # "Liver"
    mask[9:12, 1:4, 4] = 2  # "Lesion", on one slice only: the SEG omits the empty frames around it
    return mask


def _write_seg(series: list[Path], mask: np.ndarray, path: Path, names: tuple[str, ...] = ("Liver", "Lesion")) -> Path:
    """A SEG over ``series`` made by highdicom, frames in the series' file order (not slice order)."""
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series)]
    frames = np.stack([mask[:, :, int(ds.InstanceNumber) - 1].T for ds in sources])  # rows x columns per slice
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Organ,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name in enumerate(names, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


@pytest.mark.parametrize(("reverse", "seg_in_labels"), [(False, False), (True, False), (True, True)])
def test_a_seg_becomes_its_series_label_map_voxel_for_voxel(tmp_path: Path, reverse: bool, seg_in_labels: bool) -> None:
    source, labels = tmp_path / "export", tmp_path / "labels"
    series = _series(source / "ct", "one", reverse=reverse)
    labels.mkdir()
    _write_seg(series, _mask(), (labels if seg_in_labels else source) / "seg.dcm")

    summary = register_dataset(tmp_path / "site", "d", source, labels=labels, test_fraction=0.0)

    (case,) = read_manifest(tmp_path / "site", "d")["cases"]
    assert (summary.num_cases, summary.modalities, summary.skipped) == (1, ["CT"], {})  # the SEG is no image
    assert summary.label_classes == {"0": 1, "1 (Liver)": 1, "2 (Lesion)": 1}
    assert case["label_format"] == "dicom-seg" and case["label_names"] == {"1": "Liver", "2": "Lesion"}
    volume, label = load_case(case)
    assert label is not None and label.shape == volume.shape == SHAPE
    np.testing.assert_array_equal(label, _mask())


def test_segments_take_the_contract_s_value_by_segment_label(tmp_path: Path) -> None:
    source = tmp_path / "export"
    series = _series(source / "ct", "two")
    _write_seg(series, _mask(), tmp_path / "segs" / "seg.dcm")
    register_dataset(tmp_path / "site", "seg", source, labels=tmp_path / "segs", test_fraction=0.0)
    # The same series with a NIfTI map of the lesion alone, numbered 1 as the contract numbers it.
    lesion = nib.Nifti1Image(
        (_mask() == 2).astype(np.uint8), load_case(read_manifest(tmp_path / "site", "seg")["cases"][0])[0].affine
    )
    (tmp_path / "maps").mkdir()
    nib.save(lesion, tmp_path / "maps" / "ct_seg.nii.gz")
    register_dataset(tmp_path / "site", "nifti", source, labels=tmp_path / "maps", test_fraction=0.0)

    by_seg = prepare(tmp_path / "site", {**CONTRACT, "dataset": "seg"})
    by_nifti = prepare(tmp_path / "site", {**CONTRACT, "dataset": "nifti"})

    assert by_seg.train_y.sum() > 0
    np.testing.assert_array_equal(by_seg.train_y, by_nifti.train_y)  # "Lesion" (segment 2) became 1, "Liver" 0


def test_the_catalogue_names_the_segments(tmp_path: Path) -> None:
    source = tmp_path / "export"
    _write_seg(_series(source / "ct", "three"), _mask(), source / "seg.dcm")
    register_dataset(tmp_path / "site", "d", source)
    entry = public_catalogue(tmp_path / "site", min_count=1)["datasets"]["d"]
    assert entry["label_classes"] == [0, 1, 2] and entry["label_names"] == {"1": ["Liver"], "2": ["Lesion"]}
    assert "CANARY" not in str(entry) and "P-three" not in str(entry)


def _shift(path: Path, offset_mm: tuple[float, float, float]) -> None:
    """Move every frame of a SEG by ``offset_mm`` (LPS), as a SEG drawn on another grid would be."""
    ds = pydicom.dcmread(path)
    for frame in ds.PerFrameFunctionalGroupsSequence:
        position = frame.PlanePositionSequence[0]
        position.ImagePositionPatient = [
            float(v) + d for v, d in zip(position.ImagePositionPatient, offset_mm, strict=True)
        ]
    ds.save_as(path)


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad_seg")
    source = root / "export"
    _write_seg(_series(source / "good", "good"), _mask(), source / "segs" / "good.dcm")
    _write_seg(_series(root / "elsewhere", "absent"), _mask(), source / "segs" / "orphan.dcm")
    _shift(
        _write_seg(_series(source / "halfvoxel", "halfvoxel"), _mask(), source / "segs" / "halfvoxel.dcm"),
        (0.75, 0.0, 0.0),
    )
    _shift(
        _write_seg(_series(source / "outside", "outside"), _mask(), source / "segs" / "outside.dcm"), (0.0, 0.0, 9.0)
    )  # three slices up: the lesion slice lands above the series
    data = _write_seg(_series(source / "cut", "cut"), _mask(), source / "segs" / "cut.dcm").read_bytes()
    (source / "segs" / "cut.dcm").write_bytes(data[: len(data) - 200])
    twice = _series(source / "twice", "twice")
    _write_seg(twice, _mask(), source / "segs" / "twice_a.dcm")
    _write_seg(twice, _mask(), source / "segs" / "twice_b.dcm")
    register_dataset(root / "site", "d", source)
    return root / "site", source


@pytest.mark.parametrize(
    ("file_name", "reasons"),
    [
        ("segs/orphan.dcm", {"unmatched_label"}),
        ("segs/halfvoxel.dcm", {"label_mismatch"}),
        ("halfvoxel/IM0001.dcm", {"missing_label"}),
        ("segs/outside.dcm", {"label_mismatch"}),
        ("segs/cut.dcm", {"truncated"}),
        ("cut/IM0003.dcm", {"missing_label"}),
        ("segs/twice_b.dcm", {"duplicate_label"}),
    ],
)
def test_each_bad_seg_is_quarantined_with_its_reason(
    bad_corpus: tuple[Path, Path], file_name: str, reasons: set[str]
) -> None:
    site, source = bad_corpus
    quarantine = {p: e["reason"] for e in read_manifest(site, "d")["quarantine"] for p in e["paths"]}
    assert quarantine[str(source / file_name)] in reasons


def test_series_with_a_good_seg_stay_usable(bad_corpus: tuple[Path, Path]) -> None:
    site, _ = bad_corpus
    cases = read_manifest(site, "d")["cases"]
    assert sorted(Path(str(c["label"])).name for c in cases) == ["good.dcm", "twice_a.dcm"]
    for case in cases:
        np.testing.assert_array_equal(load_case(case)[1], _mask())


def test_a_seg_swapped_for_another_series_after_registration_is_refused_at_prepare(tmp_path: Path) -> None:
    source = tmp_path / "export"
    _write_seg(_series(source / "a", "gone-a"), _mask(), source / "a.seg.dcm")
    _write_seg(_series(source / "b", "gone-b"), _mask(), source / "b.seg.dcm")
    register_dataset(tmp_path / "site", "d", source, test_fraction=0.0)
    shutil.copy(source / "a.seg.dcm", source / "b.seg.dcm")  # b's SEG now describes a's series

    data = prepare(tmp_path / "site", {**CONTRACT, "dataset": "d"})
    assert data.stats["skipped_cases"] == 1 and data.num_train == SHAPE[2]
