"""Site harmonisation steps: what a data owner configures for their own scanners, applied before the contract.

>>> steps = build_steps([{"kind": "ct_window", "center": 40, "width": 400}, {"kind": "bias_field_correction"}])

A researcher never sees these: they come from the site's settings and run on raw volumes (in modality units)
before the plan's contract maps the data onto its grid and intensity scale. Each step is a small subclass of
:class:`SiteStep` registered under its ``kind``; :func:`register_step` adds new ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from .errors import HarmonisationError
from .volume import Volume

_REGISTRY: dict[str, type[SiteStep]] = {}


class SiteStep(ABC):
    """One site step. Subclasses declare ``kind`` and ``params`` (name -> default, ``None`` = required)."""

    kind: ClassVar[str]
    params: ClassVar[dict[str, float | None]] = {}

    def __init__(self, spec: Mapping[str, Any]) -> None:
        unknown = sorted(set(spec) - set(self.params) - {"kind"})
        if unknown:
            raise HarmonisationError(
                f"site step {self.kind!r} takes {sorted(self.params) or 'no parameters'}, not {unknown}"
            )
        values: dict[str, float] = {}
        for name, default in self.params.items():
            value = spec.get(name, default)
            if value is None:
                raise HarmonisationError(f"site step {self.kind!r} needs {name!r}; add it to the site settings")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise HarmonisationError(f"site step {self.kind!r}: {name} must be a number, got {value!r}")
            values[name] = float(value)
        self.values = values
        self.check()

    def check(self) -> None:  # noqa: B027 - a hook: most steps accept any values
        """Refuse parameter values that make no sense (override where needed)."""

    def spec(self) -> dict[str, Any]:
        """The normalised settings, part of the cache key."""
        return {"kind": self.kind, **self.values}

    @abstractmethod
    def __call__(self, volume: Volume) -> np.ndarray:
        """Return the new voxel values of ``volume`` (same shape, modality units)."""


def register_step(cls: type[SiteStep]) -> type[SiteStep]:
    """Class decorator: make a step available to site settings under ``cls.kind``."""
    _REGISTRY[cls.kind] = cls
    return cls


def build_steps(specs: Sequence[Mapping[str, Any]] | None) -> list[SiteStep]:
    """Turn the site's settings into steps, or raise :class:`HarmonisationError` naming what is wrong."""
    steps = []
    for spec in specs or []:
        if not isinstance(spec, Mapping) or spec.get("kind") not in _REGISTRY:
            kind = spec.get("kind") if isinstance(spec, Mapping) else spec
            raise HarmonisationError(f"unknown site step {kind!r}; known kinds are {sorted(_REGISTRY)}")
        steps.append(_REGISTRY[spec["kind"]](spec))
    return steps


@register_step
class CTWindow(SiteStep):
    """Clip to the site's reading window (HU): air, metal and bone stop dominating the intensity scaling."""

    kind = "ct_window"
    params: ClassVar[dict[str, float | None]] = {"center": None, "width": None}

    def check(self) -> None:
        if self.values["width"] <= 0:
            raise HarmonisationError("site step 'ct_window': width must be positive")

    def __call__(self, volume: Volume) -> np.ndarray:
        half = self.values["width"] / 2
        return np.clip(volume.array, self.values["center"] - half, self.values["center"] + half)


@register_step
class IntensityScale(SiteStep):
    """``value * scale + offset``: correct a known calibration offset or a vendor's scaling."""

    kind = "intensity_scale"
    params: ClassVar[dict[str, float | None]] = {"scale": 1.0, "offset": 0.0}

    def __call__(self, volume: Volume) -> np.ndarray:
        return volume.array * self.values["scale"] + self.values["offset"]


@register_step
class Denoise(SiteStep):
    """In-plane Gaussian smoothing of ``sigma_mm`` for a site whose scanner is noisier than the rest."""

    kind = "denoise"
    params: ClassVar[dict[str, float | None]] = {"sigma_mm": 1.0}

    def check(self) -> None:
        if not 0 < self.values["sigma_mm"] <= 20:
            raise HarmonisationError("site step 'denoise': sigma_mm must lie in (0, 20]")

    def __call__(self, volume: Volume) -> np.ndarray:
        import torch  # here, not above: registering or listing data never pays for torch and MONAI
        from monai.transforms import GaussianSmooth

        sigma = [self.values["sigma_mm"] / s for s in volume.spacing[:2]]
        slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume.array, -1, 0), dtype=np.float32))
        return np.moveaxis(np.asarray(GaussianSmooth(sigma=sigma)(slices)), 0, -1)


@register_step
class BiasFieldCorrection(SiteStep):
    """Remove a smooth multiplicative field (MR receive-coil shading).

    No N4 implementation ships with the project's dependencies (SimpleITK/ANTs are heavy), so this is the
    segmentation-based method of Wells et al. (1996) in its simplest form: alternate between grouping foreground
    voxels into ``classes`` tissue classes by log intensity and fitting a smooth polynomial of ``degree`` to what the
    classes do not explain. A field fitted to raw log intensities would absorb anatomy.
    """

    kind = "bias_field_correction"
    params: ClassVar[dict[str, float | None]] = {"degree": 2.0, "classes": 4.0, "iterations": 4.0}

    def check(self) -> None:
        if not (1 <= self.values["degree"] <= 4 and 2 <= self.values["classes"] <= 8):
            raise HarmonisationError("site step 'bias_field_correction': degree in 1..4, classes in 2..8")

    def __call__(self, volume: Volume) -> np.ndarray:
        array = volume.array.astype(np.float32)
        positive = array[array > 0]
        if positive.size < 100:
            return array
        foreground = array > 0.1 * np.percentile(positive, 99)
        log = np.log(np.maximum(array, 1e-6))
        basis = _polynomial_basis(array.shape, int(self.values["degree"]))
        # A few thousand voxels pin down a low-order polynomial; fitting all of them only costs time.
        chosen = np.flatnonzero(foreground.ravel())
        if chosen.size > 8_000:  # a fixed random subset: a stride could alias with the slice axis
            chosen = np.sort(np.random.default_rng(0).choice(chosen, 8_000, replace=False))
        rows = basis[chosen]
        # The same small least-squares problem every iteration: factor its normal equations once. einsum keeps
        # this single-threaded; multi-threaded BLAS on a busy site machine made it ten times slower.
        gram = np.einsum("ij,ik->jk", rows, rows)
        y = log.ravel()[chosen]
        field = np.zeros_like(y)
        k = int(self.values["classes"])
        for _ in range(int(self.values["iterations"])):
            corrected = y - field
            centres = np.percentile(corrected, np.linspace(10, 90, k))
            for _ in range(5):  # a few rounds of one-dimensional k-means on the corrected log intensities
                nearest = np.argmin(np.abs(corrected[:, None] - centres[None]), axis=1)
                centres = np.array(
                    [corrected[nearest == c].mean() if np.any(nearest == c) else centres[c] for c in range(k)]
                )
            residual = y - centres[nearest]
            coef = np.linalg.lstsq(gram, np.einsum("ij,i->j", rows, residual), rcond=None)[0]
            field = np.einsum("ij,j->i", rows, coef)
        full = np.einsum("ij,j->i", basis, coef).reshape(array.shape)
        full -= full[foreground].mean()
        return array * np.exp(-full).astype(np.float32)


def _polynomial_basis(shape: tuple[int, ...], degree: int) -> np.ndarray:
    """Products of Legendre polynomials of total degree <= ``degree`` (as MONAI's bias fields), one row per voxel.

    Axes with a single voxel get no terms of their own.
    """
    axes = [np.linspace(-1, 1, n) if n > 1 else np.zeros(1) for n in shape]
    grids = [g.ravel() for g in np.meshgrid(*axes, indexing="ij")]
    columns = []
    for i in range(degree + 1):
        for j in range(degree + 1 - i):
            for k in range(degree + 1 - i - j if shape[2] > 1 else 1):
                terms = [np.polynomial.legendre.legval(g, [0] * d + [1]) for g, d in zip(grids, (i, j, k), strict=True)]
                columns.append(terms[0] * terms[1] * terms[2])
    return np.stack(columns, axis=1).astype(np.float32)
