"""Bad data that must not take a site down: refused at registration with its reason, or at preparation with a
message that says whose action fixes it, and the cause in the site's data.log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from site_kernel.cli import main as flip_site
from site_kernel.data import ContractError, DataError, prepare, public_catalogue, register_dataset
from site_kernel.data.manifest import read_manifest
from site_kernel.jobs import _preparation_failure

torch.set_num_threads(1)

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
CONTRACT = {
    "dataset": "d",
    "modality": ["CT"],
    "dims": 2,
    "size": [16, 16],
    "spacing": [2.0, 2.0],
    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
    "labels": {"background": 0, "lesion": 1},
}


def _image(folder: Path, stem: str, *, nan: bool = False, modality: str | None = "CT") -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    values = np.random.default_rng(len(stem)).normal(100.0, 20.0, (12, 12, 4)).astype(np.float32)
    if nan:
        values[2:4, 5, 1] = np.nan
        values[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(values, AFFINE), folder / f"{stem}.nii.gz")
    if modality:
        (folder / f"{stem}.json").write_text(json.dumps({"Modality": modality}))
    return values


def _label(folder: Path, stem: str, values: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    nib.save(nib.Nifti1Image(values, affine), folder / f"{stem}_seg.nii.gz")


def _mask() -> np.ndarray:
    mask = np.zeros((12, 12, 4), np.uint8)
    mask[3:7, 3:7, 1:3] = 1
    return mask


def _log(site: Path) -> str:
    return (site / "logs" / "data.log").read_text()


def test_an_image_with_nan_voxels_is_quarantined_at_registration(tmp_path: Path) -> None:
    _image(tmp_path / "export", "good")
    _image(tmp_path / "export", "holes", nan=True)

    summary = register_dataset(tmp_path / "site", "d", tmp_path / "export")

    assert summary.num_cases == 1 and summary.skipped == {"non_finite": 1}
    assert public_catalogue(tmp_path / "site")["datasets"]["d"]["skipped"] == [
        "1 file skipped: image with non-finite voxels (NaN or infinity)"
    ]
    assert "reason=non_finite" in _log(tmp_path / "site") and "3 of 576 voxels" in _log(tmp_path / "site")
    data = prepare(tmp_path / "site", {**CONTRACT, "labels": {"background": 0}})
    assert np.isfinite(data.train_x).all() and data.num_train + data.num_test == 4


def test_an_image_that_gains_nan_voxels_after_registration_is_skipped_by_prepare(tmp_path: Path) -> None:
    _image(tmp_path / "export", "a")
    _image(tmp_path / "export", "b")
    register_dataset(tmp_path / "site", "d", tmp_path / "export")
    _image(tmp_path / "export", "b", nan=True)

    data = prepare(tmp_path / "site", {**CONTRACT, "labels": {"background": 0}})

    assert data.stats["skipped_cases"] == 1 and np.isfinite(data.train_x).all()
    assert "skipped in prepare: InputRejected: image with non-finite voxels" in _log(tmp_path / "site")


@pytest.mark.parametrize("how", ["python", "flip-site"])
def test_a_relative_source_is_stored_as_an_absolute_resolved_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    _image(tmp_path / "work" / "export", "a")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    if how == "python":
        register_dataset(tmp_path / "site", "d", Path("export"))
    else:
        assert flip_site(["data", "add", "d", "./export/../export", "--site", str(tmp_path / "site")]) == 0

    monkeypatch.chdir(tmp_path / "elsewhere")  # the site's own processes run from other folders
    manifest = read_manifest(tmp_path / "site", "d")
    assert manifest["source"] == str((tmp_path / "work" / "export").resolve())
    assert all(Path(p).is_absolute() and ".." not in Path(p).parts for c in manifest["cases"] for p in c["files"])
    assert prepare(tmp_path / "site", {**CONTRACT, "labels": {"background": 0}}).num_train == 4


@pytest.mark.parametrize(
    ("label", "affine", "reason", "detail"),
    [
        ((np.linspace(0, 255, 576).reshape(12, 12, 4)).astype(np.uint8), AFFINE, "not_a_label_map", "distinct values"),
        (_mask().astype(np.float32) * 0.7, AFFINE, "not_a_label_map", "not integers"),
        (_mask().astype(np.int16) * 300, AFFINE, "not_a_label_map", "outside the class indices"),
        (_mask(), np.diag([2.0, 2.0, 2.0, 1.0]), "label_mismatch", "label map: label affine differs"),
        (_mask()[:, :, :3], AFFINE, "label_mismatch", "label map: label grid differs"),
    ],
    ids=["probability-map-0-255", "fractions", "values-above-255", "other-spacing", "other-grid"],
)
def test_a_label_file_that_is_no_label_map_of_its_image_is_refused_with_its_reason(
    tmp_path: Path, label: np.ndarray, affine: np.ndarray, reason: str, detail: str
) -> None:
    _image(tmp_path / "export", "good")
    _label(tmp_path / "export", "good", _mask())
    _image(tmp_path / "export", "bad")
    _label(tmp_path / "export", "bad", label, affine)

    summary = register_dataset(tmp_path / "site", "d", tmp_path / "export")

    assert summary.num_cases == 1 and summary.skipped == {reason: 1}
    assert summary.label_classes == {"0": 1, "1": 1}
    (entry,) = read_manifest(tmp_path / "site", "d")["quarantine"]
    assert entry["reason"] == reason and detail in entry["detail"]
    assert detail in _log(tmp_path / "site")


def test_a_dataset_of_unknown_modality_tells_the_data_owner_to_register_it_with_modality(tmp_path: Path) -> None:
    _image(tmp_path / "export", "a", modality=None)
    register_dataset(tmp_path / "site", "d", tmp_path / "export")

    with pytest.raises(ContractError) as caught:
        prepare(tmp_path / "site", {**CONTRACT, "labels": {"background": 0}})

    assert caught.value.fixed_by == "data_owner" and "--modality" in str(caught.value)
    assert "widen the contract" not in str(caught.value)
    assert "prepare failed (ContractError, to be fixed by the data owner)" in _log(tmp_path / "site")


def test_a_contract_that_asks_for_another_modality_is_the_researcher_s_to_fix(tmp_path: Path) -> None:
    _image(tmp_path / "export", "a", modality="MR")
    register_dataset(tmp_path / "site", "d", tmp_path / "export")

    with pytest.raises(ContractError) as caught:
        prepare(tmp_path / "site", {**CONTRACT, "labels": {"background": 0}})

    assert caught.value.fixed_by == "researcher" and "widen the contract" in str(caught.value)


def test_a_dataset_whose_files_all_vanished_fails_with_a_message_for_the_data_owner(tmp_path: Path) -> None:
    _image(tmp_path / "export", "a")
    register_dataset(tmp_path / "site", "d", tmp_path / "export")
    for path in (tmp_path / "export").iterdir():
        path.unlink()

    with pytest.raises(DataError) as caught:
        prepare(tmp_path / "site", {**CONTRACT, "labels": {"background": 0}})

    assert caught.value.fixed_by == "data_owner" and "register it again" in str(caught.value)
    log = _log(tmp_path / "site")
    assert "case=case-0001 skipped in prepare: FileNotFoundError" in log
    assert "prepare failed (DatasetUnusable, to be fixed by the data owner)" in log


def test_the_prepare_process_reports_whose_action_fixes_a_failure(tmp_path: Path) -> None:
    _image(tmp_path / "export", "a", modality=None)
    register_dataset(tmp_path / "site", "d", tmp_path / "export")
    request = {"site_dir": str(tmp_path / "site"), "contract": {**CONTRACT, "labels": {"background": 0}}}

    done = subprocess.run(
        [sys.executable, "-m", "site_kernel._prepare_job"],
        input=json.dumps(request).encode(),
        capture_output=True,
        timeout=300,
        check=False,
    )

    assert done.returncode == 1 and b"ContractError" in done.stderr
    failure = _preparation_failure("north", done.stdout)
    assert failure.kind == "data_error" and failure.message.endswith("at site north")
    assert "--modality" in failure.message and "for the data owner to fix" in failure.message
    assert str(tmp_path) not in failure.message and len(failure.message) < 300


@pytest.mark.parametrize(
    ("answer", "kind", "words"),
    [
        (
            b'{"failure": {"fixed_by": "researcher", "message": "no such thing"}}',
            "contract_error",
            "no such thing (for the researcher to fix) at site north",
        ),
        (
            b'{"failure": {"fixed_by": "data_owner", "message": "gone\\u001b[2K"}}',
            "data_error",
            "gone\\x1b[2K (for the data owner to fix",
        ),
        (b"Traceback: /pacs/SMITH^JOHN/IM0001", "site_error", "its data owner has the details"),
        (b"", "site_error", "its data owner has the details"),
    ],
)
def test_a_failed_preparation_is_described_safely(answer: bytes, kind: str, words: str) -> None:
    failure = _preparation_failure("north", answer)

    assert failure.kind == kind and words in failure.message and "SMITH" not in failure.message
