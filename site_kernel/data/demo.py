"""Simulated hospitals for teaching, tests and benchmarks: real DICOM and NIfTI files of phantom patients.

>>> sites = generate_demo_hospitals(tmp / "federation", n_sites=4, seed=0, register=True)
>>> [(s.name, s.modality, s.file_format) for s in sites]
[('st-aldhelm', 'CT', 'dicom'), ('northgate', 'MR', 'nifti'), ('riverside', 'CT', 'nifti'), ('westmoor', 'MR', 'dicom')]

Each hospital gets ``root/<name>/`` laid out as a site folder: ``raw/images`` holds what its PACS exported (a
folder of DICOM slices per series, or ``case.nii.gz`` with a BIDS-style ``case.json`` sidecar), and label maps sit
in ``raw/labels/<series>_seg.nii.gz`` (DICOM sites) or beside the images as ``case_seg.nii.gz`` (NIfTI sites).
With ``register=True`` each hospital's files are also registered as dataset ``"default"`` of the site folder
``root/<name>`` (see :func:`register_demo_site` for other layouts). Everything derives from ``seed``: the same call
writes byte-identical files, offline, in a few seconds.

Patient names are canaries (``CANARY^<hex>``), in DICOM ``PatientName`` and NIfTI ``descrip``, so tests can prove
that nothing identifying leaves a site.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import phantom
from .dicom import write_series
from .ingest import DatasetSummary, register_dataset
from .nifti import write_nifti
from .scanners import PROFILES, VOLUME_PROFILES, VOLUME_SLAB_HALF_MM, ScannerProfile, acquire

_MARKER = ".flip-demo"


@dataclass(frozen=True)
class DemoSite:
    """One simulated hospital. ``site_steps`` is the harmonisation its data owner would configure."""

    name: str
    modality: str
    file_format: str
    vendor: str
    site_dir: Path
    images_dir: Path
    labels_dir: Path | None
    num_cases: int
    site_steps: list[dict[str, Any]]
    dataset: str | None = None


def demo_profiles(n_sites: int, *, scale: float = 1.0, volumes: bool = False) -> list[ScannerProfile]:
    """The profiles of the first ``n_sites`` hospitals, cycling through the four kinds with numbered names
    (``volumes``: the 3D demo's whole-abdomen grids, :data:`~site_kernel.data.scanners.VOLUME_PROFILES`)."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    profiles = []
    for i in range(n_sites):
        kinds = VOLUME_PROFILES if volumes else PROFILES
        base = kinds[i % len(kinds)]
        name = base.name if i < len(PROFILES) else f"{base.name}-{i // len(PROFILES) + 1}"
        profiles.append(dataclasses.replace(base, name=name, num_cases=max(4, round(base.num_cases * scale))))
    return profiles


def generate_demo_hospitals(
    root: Path,
    *,
    n_sites: int = 4,
    seed: int = 0,
    scale: float = 1.0,
    register: bool = False,
    dataset: str = "default",
    volumes: bool = False,
) -> list[DemoSite]:
    """Write ``n_sites`` simulated hospitals under ``root`` and return what each holds.

    ``scale`` multiplies every hospital's number of patients (at least 4 each). With ``register=True`` each
    hospital's files become dataset ``dataset`` of site folder ``root/<name>``, split with ``seed``.
    ``volumes=True`` writes the 3D demo: whole abdominal volumes (48-80 voxels a side, 18-36 slices, lesions
    anywhere in the liver) for ``dims=3`` studies; the default is the 2D demo's thin slabs of 3-5 slices.
    """
    root = Path(root)
    sites = []
    slab = VOLUME_SLAB_HALF_MM if volumes else phantom.SLAB_HALF_MM
    for index, profile in enumerate(demo_profiles(n_sites, scale=scale, volumes=volumes)):
        with _one_torch_thread():
            site = _write_site(root / profile.name, profile, seed=seed, index=index, slab_half_mm=slab)
        if register:
            register_demo_site(site, name=dataset, seed=seed)
            site = dataclasses.replace(site, dataset=dataset)
        sites.append(site)
    return sites


def register_demo_site(
    site: DemoSite, site_dir: Path | None = None, *, name: str = "default", seed: int = 0
) -> DatasetSummary:
    """Register a demo hospital's files as dataset ``name`` of ``site_dir`` (default: the hospital's folder)."""
    return register_dataset(
        site_dir or site.site_dir, name, site.images_dir, labels=site.labels_dir, seed=seed, modality=site.modality
    )


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The scanner effects are many tiny convolutions; on a shared machine extra threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _write_site(
    site_dir: Path, profile: ScannerProfile, *, seed: int, index: int, slab_half_mm: float = phantom.SLAB_HALF_MM
) -> DemoSite:
    raw = site_dir / "raw"
    if raw.exists():
        # Regenerating over an earlier demo must not leave its extra slices behind; anything else is not ours.
        if not (raw / _MARKER).is_file():
            raise FileExistsError(f"{raw} exists and was not written by the demo generator; choose an empty root")
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    (raw / _MARKER).write_text("written by site_kernel.data.generate_demo_hospitals\n")
    images = site_dir / "raw" / "images"
    labels = site_dir / "raw" / "labels" if profile.file_format == "dicom" else None
    for case in range(profile.num_cases):
        rng = np.random.default_rng([seed, index, case])
        anatomy = phantom.sample_anatomy(
            rng, lesion_radius=profile.lesion_radius, prevalence=profile.prevalence, slab_half_mm=slab_half_mm
        )
        scan_seed = int(np.random.SeedSequence([seed, index, case, 1]).generate_state(1)[0])
        stored, label, affine = acquire(profile, anatomy, scan_seed)
        token = rng.bytes(4).hex().upper()
        if profile.file_format == "dicom":
            accession = f"ACC{int(rng.integers(10**6, 10**7))}"
            write_series(
                images / accession,
                stored,
                affine,
                modality=profile.modality,
                tags=_dicom_tags(profile, token, case),
                slope=profile.rescale[0] if profile.modality == "CT" else 1.0,
                intercept=profile.rescale[1] if profile.modality == "CT" else 0.0,
                uid_seed=f"{seed}-{index}-{case}",
                reverse_file_order=profile.reverse_files,
            )
            assert labels is not None
            write_nifti(labels / f"{accession}_seg.nii.gz", label, affine)
        else:
            stem = f"case{case + 1:04d}"
            values = stored.astype(np.float64)
            if profile.modality == "CT":  # NIfTI exports hold HU directly
                values = values * profile.rescale[0] + profile.rescale[1]
            sidecar = {"Modality": profile.modality, "Manufacturer": profile.vendor}
            write_nifti(
                images / f"{stem}.nii.gz", values.astype(np.int16), affine, sidecar=sidecar, descrip=f"CANARY^{token}"
            )
            write_nifti(images / f"{stem}_seg.nii.gz", label, affine)
    return DemoSite(
        name=profile.name,
        modality=profile.modality,
        file_format=profile.file_format,
        vendor=profile.vendor,
        site_dir=site_dir,
        images_dir=images,
        labels_dir=labels,
        num_cases=profile.num_cases,
        site_steps=[dict(step) for step in profile.site_steps],
    )


def _dicom_tags(profile: ScannerProfile, token: str, case: int) -> dict[str, Any]:
    tags: dict[str, Any] = {
        "PatientName": f"CANARY^{token}",
        "PatientID": f"P{token}",
        "PatientSex": "O",
        "StudyDate": f"2024{1 + case % 12:02d}{1 + case % 28:02d}",
        "StudyDescription": f"{profile.modality} ABDOMEN",
        "BodyPartExamined": "ABDOMEN",
        "Manufacturer": profile.vendor,
        "InstitutionName": profile.name.upper(),
    }
    if profile.modality == "CT":
        tags.update(KVP=120, ConvolutionKernel="B30f" if profile.psf_mm < 1.5 else "STANDARD")
    else:
        tags.update(MagneticFieldStrength=1.5, ScanningSequence="GR", SequenceVariant="SP")
    return tags
