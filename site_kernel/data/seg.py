"""DICOM Segmentation objects (Modality SEG) as the label maps of the series they annotate.

A SEG names what it annotates in its header: the series (``ReferencedSeriesSequence``), the source slices
(``SourceImageSequence`` of each frame) and the frame of reference; :func:`read_reference` collects these without
decoding any pixel. Where its frames lie is given by their plane positions, so :func:`read_label_map` lets highdicom
decode the frames into a volume (``Segmentation.get_volume``, segments combined into one map whose values are the
segment numbers) and places that volume on the series' voxel grid by geometry alone (``Volume.match_geometry``:
permutes, flips, pads, never resamples). A series stored in any file order, or a SEG that omits its empty frames,
therefore gives the same label map. Segment labels ("liver") travel with the map as class names.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from .dicom import read_dataset
from .errors import InputRejected
from .volume import Volume, check_dimensions

#: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"})


@dataclass(frozen=True)
class SegReference:
    """What one SEG file says it annotates, read from its header."""

    path: Path
    series_uids: frozenset[str]
    instance_uids: frozenset[str]
    frame_of_reference: str


def is_segmentation(ds: Dataset) -> bool:
    """True for a DICOM Segmentation object (never an image series of its own)."""
    return str(ds.get("Modality", "")) == "SEG" or str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES


def read_reference(path: Path, ds: Dataset) -> SegReference:
    """The series, slices and frame of reference that the SEG header ``ds`` (read from ``path``) refers to."""
    series: set[str] = set()
    instances: set[str] = set()
    for item in ds.get("ReferencedSeriesSequence", []):
        series.add(str(item.get("SeriesInstanceUID", "")))
        for ref in item.get("ReferencedInstanceSequence", []):
            instances.add(str(ref.get("ReferencedSOPInstanceUID", "")))
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                instances.add(str(source.get("ReferencedSOPInstanceUID", "")))
    return SegReference(
        path=path,
        series_uids=frozenset(series - {""}),
        instance_uids=frozenset(instances - {""}),
        frame_of_reference=str(ds.get("FrameOfReferenceUID", "")),
    )


def read_label_map(path: Path, image: Volume) -> tuple[np.ndarray, dict[int, str]]:
    """Return the SEG at ``path`` as a label map in ``image``'s voxel order, and its segment labels by number.

    Voxels in no segment are 0; a voxel in segment ``n`` is ``n``. Where ``image`` knows its frame of reference
    (``image.extra["frame_of_reference"]``, set by the DICOM reader), the SEG must lie in the same one.

    Raises :class:`InputRejected`: ``truncated``/``corrupt``/``absurd_dimensions`` for a file that cannot be
    decoded, ``label_mismatch`` when segments overlap, frames do not form a regular stack, or the frames do not lie
    on the image's grid (other frame of reference, spacing, orientation, or voxels outside the image).
    """
    import highdicom as hd  # imported here: it takes seconds, and only sites with SEG files need it

    segmentation = _read(path, hd)
    expected = str(image.extra.get("frame_of_reference", ""))
    if expected and str(segmentation.get("FrameOfReferenceUID", "")) != expected:
        raise InputRejected("label_mismatch", "segmentation lies in another frame of reference")
    numbers = [int(n) for n in segmentation.segment_numbers]
    if not numbers or max(numbers) > 255:
        raise InputRejected("label_mismatch", "segment numbers must lie in 1-255")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = segmentation.get_volume(combine_segments=True)
    except (RuntimeError, ValueError) as e:  # overlapping segments, irregular or missing plane positions
        detail = f"segmentation frames do not form one label volume ({type(e).__name__})"
        raise InputRejected("label_mismatch", detail) from e
    grid = hd.VolumeGeometry(image.affine, image.shape, coordinate_system="PATIENT", from_reference_convention="RAS")
    try:
        placed = volume.match_geometry(grid)
    except RuntimeError as e:
        raise InputRejected("label_mismatch", "segmentation frames do not lie on the series' voxel grid") from e
    labels = np.asarray(placed.array, dtype=np.int64)
    # match_geometry crops silently; a segment drawn outside the series is a mismatch, not something to drop.
    if np.count_nonzero(labels) != np.count_nonzero(volume.array):
        raise InputRejected("label_mismatch", "segmentation reaches beyond the series")
    names = {n: str(segmentation.get_segment_description(n).get("SegmentLabel", "")) for n in numbers}
    return labels, names


def _read(path: Path, hd: Any) -> Any:
    """Read the whole SEG, check its claimed size against the bytes present, then hand it to highdicom.

    The file's bytes are read as they are (memory follows the file); nothing is decoded before the frame count and
    size have been checked, so a lying header costs nothing.
    """
    ds = read_dataset(path, stop_before_pixels=False)
    if not is_segmentation(ds):
        raise InputRejected("unreadable", "not a DICOM Segmentation object")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        bits = int(ds.get("BitsAllocated", 1))
    except (AttributeError, TypeError, ValueError) as e:
        raise InputRejected("corrupt", "segmentation without a frame size") from e
    check_dimensions((columns, rows, frames))
    if "PixelData" not in ds:
        # pydicom drops a final element that the file cuts short, and Pixel Data comes last: a cut-off file.
        raise InputRejected("truncated", "segmentation without pixel data")
    # pydicom reads a cut-off file without complaint; compare what is there with what the header promises.
    compressed = ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian).is_compressed
    if not compressed and len(ds.PixelData) < (rows * columns * frames * bits + 7) // 8:
        raise InputRejected("truncated", "segmentation pixel data shorter than its frames")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as e:  # highdicom validates many attributes; any failure means the file is not usable
        raise InputRejected("corrupt", type(e).__name__) from e
