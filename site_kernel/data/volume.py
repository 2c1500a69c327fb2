"""The in-memory form every reader returns, and the size limits every reader enforces before allocating.

A :class:`Volume` is a 3D array in the file's own voxel order with a 4x4 affine to RAS+ world millimetres (the
nibabel convention), so that MONAI's ``Orientation``/``Spacing`` transforms can put any site's data onto a
contract's grid. DICOM's LPS geometry is converted on reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np

from .errors import InputRejected

#: Largest in-plane or through-plane size a scan may claim. Clinical matrices stop at 2048; 4096 leaves room.
MAX_DIM = 4096
#: Largest number of voxels one volume may claim: 512 x 512 x 1024 (1 GiB as float32). A header that claims more
#: is refused before anything is allocated.
MAX_VOXELS = 512 * 512 * 1024


@dataclass
class Volume:
    """One image volume: ``array`` [X, Y, Z] float32 in stored order, ``affine`` voxel -> RAS+ mm."""

    array: np.ndarray
    affine: np.ndarray
    modality: str = "unknown"
    vendor: str = "unknown"
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the three array axes (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (int(self.array.shape[0]), int(self.array.shape[1]), int(self.array.shape[2]))


def check_dimensions(shape: tuple[int, ...], *, max_voxels: int = MAX_VOXELS) -> None:
    """Refuse a claimed shape that is non-positive, too large per axis or too large in total.

    Called on header values before any pixel buffer exists, so a lying header costs nothing.
    """
    if not shape or any(int(n) <= 0 for n in shape):
        raise InputRejected("absurd_dimensions", "a dimension is zero or negative")
    if any(int(n) > MAX_DIM for n in shape):
        raise InputRejected("absurd_dimensions", f"a dimension exceeds {MAX_DIM}")
    if prod(int(n) for n in shape) > max_voxels:
        raise InputRejected("absurd_dimensions", f"more than {max_voxels} voxels")


def axcodes(affine: np.ndarray) -> str:
    """Orientation codes of an affine (e.g. ``"RAS"``, ``"LPS"``), as nibabel names them."""
    import nibabel as nib

    return "".join(str(c) for c in nib.aff2axcodes(affine))


def check_finite(array: np.ndarray) -> None:
    """Refuse an image holding NaN or infinite voxels: every intensity step downstream would spread them.

    Raised by the readers, so registration quarantines such a file and a file edited after registration is
    skipped by ``prepare``; the count goes to the site's log only.
    """
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputRejected("non_finite", f"{bad} of {array.size} voxels are NaN or infinite")
