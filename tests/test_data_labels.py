"""Classification datasets: a CSV of per-case classes, class indices at prepare time, the catalogue, the CLI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from site_kernel.cli import main
from site_kernel.data import (
    ContractError,
    RegistrationError,
    prepare,
    public_catalogue,
    register_dataset,
    validate_contract,
)
from site_kernel.data.dicom import write_series
from site_kernel.data.manifest import read_manifest

torch.set_num_threads(1)

CONTRACT = {
    "modality": "MR",
    "dims": 2,
    "size": [16, 16],
    "spacing": [2.0, 2.0],
    "intensity": {"kind": "zscore"},
    "task": "classification",
    "labels": {"normal": 0, "pneumonia": 1},
}
#: case -> (number of axial slices, CSV label)
CASES = {"case_a": (3, "normal"), "case_b": (4, "Pneumonia"), "case_c": (2, "1"), "case_d": (5, "normal")}


def _nifti(folder: Path, stem: str, slices: int) -> None:
    image = np.random.default_rng(slices).integers(0, 500, (12, 12, slices)).astype(np.int16)
    nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 3.0, 1.0])), folder / f"{stem}.nii.gz")


def _csv(path: Path, rows: dict[str, str], header: str = "case,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{case},{label}\n" for case, label in rows.items()))
    return path


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    for stem, (slices, _) in CASES.items():
        _nifti(folder, stem, slices)
    return folder


def test_a_csv_makes_a_classification_dataset(tmp_path: Path, source: Path) -> None:
    rows = {stem: label for stem, (_, label) in CASES.items() if stem != "case_d"}
    rows["nobody"] = "normal"  # a row naming no image is left aside
    # The CSV may sit in the source folder: it is read as labels, not quarantined as an unreadable image.
    summary = register_dataset(
        tmp_path / "site", "xr", source, labels=_csv(source / "classes.csv", rows), modality="MR"
    )

    manifest = read_manifest(tmp_path / "site", "xr")
    assert manifest["task"] == "classification" and summary.task == "classification"
    assert {Path(c["files"][0]).name: c["class_name"] for c in manifest["cases"]} == {
        "case_a.nii.gz": "normal",
        "case_b.nii.gz": "Pneumonia",
        "case_c.nii.gz": "1",
    }
    assert summary.label_classes == {"1": 1, "Pneumonia": 1, "normal": 1}
    assert summary.skipped == {"missing_label": 1}  # case_d has no row
    assert [q["paths"] for q in manifest["quarantine"]] == [[str(source / "case_d.nii.gz")]]


def test_each_slice_carries_its_case_s_class_index(tmp_path: Path, source: Path) -> None:
    rows = {stem: label for stem, (_, label) in CASES.items()}
    register_dataset(
        tmp_path / "site", "default", source, labels=_csv(tmp_path / "c.csv", rows), modality="MR", test_fraction=0.0
    )

    data = prepare(tmp_path / "site", CONTRACT)

    index = {"normal": 0, "Pneumonia": 1, "1": 1}  # names case-insensitively, integers as they are
    cases = read_manifest(tmp_path / "site", "default")["cases"]
    slices = {stem: n for stem, (n, _) in CASES.items()}
    expected = np.concatenate(
        [np.full(slices[Path(c["files"][0]).name[:6]], index[str(c.get("class_name"))]) for c in cases]
    )
    assert data.train_y.dtype == np.int64 and data.train_y.shape == (sum(n for n, _ in CASES.values()),)
    np.testing.assert_array_equal(data.train_y, expected)
    assert data.train_x.shape == (len(expected), 1, 16, 16) and data.test_y.shape == (0,)


def test_a_class_the_contract_does_not_name_is_refused_by_name(tmp_path: Path, source: Path) -> None:
    rows = {stem: label for stem, (_, label) in CASES.items()} | {"case_d": "covid"}
    register_dataset(tmp_path / "site", "default", source, labels=_csv(tmp_path / "c.csv", rows), modality="MR")
    with pytest.raises(ContractError, match="class 'covid'") as caught:
        prepare(tmp_path / "site", CONTRACT)
    assert caught.value.key == "labels" and "case_d" not in str(caught.value)


def test_classification_and_segmentation_datasets_and_contracts_do_not_mix(tmp_path: Path, source: Path) -> None:
    rows = {stem: label for stem, (_, label) in CASES.items()}
    register_dataset(tmp_path / "site", "classes", source, labels=_csv(tmp_path / "c.csv", rows), modality="MR")
    register_dataset(tmp_path / "site", "images", source, modality="MR")
    segmentation = {**CONTRACT, "task": "segmentation", "labels": {"background": 0}}
    with pytest.raises(ContractError, match="no per-case classes") as caught:
        prepare(tmp_path / "site", {**CONTRACT, "dataset": "images"})
    assert caught.value.key == "task"
    with pytest.raises(ContractError, match="'task': 'classification'"):
        prepare(tmp_path / "site", {**segmentation, "dataset": "classes"})


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"task": "regression"}, "task", "task must be one of"),
        ({"labels": {"normal": 0}}, "labels", "at least two classes"),
        ({"labels": {"normal": 0, "pneumonia": 2}}, "labels", r"0 \.\. 1"),
        ({"labels": {"normal": 1, "pneumonia": 1}}, "labels", r"0 \.\. 1"),
    ],
)
def test_a_bad_classification_contract_is_refused(change: dict, key: str, message: str) -> None:
    with pytest.raises(ContractError, match=message) as caught:
        validate_contract({**CONTRACT, **change})
    assert caught.value.key == key


def test_the_default_task_leaves_the_normalised_contract_unchanged() -> None:
    segmentation = {**CONTRACT, "labels": {"background": 0, "lesion": 1}}
    del segmentation["task"]
    assert validate_contract({**segmentation, "task": "segmentation"}) == validate_contract(segmentation)
    assert "task" not in validate_contract(segmentation)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("patient,class\ncase_a,normal\n", "columns 'case' and 'label'"),
        ("case,label\ncase_a,normal\ncase_a,pneumonia\n", "row 3 gives a case a second"),
        ("case,label\ncase_a,\n", "row 2 lacks"),
        ("case,label\n", "no rows"),
    ],
)
def test_a_bad_csv_is_refused_by_row_number(tmp_path: Path, source: Path, text: str, message: str) -> None:
    (tmp_path / "c.csv").write_text(text)
    with pytest.raises(RegistrationError, match=message) as caught:
        register_dataset(tmp_path / "site", "xr", source, labels=tmp_path / "c.csv")
    assert "case_a" not in str(caught.value)


def test_dicom_series_take_their_class_by_folder_or_series_uid(tmp_path: Path) -> None:
    source = tmp_path / "export"
    uids = {}
    for name in ("by_folder", "by_uid", "unlisted"):
        paths = write_series(
            source / name, np.ones((8, 8, 2), np.int16), np.eye(4), modality="MR", tags={}, uid_seed=name
        )
        uids[name] = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    csv = _csv(tmp_path / "c.csv", {"by_folder": "normal", uids["by_uid"]: "pneumonia"})
    summary = register_dataset(tmp_path / "site", "d", source, labels=csv)
    classes = {Path(c["files"][0]).parent.name: c["class_name"] for c in read_manifest(tmp_path / "site", "d")["cases"]}
    assert classes == {"by_folder": "normal", "by_uid": "pneumonia"} and summary.skipped == {"missing_label": 2}


def test_the_catalogue_shows_classes_with_small_counts_hidden(tmp_path: Path, source: Path) -> None:
    rows = {stem: label for stem, (_, label) in CASES.items()}
    register_dataset(tmp_path / "site", "xr", source, labels=_csv(tmp_path / "c.csv", rows), modality="MR")
    entry = public_catalogue(tmp_path / "site", min_count=2)["datasets"]["xr"]
    assert entry["task"] == "classification" and entry["labelled"]
    assert entry["label_classes"] == ["1", "Pneumonia", "normal"]
    assert entry["cases_per_class"] == {"1": "<2", "Pneumonia": "<2", "normal": 2}
    assert "case_" not in str(entry)


def test_flip_site_data_add_registers_and_prints_the_summary(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = {stem: label for stem, (_, label) in CASES.items() if stem != "case_d"}
    (source / "notes.txt").write_text("exported on Monday\n")
    code = main(
        [
            "data",
            "add",
            "xr",
            str(source),
            "--site",
            str(tmp_path / "site"),
            "--labels",
            str(_csv(tmp_path / "c.csv", rows)),
            "--modality",
            "MR",
            "--test-fraction",
            "0.34",
            "--seed",
            "3",
        ]
    )

    out = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "site", "xr")
    assert code == 0 and (manifest["seed"], manifest["test_fraction"]) == (3, 0.34)
    assert "dataset xr: 3 cases (2 train, 1 test), MR, classification" in out
    assert "label classes (cases): 1 (1), Pneumonia (1), normal (1)" in out
    assert "skipped: 1 file, image without a label (label map, SEG or CSV row) (missing_label)" in out
    assert "skipped: 1 file, unreadable (neither DICOM nor NIfTI) (unreadable)" in out


def test_flip_site_data_add_reports_a_bad_labels_path(
    tmp_path: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["data", "add", "xr", str(source), "--site", str(tmp_path / "site"), "--labels", str(tmp_path / "missing.csv")]
    )
    assert code == 2 and "labels folder or CSV" in capsys.readouterr().err
