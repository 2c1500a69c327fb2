"""Enhanced (multi-frame) CT and MR: one file holding a whole stack, placed frame by frame.

An Enhanced CT/MR object (and its Legacy Converted form) keeps geometry and rescale in functional groups rather
than in top-level attributes: ``SharedFunctionalGroupsSequence`` for what all frames share and
``PerFrameFunctionalGroupsSequence`` for what differs (PS3.3 C.7.6.16): ``PlanePositionSequence``,
``PlaneOrientationSequence``, ``PixelMeasuresSequence`` and ``PixelValueTransformationSequence``. highdicom reads
these (``Image.get_volume``: frames sorted along the slice normal, spacing checked, per-frame rescale applied), so
this module only checks the claimed size before decoding and turns the result into a :class:`Volume` in the same
[column, row, slice] order, on the same RAS+ world grid, as a single-frame series of the same stack.

:func:`write_enhanced` writes such a file from a known volume, for tests and simulated hospitals.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .dicom import (
    ENHANCED_SOP_CLASS,
    Grid,
    check_image_header,
    check_stored,
    is_enhanced,
    new_dataset,
    read_dataset,
    rescale,
)
from .errors import InputRejected
from .volume import Volume, check_dimensions, check_finite


def read_enhanced(path: Path) -> Volume:
    """Read one Enhanced CT/MR file as a volume in modality units (rescale applied per frame).

    Raises :class:`InputRejected`: ``truncated`` when the pixel data is shorter than the frames it claims,
    ``inconsistent_spacing`` when the frames do not form one regular stack (a gap, two frames at one position,
    several stacks such as time points or b-values in one file), ``corrupt`` when highdicom cannot read it.
    """
    import highdicom as hd  # imported here: it takes seconds, and only sites with enhanced files need it

    ds = check_image_header(read_dataset(path, stop_before_pixels=False))
    if not is_enhanced(ds):
        raise InputRejected("unsupported", "not an Enhanced CT/MR object")
    if "PixelData" not in ds:
        raise InputRejected("truncated", "no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    expected = int(ds.Rows) * int(ds.Columns) * frames * int(ds.get("BitsAllocated", 16)) // 8
    compressed = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian).is_compressed
    if not compressed and len(ds.PixelData) < expected:
        raise InputRejected("truncated", "pixel data shorter than its frames")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = hd.Image.from_dataset(ds, copy=False)
    except Exception as e:  # highdicom validates many attributes; any failure means the file is not usable
        raise InputRejected("corrupt", type(e).__name__) from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The modality transform (rescale slope/intercept, per frame where frames differ) gives HU for CT, as
            # for single-frame slices; real-world value maps are left alone (they change units, not placement).
            stack = image.get_volume(dtype=np.float32, apply_real_world_transform=False)
    except (RuntimeError, ValueError) as e:
        raise InputRejected("inconsistent_spacing", f"frames do not form one regular stack ({type(e).__name__})") from e
    except (NotImplementedError, ImportError) as e:
        raise InputRejected("unsupported", "no decoder for this transfer syntax") from e
    # highdicom indexes [slice, row, column] with an LPS affine; the site's readers use [column, row, slice] in RAS+.
    array = np.ascontiguousarray(np.transpose(np.asarray(stack.array, dtype=np.float32), (2, 1, 0)))
    check_dimensions(array.shape)
    check_finite(array)
    affine = np.asarray(stack.get_affine("RAS"), dtype=np.float64)[:, [2, 1, 0, 3]]
    return Volume(
        array=array,
        affine=affine,
        modality=str(ds.get("Modality", "unknown")) or "unknown",
        vendor=str(ds.get("Manufacturer", "unknown")) or "unknown",
        extra={"frame_of_reference": str(ds.get("FrameOfReferenceUID", ""))},
    )


def write_enhanced(
    path: Path,
    stored: np.ndarray,
    affine_ras: np.ndarray,
    *,
    modality: str,
    tags: Mapping[str, Any],
    slope: float = 1.0,
    intercept: float = 0.0,
    uid_seed: str,
    frame_order: Sequence[int] | None = None,
) -> Path:
    """Write ``stored`` ([column, row, slice] int16/uint16) as one Enhanced CT or MR file on ``affine_ras``'s grid.

    ``frame_order`` lists slice indices in the order the frames are stored (default: slice order); readers must
    place frames by their positions, never by frame number. Geometry and rescale go into the shared functional
    groups, each frame's position into its own; the UIDs derive from ``uid_seed`` as in ``write_series``.
    """
    check_stored(stored)
    if modality not in ENHANCED_SOP_CLASS:
        raise ValueError(f"enhanced objects exist for {sorted(ENHANCED_SOP_CLASS)}, not {modality!r}")
    order = list(range(stored.shape[2])) if frame_order is None else [int(k) for k in frame_order]
    grid = Grid.of(affine_ras)
    ds = new_dataset(ENHANCED_SOP_CLASS[modality], modality, uid_seed)
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "instance"])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(order)
    ds.SharedFunctionalGroupsSequence = DicomSequence(
        [
            _item(
                PlaneOrientationSequence=_item(ImageOrientationPatient=grid.orientation),
                PixelMeasuresSequence=_item(
                    PixelSpacing=grid.pixel_spacing,
                    SliceThickness=grid.slice_step,
                    SpacingBetweenSlices=grid.slice_step,
                ),
                PixelValueTransformationSequence=_item(**rescale(modality, slope, intercept)),
            )
        ]
    )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(
        [
            _item(
                PlanePositionSequence=_item(ImagePositionPatient=grid.position(k)),
                FrameContentSequence=_item(InStackPositionNumber=k + 1, StackID="1"),
            )
            for k in order
        ]
    )
    for key, value in tags.items():
        setattr(ds, key, value)
    frames = np.stack([np.ascontiguousarray(stored[:, :, k].T) for k in order])
    ds.set_pixel_data(frames, "MONOCHROME2", bits_stored=16, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _item(**attributes: Any) -> Dataset:
    """One sequence item; a Dataset value becomes a one-item sequence, as functional groups nest them."""
    item = Dataset()
    for key, value in attributes.items():
        setattr(item, key, DicomSequence([value]) if isinstance(value, Dataset) else value)
    return item
