"""Registering real scanner files (pydicom's and nibabel's test data) and simulated series as site datasets."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from site_kernel.data import RegistrationError, prepare, register_dataset
from site_kernel.data.dicom import read_series, write_series
from site_kernel.data.manifest import read_manifest

torch.set_num_threads(1)

PYDICOM_DATA = Path(get_testdata_file("CT_small.dcm")).parent
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
SERIES_CT5N = PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT5N"
CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [32, 32],
    "spacing": [2.0, 2.0],
    "orientation": "RAS",
    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
    "labels": {"background": 0, "lesion": 1},
}


def test_registers_real_ct_and_mr_slices(tmp_path: Path) -> None:
    source = tmp_path / "export"
    source.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), source / "a.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), source / "b.dcm")

    summary = register_dataset(tmp_path / "site", "scans", source)

    assert (summary.num_cases, summary.modalities, summary.labelled) == (2, ["CT", "MR"], False)
    cases = {c["modality"]: c for c in read_manifest(tmp_path / "site", "scans")["cases"]}
    assert cases["CT"]["shape"] == [128, 128, 1] and cases["CT"]["vendor"] == "GE MEDICAL SYSTEMS"
    assert cases["CT"]["spacing"] == pytest.approx([0.6615, 0.6615, 5.0], abs=1e-3)
    assert cases["MR"]["shape"] == [64, 64, 1] and cases["MR"]["vendor"] == "TOSHIBA_MEC"
    unlabelled = {**CONTRACT, "dataset": "scans", "labels": {"background": 0}}
    data = prepare(tmp_path / "site", unlabelled)
    assert data.num_train + data.num_test == 2 and not np.any(data.train_y)


def test_ct_rescale_slope_and_intercept_give_hounsfield_units() -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    volume = read_series([Path(get_testdata_file("CT_small.dcm"))])
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert float(ds.RescaleIntercept) == -1024
    np.testing.assert_array_equal(volume.array[:, :, 0], expected.T)


def test_real_multi_slice_series_is_one_case_in_position_order(tmp_path: Path) -> None:
    source = tmp_path / "export"
    source.mkdir()
    files = sorted(SERIES_CT5N.iterdir())
    names = [f"x{n}.dcm" for n in range(len(files))]
    random.Random(3).shuffle(names)  # file names say nothing about slice order
    for path, name in zip(files, names, strict=True):
        shutil.copy(path, source / name)

    summary = register_dataset(tmp_path / "site", "ct5n", source)
    volume = read_series(sorted(source.iterdir()))

    assert summary.num_cases == 1
    assert volume.shape == (16, 16, 5) and volume.spacing[2] == pytest.approx(2.5, abs=1e-3)
    by_height = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k, path in enumerate(by_height):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(volume.array[:, :, k], pydicom.pixels.apply_modality_lut(ds.pixel_array, ds).T)


def test_real_series_with_uneven_gaps_is_quarantined(tmp_path: Path) -> None:
    source = tmp_path / "export"
    shutil.copytree(PYDICOM_DATA / "dicomdirtests" / "77654033" / "CT2", source)
    shutil.copy(get_testdata_file("CT_small.dcm"), source / "good.dcm")

    summary = register_dataset(tmp_path / "site", "ct2", source)

    assert summary.num_cases == 1
    assert summary.skipped == {"inconsistent_spacing": 4}


def test_nifti_image_takes_the_label_beside_it(tmp_path: Path) -> None:
    source = tmp_path / "export"
    source.mkdir()
    image = nib.load(NIBABEL_DATA / "anatomical.nii")
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), source / "anat.nii.gz")
    mask = (np.asarray(image.dataobj) > np.percentile(np.asarray(image.dataobj), 95)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, image.affine), source / "anat_seg.nii.gz")

    summary = register_dataset(tmp_path / "site", "anat", source, modality="MR")
    data = prepare(tmp_path / "site", {**CONTRACT, "dataset": "anat"})

    (case,) = read_manifest(tmp_path / "site", "anat")["cases"]
    assert summary.labelled and case["label_values"] == [0, 1] and case["modality"] == "MR"
    assert case["shape"] == [33, 41, 25] and case["axcodes"] == "LAS"
    assert data.num_train + data.num_test == 25  # one slice per axial plane of the real scan
    assert (np.concatenate([data.train_y, data.test_y]) == 1).sum() > 0


def _smooth_integer_volume(shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    values = 1000 * np.exp(-((grid[0] - 0.3) ** 2 + (grid[1] + 0.2) ** 2) * 3) + 200 * grid[2] + 300 * grid[0]
    return values.astype(np.int16)


def _flip(array: np.ndarray, affine: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same world grid stored with ``axes`` reversed: array flipped, affine saying so."""
    flip = np.eye(4)
    for axis in axes:
        flip[axis, axis] = -1
        flip[axis, 3] = array.shape[axis] - 1
    return np.flip(array, axes).copy(), affine @ flip


def test_series_stored_flipped_transposed_and_reversed_harmonises_to_the_same_slices(tmp_path: Path) -> None:
    stored = _smooth_integer_volume((24, 20, 6))
    affine = np.diag([-1.5, -1.5, 4.0, 1.0])  # DICOM's usual LPS storage, seen from RAS
    affine[:3, 3] = [20.0, 15.0, -10.0]
    label = (stored > np.percentile(stored, 80)).astype(np.uint8)
    flipped, flipped_affine = _flip(stored, affine, (0, 2))
    swap = np.eye(4)[[1, 0, 2, 3]]  # rows and columns exchanged: ImageOrientationPatient says so
    variants = {
        "plain": (stored, label, affine, False),
        "flipped": (flipped, _flip(label, affine, (0, 2))[0], flipped_affine, True),
        "transposed": (np.transpose(stored, (1, 0, 2)), np.transpose(label, (1, 0, 2)), affine @ swap, True),
    }
    results = {}
    for name, (values, mask, grid, reverse) in variants.items():
        source, labels = tmp_path / name / "dicom", tmp_path / name / "labels"
        write_series(
            source / "series1",
            values,
            grid,
            modality="CT",
            tags={"Manufacturer": "TEST"},
            uid_seed=name,
            reverse_file_order=reverse,
        )
        labels.mkdir(parents=True)
        nib.save(nib.Nifti1Image(mask, grid), labels / "series1_seg.nii.gz")
        register_dataset(tmp_path / name / "site", "default", source, labels=labels, test_fraction=0.0)
        results[name] = prepare(tmp_path / name / "site", CONTRACT)

    for name in ("flipped", "transposed"):
        np.testing.assert_allclose(results[name].train_x, results["plain"].train_x, atol=1e-5)
        np.testing.assert_array_equal(results[name].train_y, results["plain"].train_y)
    assert results["plain"].train_y.sum() > 0


def test_registration_keeps_raw_files_and_records_their_paths(tmp_path: Path) -> None:
    source = tmp_path / "export"
    shutil.copytree(SERIES_CT5N, source)
    before = {p: p.stat().st_mtime_ns for p in source.iterdir()}

    register_dataset(tmp_path / "site", "ct5n", source)

    manifest = json.loads((tmp_path / "site" / "data" / "ct5n" / "manifest.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in source.iterdir()} == before
    assert sorted(Path(p) for p in manifest["cases"][0]["files"]) == sorted(p.resolve() for p in before)


def _patient_series(source: Path, patient: str, number: int) -> None:
    write_series(
        source / f"{patient}-{number}",
        _smooth_integer_volume((8, 8, 3)),
        np.eye(4),
        modality="MR",
        tags={"PatientID": patient},
        uid_seed=f"{patient}{number}",
    )


def test_split_is_seeded_and_keeps_each_patient_on_one_side(tmp_path: Path) -> None:
    source = tmp_path / "export"
    for patient in range(8):
        for number in range(2):
            _patient_series(source, f"P{patient}", number)

    splits = []
    for seed in (0, 0, 1):
        register_dataset(tmp_path / f"site{seed}", "d", source, seed=seed, test_fraction=0.25)
        cases = read_manifest(tmp_path / f"site{seed}", "d")["cases"]
        by_patient: dict[str, set[str]] = {}
        for case in cases:
            by_patient.setdefault(case["group"], set()).add(case["split"])
        assert all(len(sides) == 1 for sides in by_patient.values())
        assert sum(c["split"] == "test" for c in cases) == 4
        splits.append([c["split"] for c in cases])
    assert splits[0] == splits[1]


def test_the_split_does_not_depend_on_where_the_files_live(tmp_path: Path) -> None:
    first = tmp_path / "here" / "export"
    first.mkdir(parents=True)
    image = nib.load(NIBABEL_DATA / "anatomical.nii")
    for n in range(8):
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), first / f"case{n}.nii.gz")
    second = tmp_path / "moved" / "elsewhere" / "export"
    shutil.copytree(first, second)

    splits = []
    for source in (first, second):
        register_dataset(source.parent / "site", "d", source, modality="MR", seed=4)
        splits.append([c["split"] for c in read_manifest(source.parent / "site", "d")["cases"]])
    assert splits[0] == splits[1] and "test" in splits[0]


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("../escape", {}, "not allowed"),
        ("ok", {"test_fraction": 1.0}, "test_fraction"),
        ("ok", {"labels": Path("/nonexistent/labels")}, "labels folder"),
    ],
)
def test_register_refuses_bad_arguments(tmp_path: Path, name: str, kwargs: dict, message: str) -> None:
    (tmp_path / "export").mkdir()
    with pytest.raises(RegistrationError, match=message):
        register_dataset(tmp_path / "site", name, tmp_path / "export", **kwargs)


def test_register_refuses_a_missing_source_and_an_empty_one(tmp_path: Path) -> None:
    with pytest.raises(RegistrationError, match="does not exist"):
        register_dataset(tmp_path / "site", "d", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistrationError, match="no usable image"):
        register_dataset(tmp_path / "site", "d", tmp_path / "empty")
