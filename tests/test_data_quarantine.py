"""Bad input is quarantined with its reason, counted, logged, and never stops the rest from being used."""

from __future__ import annotations

import gzip
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from site_kernel.data import InputRejected, prepare, register_dataset
from site_kernel.data.dicom import write_series
from site_kernel.data.manifest import read_manifest
from site_kernel.data.nifti import read_nifti

torch.set_num_threads(1)

CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [16, 16],
    "spacing": [2.0, 2.0],
    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
    "labels": {"background": 0, "lesion": 1},
}


def _volume(shape: tuple[int, int, int] = (12, 12, 4), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)


def _nifti_case(
    folder: Path, stem: str, *, label: bool = True, label_shape: tuple[int, int, int] | None = None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = _volume(seed=len(stem))
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 3.0, 1.0])), folder / f"{stem}.nii.gz")
    if label:
        mask = np.zeros(label_shape or image.shape, np.uint8)
        mask[3:6, 3:6, 1:3] = 1
        nib.save(nib.Nifti1Image(mask, np.diag([2.0, 2.0, 3.0, 1.0])), folder / f"{stem}_seg.nii.gz")


def _lying_nifti(path: Path, shape: tuple[int, int, int]) -> None:
    """A NIfTI whose header claims ``shape`` int16 voxels while the file holds only 64 of them."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    payload = header.binaryblock + b"\0" * 4 + np.zeros(64, np.int16).tobytes()
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(payload, mtime=0))
    else:
        path.write_bytes(payload)


def _dicom_series(folder: Path, positions: list[float], *, uid: str, odd_slice: bool = False) -> None:
    """One series (one SeriesInstanceUID) with slices at ``positions`` mm; ``odd_slice`` changes one matrix."""
    for k, z in enumerate(positions):
        affine = np.diag([-2.0, -2.0, 3.0, 1.0])
        affine[2, 3] = z
        shape = (10, 12, 1) if odd_slice and k == 1 else (12, 12, 1)
        (path,) = write_series(folder / f"s{k}", _volume(shape, k), affine, modality="CT", tags={}, uid_seed=uid)
        path.rename(folder / f"{uid}-{k}.dcm")
        (folder / f"s{k}").rmdir()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("corpus")
    source = root / "export"
    _nifti_case(source / "nifti", "good1")
    _nifti_case(source / "nifti", "good2")
    labels = root / "labels"
    labels.mkdir()
    write_series(
        source / "dicom" / "goodseries",
        _volume((12, 12, 4)),
        np.diag([-2.0, -2.0, 3.0, 1.0]),
        modality="CT",
        tags={"PatientName": "CANARY^QUARANTINE"},
        uid_seed="good",
    )
    mask = np.zeros((12, 12, 4), np.uint8)
    mask[2:5, 2:5, 1] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([-2.0, -2.0, 3.0, 1.0])), labels / "goodseries.nii.gz")
    bad = source / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "notes.txt").write_text("exported by the PACS on Monday\n")
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (bad / "cut.dcm").write_bytes(data[: len(data) // 2])
    shutil.copy(get_testdata_file("MR_truncated.dcm"), bad / "mr_truncated.dcm")
    good_gz = gzip.compress(nib.Nifti1Image(_volume(), np.eye(4)).to_bytes(), mtime=0)
    damaged = bytearray(good_gz)
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
    (bad / "damaged.nii.gz").write_bytes(bytes(damaged))
    _lying_nifti(bad / "liar.nii", (512, 512, 512))
    _lying_nifti(bad / "liar_gz.nii.gz", (512, 512, 512))
    _lying_nifti(bad / "huge.nii", (30000, 30000, 30000))
    _dicom_series(bad / "gap", [0.0, 3.0, 6.0, 12.0], uid="gap")
    _dicom_series(bad / "mixed", [0.0, 3.0, 6.0], uid="mixed", odd_slice=True)
    _nifti_case(source / "nifti", "unlabelled", label=False)
    _nifti_case(source / "nifti", "wronglabel", label_shape=(12, 12, 3))
    site = root / "site"
    tracemalloc.start()
    register_dataset(site, "mixed_bag", source, labels=labels, modality="CT")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 2**20, f"registration peaked at {peak / 2**20:.0f} MiB"  # the liars claim 256 MiB each
    return site, source


@pytest.mark.parametrize(
    ("file_name", "reason"),
    [
        ("bad/empty.dcm", "empty_file"),
        ("bad/notes.txt", "unreadable"),
        ("bad/cut.dcm", "truncated"),
        ("bad/mr_truncated.dcm", "truncated"),
        ("bad/damaged.nii.gz", "corrupt"),
        ("bad/liar.nii", "header_size_mismatch"),
        ("bad/liar_gz.nii.gz", "header_size_mismatch"),
        ("bad/huge.nii", "absurd_dimensions"),
        ("bad/gap/gap-2.dcm", "inconsistent_spacing"),
        ("bad/mixed/mixed-0.dcm", "mixed_series"),
        ("nifti/unlabelled.nii.gz", "missing_label"),
        ("nifti/wronglabel.nii.gz", "label_mismatch"),
    ],
)
def test_each_bad_input_is_quarantined_with_its_reason(corpus: tuple[Path, Path], file_name: str, reason: str) -> None:
    site, source = corpus
    manifest = read_manifest(site, "mixed_bag")
    reasons = {path: entry["reason"] for entry in manifest["quarantine"] for path in entry["paths"]}
    assert reasons[str(source / file_name)] == reason
    assert f"reason={reason}" in (site / "logs" / "data.log").read_text()


def test_quarantine_is_counted_by_file_and_reason(corpus: tuple[Path, Path]) -> None:
    site, _ = corpus
    assert read_manifest(site, "mixed_bag")["skipped"] == {
        "absurd_dimensions": 1,
        "corrupt": 1,
        "empty_file": 1,
        "header_size_mismatch": 2,
        "inconsistent_spacing": 4,
        "label_mismatch": 1,
        "missing_label": 1,
        "mixed_series": 3,
        "truncated": 2,
        "unreadable": 1,
    }


def test_the_good_cases_stay_usable(corpus: tuple[Path, Path]) -> None:
    site, _ = corpus
    manifest = read_manifest(site, "mixed_bag")
    data = prepare(site, {**CONTRACT, "dataset": "mixed_bag"})
    assert len(manifest["cases"]) == 3
    assert data.num_train + data.num_test == 12  # three good volumes of four slices
    assert (np.concatenate([data.train_y, data.test_y]) == 1).any()


def test_a_lying_header_is_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "liar.nii.gz"
    _lying_nifti(path, (2000, 2000, 60))  # 480 MB claimed, 1 kB on disk
    tracemalloc.start()
    with pytest.raises(InputRejected) as caught:
        read_nifti(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert caught.value.reason == "header_size_mismatch"
    assert peak < 8 * 2**20


def test_a_slice_with_absurd_dimensions_is_refused(tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = 60000, 60000
    (tmp_path / "export").mkdir()
    ds.save_as(tmp_path / "export" / "giant.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "export" / "fine.dcm")
    summary = register_dataset(tmp_path / "site", "d", tmp_path / "export")
    assert summary.num_cases == 1 and summary.skipped == {"absurd_dimensions": 1}
