"""Simulated scanners: how each demo hospital turns a phantom patient into stored pixel values.

A :class:`ScannerProfile` fixes what differs between hospitals: modality, file format, vendor, grid (matrix,
spacing, stored orientation), resolution (point spread), noise, the intensity transfer (CT calibration offset,
contrast enhancement, rescale slope/intercept; MR gain, gamma and bias field), lesion sizes and prevalence and
how many patients the hospital has. Scanner effects use MONAI's transforms (``GaussianSmooth`` for the
reconstruction kernel, ``RandGaussianNoise`` for CT quantum noise, ``RandBiasField`` and ``RandRicianNoise`` for
MR), each seeded per patient so that a hospital is reproducible from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from monai.transforms import GaussianSmooth, RandBiasField, RandGaussianNoise, RandRicianNoise

from . import phantom

_DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0), "S": (0, 0, 1), "I": (0, 0, -1)}
_ENHANCING = [phantom.LIVER, phantom.SPLEEN, phantom.AORTA, phantom.VESSEL, phantom.RIM]


@dataclass(frozen=True)
class ScannerProfile:
    """One hospital's scanner and patient population. Spacing is (column, row, slice) mm of the stored axes."""

    name: str
    modality: Literal["CT", "MR"]
    file_format: Literal["dicom", "nifti"]
    vendor: str
    num_cases: int
    matrix: tuple[int, int]
    spacing: tuple[float, float, float]
    slices: int
    axcodes: str
    psf_mm: float
    noise: float  # CT: HU standard deviation; MR: fraction of the gain
    lesion_radius: tuple[float, float]
    prevalence: float
    hu_offset: float = 0.0
    enhancement: float = 1.0
    rescale: tuple[float, float] = (1.0, -1024.0)  # CT (slope, intercept) written to the files
    gain: float = 1000.0
    gamma: float = 1.0
    bias: tuple[float, float] = (0.0, 0.0)
    reverse_files: bool = False
    site_steps: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def grid_affine(profile: ScannerProfile, shift_mm: np.ndarray) -> np.ndarray:
    """RAS+ affine of the profile's stored grid, centred on the world origin plus the patient's ``shift_mm``."""
    directions = np.array([_DIRECTIONS[c] for c in profile.axcodes], dtype=np.float64).T
    linear = directions * np.asarray(profile.spacing)
    shape = np.array([*profile.matrix, profile.slices], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = -linear @ ((shape - 1) / 2) + shift_mm
    return affine


def acquire(profile: ScannerProfile, anatomy: phantom.Anatomy, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan one patient: returns stored values [X, Y, Z] (uint16 or int16), the lesion label (uint8), the affine.

    Stored values are what the file holds: CT as ``(HU - intercept) / slope``, MR in scanner units.
    """
    rng = np.random.default_rng(seed)
    shift = np.array([rng.uniform(-5, 5), rng.uniform(-5, 5), 0.0])  # the patient lies a little off centre
    affine = grid_affine(profile, shift)
    shape = (*profile.matrix, profile.slices)
    tissue, label = phantom.render(anatomy, affine, shape)
    ct = profile.modality == "CT"
    table = phantom.CT_HU.copy() if ct else phantom.MR_SIGNAL.copy()
    if ct:  # contrast timing differs between hospitals: enhancing tissues gain more or less over soft tissue
        table[_ENHANCING] = 40 + (table[_ENHANCING] - 40) * profile.enhancement
    unit = abs(table[phantom.LIVER] - table[phantom.MUSCLE])
    texture = _mottle(rng, shape, profile.spacing, sigma_mm=3.0)
    signal = table[tissue] + phantom.TEXTURE[tissue] * unit * texture
    image = torch.from_numpy(_smooth_in_plane(signal, profile.psf_mm, profile.spacing)[None])
    stored = _scan_ct(profile, image, seed) if ct else _scan_mr(profile, image, seed)
    return stored, label, affine


def _scan_ct(profile: ScannerProfile, image: torch.Tensor, seed: int) -> np.ndarray:
    noise = RandGaussianNoise(prob=1.0, std=profile.noise, sample_std=False)
    noise.set_random_state(seed=seed % (2**32))
    hu = np.asarray(noise(image))[0] + profile.hu_offset
    slope, intercept = profile.rescale
    stored = np.round((hu - intercept) / slope)
    if intercept < 0:  # unsigned storage, as scanners that write an intercept of -1024 do
        return np.clip(stored, 0, 65535).astype(np.uint16)
    return np.clip(stored, -32768, 32767).astype(np.int16)


def _scan_mr(profile: ScannerProfile, image: torch.Tensor, seed: int) -> np.ndarray:
    bias = RandBiasField(degree=3, coeff_range=profile.bias, prob=1.0)
    bias.set_random_state(seed=seed % (2**32))
    noise = RandRicianNoise(prob=1.0, std=profile.noise * profile.gain, sample_std=False)
    noise.set_random_state(seed=(seed + 1) % (2**32))
    signal = np.clip(np.asarray(bias(image.numpy())), 0.0, None)
    # Sequence timing and receive chain make the tissue-to-signal mapping nonlinear and differently scaled.
    signal = profile.gain * signal**profile.gamma
    stored = np.round(np.asarray(noise(torch.from_numpy(signal.astype(np.float32))))[0])
    return np.clip(stored, 0, 32767).astype(np.int16 if profile.file_format == "nifti" else np.uint16)


def _mottle(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: tuple[float, ...], sigma_mm: float
) -> np.ndarray:
    """Zero-mean, unit-variance texture with grains of about ``sigma_mm`` (tissue heterogeneity)."""
    smooth = _smooth_in_plane(rng.standard_normal(shape).astype(np.float32), sigma_mm, spacing)
    return (smooth - smooth.mean()) / (smooth.std() + 1e-6)


def _smooth_in_plane(volume: np.ndarray, sigma_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Gaussian blur within each slice (slices are thick and reconstructed one by one), ``sigma_mm`` wide."""
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0), dtype=np.float32))
    smooth = GaussianSmooth(sigma=[sigma_mm / s for s in spacing[:2]])(slices)
    return np.ascontiguousarray(np.moveaxis(np.asarray(smooth), 0, -1))


#: The default federation: two CT and two MR hospitals that differ in everything a real federation does.
PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        "st-aldhelm",
        "CT",
        "dicom",
        "SIEMENS",
        110,
        (72, 72),
        (2.8, 2.8, 5.0),
        4,
        "LPS",
        psf_mm=1.0,
        noise=10.0,
        lesion_radius=(10.0, 20.0),
        prevalence=0.7,
        site_steps=({"kind": "ct_window", "center": 50, "width": 400},),
    ),
    ScannerProfile(
        "northgate",
        "MR",
        "nifti",
        "Philips",
        60,
        (58, 58),
        (3.4, 3.4, 6.0),
        3,
        "RAS",
        psf_mm=2.0,
        noise=0.03,
        lesion_radius=(12.0, 24.0),
        prevalence=0.55,
        gain=1800.0,
        gamma=0.85,
        bias=(0.05, 0.12),
        site_steps=({"kind": "bias_field_correction"},),
    ),
    ScannerProfile(
        "riverside",
        "CT",
        "nifti",
        "GE MEDICAL SYSTEMS",
        80,
        (64, 64),
        (3.1, 3.1, 4.0),
        5,
        "LAS",
        psf_mm=1.6,
        noise=12.0,
        lesion_radius=(10.0, 18.0),
        prevalence=0.8,
        hu_offset=-25.0,
        enhancement=0.9,
        rescale=(1.0, 0.0),
        site_steps=({"kind": "intensity_scale", "offset": 25.0}, {"kind": "ct_window", "center": 40, "width": 350}),
    ),
    ScannerProfile(
        "westmoor",
        "MR",
        "dicom",
        "CANON_MEC",
        35,
        (64, 64),
        (3.0, 3.0, 5.0),
        4,
        "PLI",
        psf_mm=1.5,
        noise=0.05,
        lesion_radius=(11.0, 22.0),
        prevalence=0.45,
        gain=600.0,
        gamma=1.2,
        bias=(0.1, 0.2),
        reverse_files=True,
        site_steps=({"kind": "bias_field_correction"},),
    ),
)


#: The 3D demo federation: the same four hospitals scanning whole abdominal volumes of 48-80 voxels a side
#: instead of a slab of a few slices, each on its own grid (matrix, anisotropic spacing, stored orientation) and
#: with its own number of patients. Lesions lie anywhere in the liver within ``VOLUME_SLAB_HALF_MM`` of its middle.
VOLUME_SLAB_HALF_MM = 35.0
_VOLUME_GRIDS = {  # name: (matrix, spacing, slices, patients)
    "st-aldhelm": ((80, 80), (2.5, 2.5, 4.0), 28, 24),
    "northgate": ((64, 64), (3.2, 3.2, 5.0), 22, 16),
    "riverside": ((72, 72), (2.8, 2.8, 3.0), 36, 20),
    "westmoor": ((56, 56), (3.6, 3.6, 6.0), 18, 12),
}
VOLUME_PROFILES: tuple[ScannerProfile, ...] = tuple(
    replace(
        p,
        matrix=_VOLUME_GRIDS[p.name][0],
        spacing=_VOLUME_GRIDS[p.name][1],
        slices=_VOLUME_GRIDS[p.name][2],
        num_cases=_VOLUME_GRIDS[p.name][3],
    )
    for p in PROFILES
)
