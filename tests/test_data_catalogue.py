"""The public catalogue: small counts suppressed, nothing identifying, skipped files counted by reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from site_kernel.data import generate_demo_hospitals, public_catalogue, register_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo hospital (canary patient names) with a second, tiny dataset and a few unreadable files."""
    root = tmp_path_factory.mktemp("catalogue")
    (demo,) = generate_demo_hospitals(root, n_sites=1, seed=3, scale=0.1, register=True)
    tiny = root / "tiny"
    tiny.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), tiny / name)
    for n in range(3):
        (tiny / f"README{n}.txt").write_text("scanner export notes\n")
    register_dataset(demo.site_dir, "tiny", tiny)
    return demo.site_dir


def test_small_counts_are_shown_as_below_k(site: Path) -> None:
    tiny = public_catalogue(site, min_count=5)["datasets"]["tiny"]
    assert tiny["cases"] == "<5" and tiny["slices"] == "<5"
    assert tiny["shape_range"] == "hidden (<5 cases)" and tiny["spacing_range_mm"] == "hidden (<5 cases)"
    assert tiny["vendors"] == []  # two vendors with one case each would name the scanners of two patients


def test_counts_at_or_above_k_are_shown(site: Path) -> None:
    default = public_catalogue(site, min_count=5)["datasets"]["default"]
    assert default["cases"] == 11 and default["modality"] == ["CT"]
    assert default["vendors"] == ["SIEMENS"]
    assert default["label_classes"] == [0, 1]
    assert default["shape_range"]["min"] == [72, 72, 4]
    assert default["spacing_range_mm"]["max"] == pytest.approx([2.8, 2.8, 5.0])


@pytest.mark.parametrize(("min_count", "expected"), [(1, 2), (2, 2), (3, "<3"), (10, "<10")])
def test_the_threshold_is_the_site_s_choice(site: Path, min_count: int, expected: int | str) -> None:
    assert public_catalogue(site, min_count=min_count)["datasets"]["tiny"]["cases"] == expected


def test_skipped_files_are_counted_by_reason(site: Path) -> None:
    tiny = public_catalogue(site)["datasets"]["tiny"]
    assert tiny["skipped_files"] == {"unreadable": 3}
    assert tiny["skipped"] == ["3 files skipped: unreadable (neither DICOM nor NIfTI)"]


def test_nothing_identifying_reaches_the_catalogue(site: Path) -> None:
    text = json.dumps(public_catalogue(site, min_count=1))
    dicom_files = sorted((site / "raw" / "images").rglob("*.dcm"))
    first = pydicom.dcmread(dicom_files[0])
    secrets = [
        str(first.PatientName),
        str(first.PatientID),
        str(first.StudyInstanceUID),
        str(first.StudyDate),
        first.SeriesInstanceUID,
        dicom_files[0].parent.name,
        str(site),
        ".dcm",
        ".nii",
        "CANARY",
        "case-",
    ]
    for secret in secrets:
        assert secret not in text, secret
    assert str(first.PatientName).startswith("CANARY^")  # the canary really is in the files


def test_a_site_without_datasets_has_an_empty_catalogue(tmp_path: Path) -> None:
    assert public_catalogue(tmp_path) == {"min_count": 5, "datasets": {}}
