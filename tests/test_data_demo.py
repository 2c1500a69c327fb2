"""The simulated hospitals: reproducible, realistic files, heterogeneous sites, a task no threshold solves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from site_kernel.data import generate_demo_hospitals, prepare
from site_kernel.data.demo import demo_profiles
from site_kernel.data.manifest import read_manifest

torch.set_num_threads(1)

CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [64, 64],
    "spacing": [3.0, 3.0],
    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
    "labels": {"background": 0, "lesion": 1},
}


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list:
    return generate_demo_hospitals(tmp_path_factory.mktemp("demo"), n_sites=4, seed=0, scale=0.15, register=True)


def test_the_same_seed_writes_identical_files(tmp_path: Path) -> None:
    generate_demo_hospitals(tmp_path / "a", n_sites=2, seed=7, scale=0.05)
    generate_demo_hospitals(tmp_path / "b", n_sites=2, seed=7, scale=0.05)
    generate_demo_hospitals(tmp_path / "c", n_sites=2, seed=8, scale=0.05)
    a, b, c = (_tree(tmp_path / x) for x in "abc")
    assert a == b and len(a) > 20
    assert a != c


def test_sites_differ_in_modality_format_vendor_size_and_orientation(federation: list) -> None:
    assert [(s.name, s.modality, s.file_format) for s in federation] == [
        ("st-aldhelm", "CT", "dicom"),
        ("northgate", "MR", "nifti"),
        ("riverside", "CT", "nifti"),
        ("westmoor", "MR", "dicom"),
    ]
    manifests = [read_manifest(s.site_dir, "default") for s in federation]
    assert len({s.vendor for s in federation}) == 4
    assert len({len(m["cases"]) for m in manifests}) == 4  # unequal hospital sizes
    assert len({m["cases"][0]["axcodes"] for m in manifests}) == 4  # each stores its own orientation
    assert len({tuple(m["cases"][0]["spacing"]) for m in manifests}) == 4
    assert all(m["quarantine"] == [] and m["labelled"] for m in manifests)


def test_dicom_sites_write_the_tags_a_scanner_would(federation: list) -> None:
    site = federation[0]
    ds = pydicom.dcmread(next(site.images_dir.rglob("*.dcm")))
    assert ds.Modality == "CT" and ds.Manufacturer == "SIEMENS"
    assert str(ds.PatientName).startswith("CANARY^")
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    for tag in ("PixelSpacing", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient"):
        assert tag in ds
    mr = pydicom.dcmread(next(federation[3].images_dir.rglob("*.dcm")))
    assert [round(float(v)) for v in mr.ImageOrientationPatient] == [0, 1, 0, 1, 0, 0]  # stored transposed


def test_nifti_sites_have_sidecars_and_labels_beside_the_images(federation: list) -> None:
    site = federation[1]
    image = next(p for p in sorted(site.images_dir.glob("*.nii.gz")) if "_seg" not in p.name)
    assert json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text()) == {
        "Manufacturer": "Philips",
        "Modality": "MR",
    }
    assert image.with_name(image.name.replace(".nii.gz", "_seg.nii.gz")).is_file()
    assert nib.load(image).header["descrip"].item().startswith(b"CANARY^")


def test_harmonised_sites_share_one_grid(federation: list) -> None:
    shapes = {prepare(s.site_dir, CONTRACT, site_steps=s.site_steps).train_x.shape[1:] for s in federation}
    assert shapes == {(1, 64, 64)}


def test_lesions_are_not_separable_by_an_intensity_threshold(federation: list) -> None:
    """The best intensity interval, chosen with the answers in hand, still finds lesions poorly."""
    x, y = [], []
    for site in federation:
        data = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps)
        x.append(data.train_x[:, 0].ravel())
        y.append(data.train_y.ravel() == 1)
    values, lesion = np.concatenate(x), np.concatenate(y)
    edges = np.quantile(values[lesion], np.linspace(0, 1, 21))
    best = 0.0
    for i, low in enumerate(edges):
        for high in edges[i + 1 :]:
            hit = (values >= low) & (values <= high)
            best = max(best, 2 * np.sum(hit & lesion) / (hit.sum() + lesion.sum()))
    assert lesion.mean() > 0.005
    assert best < 0.25


def test_more_sites_cycle_the_profiles_with_new_names() -> None:
    names = [p.name for p in demo_profiles(6, scale=0.5)]
    assert names == ["st-aldhelm", "northgate", "riverside", "westmoor", "st-aldhelm-2", "northgate-2"]
    assert [p.num_cases for p in demo_profiles(2, scale=0.5)] == [55, 30]


@pytest.mark.parametrize(("kwargs", "message"), [({"n_sites": 0}, "n_sites"), ({"scale": 0.0}, "scale")])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate_demo_hospitals(tmp_path, **kwargs)
