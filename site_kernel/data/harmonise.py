"""Map one case onto a data contract: site steps, orientation, spacing, intensity, size, then axial slices
(``dims=2``, :func:`harmonise_case`) or the whole volume (``dims=3``, :func:`harmonise_volume`).

The pipeline is MONAI's: ``Orientationd`` and ``Spacingd`` use the volume's affine (so a series stored flipped,
transposed or in reverse order lands on the same grid), ``ScaleIntensityRangePercentiles`` /
``NormalizeIntensity`` / ``ScaleIntensityRange`` implement the contract's intensity kinds, and
``ResizeWithPadOrCropd`` centres the field of view. Slices are taken along the third axis of the contract's
orientation (axial for ``RAS``).

``mode`` exists for the heterogeneity benchmark: ``"geometric"`` does orientation, spacing and size only, and
``"none"`` just resizes the stored array to the contract's size (nearest neighbour); both scale raw intensities
by the fixed :data:`RAW_SCALE` instead of normalising them, and skip the site steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    NormalizeIntensity,
    Orientationd,
    Resized,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    Spacingd,
)

from .steps import SiteStep
from .volume import Volume

if TYPE_CHECKING:
    from .prepare import Mode

#: Raw intensities are multiplied by this when a benchmark turns intensity harmonisation off (HU / 1000).
RAW_SCALE = 1e-3
#: Axis-code letters of nibabel's RAS+ world, the space every reader's affine is in.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def harmonise_case(
    volume: Volume,
    label: np.ndarray | None,
    contract: dict[str, Any],
    *,
    steps: Sequence[SiteStep] = (),
    mode: Mode = "full",
) -> tuple[np.ndarray, np.ndarray]:
    """Return slices ``[Z, 1, H, W]`` float32 and label maps ``[Z, H, W]`` int64 (zeros when unlabelled).

    ``contract`` must already be validated (:func:`flip_common.contract.validate_contract`).
    """
    image, label_out = _harmonised(volume, label, contract, steps, mode)
    slices = np.moveaxis(np.asarray(image, dtype=np.float32)[0], -1, 0)[:, None]
    maps = np.moveaxis(_named_classes(label_out, contract).astype(np.int64), -1, 0)
    return np.ascontiguousarray(slices), np.ascontiguousarray(maps)


def harmonise_volume(
    volume: Volume,
    label: np.ndarray | None,
    contract: dict[str, Any],
    *,
    steps: Sequence[SiteStep] = (),
    mode: Mode = "full",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return a ``dims=3`` case: image float32 ``[1, X, Y, Z]``, label uint8 ``[1, X, Y, Z]`` (zeros when
    unlabelled) and the 4x4 affine (voxel -> RAS+ mm) of the harmonised grid.

    The same transforms as the slices, with the contract's spacing on all three axes; with a ``size`` the volume
    is centred and cropped or padded to it, without one it keeps its extent after resampling.
    """
    image, label_out = _harmonised(volume, label, contract, steps, mode)
    affine = np.asarray(image.affine, dtype=np.float64)
    labels = _named_classes(label_out, contract).astype(np.uint8)
    return np.ascontiguousarray(np.asarray(image, dtype=np.float32)), np.ascontiguousarray(labels), affine


def _harmonised(
    volume: Volume, label: np.ndarray | None, contract: dict[str, Any], steps: Sequence[SiteStep], mode: Mode
) -> tuple[MetaTensor, MetaTensor]:
    """Site steps, orientation, spacing, intensity and size: the image and the label as MetaTensors [1, X, Y, Z]."""
    array = volume.array
    if mode == "full":
        for step in steps:
            array = step(Volume(array, volume.affine, volume.modality, volume.vendor))
    affine = torch.as_tensor(volume.affine, dtype=torch.float64)
    labels = np.zeros(array.shape, np.float32) if label is None else label.astype(np.float32)
    data = {
        "image": MetaTensor(torch.from_numpy(np.ascontiguousarray(array, np.float32))[None], affine=affine),
        "label": MetaTensor(torch.from_numpy(np.ascontiguousarray(labels))[None], affine=affine),
    }
    volumetric = contract["dims"] == 3
    if volumetric:
        size = tuple(contract["size"]) if contract["size"] is not None else None
    else:
        size = (*contract["size"], -1)
    keys = ["image", "label"]
    if mode == "none":
        data = Resized(keys, spatial_size=size or (-1, -1, -1), mode="nearest")(data)
        image = data["image"] * RAW_SCALE
    else:
        data = Orientationd(keys, axcodes=contract["orientation"], labels=_RAS_LABELS)(data)
        # dims=2 keeps slice thickness: slices are used one by one
        spacing = tuple(contract["spacing"]) if volumetric else (*contract["spacing"], -1.0)
        data = Spacingd(keys, pixdim=spacing, mode=("bilinear", "nearest"), padding_mode=("border", "zeros"))(data)
        image = _intensity(data["image"], contract["intensity"]) if mode == "full" else data["image"] * RAW_SCALE
    if size is None:
        return image, data["label"]
    image = ResizeWithPadOrCrop(size, mode="constant", value=float(image.min()))(image)
    return image, ResizeWithPadOrCrop(size, mode="constant", value=0.0)(data["label"])


def _named_classes(label: torch.Tensor, contract: dict[str, Any]) -> np.ndarray:
    """Label values as integers; classes the contract does not name are background to this study."""
    maps = np.rint(np.asarray(label)[0] if contract["dims"] == 2 else np.asarray(label)).astype(np.int64)
    wanted = np.array(sorted(contract["labels"].values()))
    maps[~np.isin(maps, wanted)] = 0
    return maps


def _intensity(image: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    kind = spec["kind"]
    if kind == "percentile":
        return ScaleIntensityRangePercentiles(spec["lower"], spec["upper"], b_min=0.0, b_max=1.0, clip=True)(image)
    if kind == "window":
        half = spec["width"] / 2
        return ScaleIntensityRange(spec["center"] - half, spec["center"] + half, 0.0, 1.0, clip=True)(image)
    return NormalizeIntensity()(image)
