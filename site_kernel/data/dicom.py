"""DICOM series: reading headers, assembling checked volumes, and writing series (for the demo hospitals).

Geometry follows PS3.3 C.7.6.2: voxel (i, j) of a slice lies at ``IPP + i * Δcol * row_dir + j * Δrow * col_dir``
where ``ImageOrientationPatient = row_dir + col_dir`` and ``PixelSpacing = [Δrow, Δcol]``. Slices are ordered by
their ``ImagePositionPatient`` projected on the slice normal (never by file name or InstanceNumber), and the
assembled volume is indexed ``[column, row, slice]`` with an affine in RAS+ (DICOM's LPS with x and y negated).
Reading and writing share these conventions so a written series reads back onto the same world grid. Enhanced
CT/MR files (one file per stack) are recognised here and read by :mod:`site_kernel.data.multiframe`.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from .errors import InputRejected
from .volume import Volume, check_dimensions

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_GEOMETRY_TAGS = {"ImageOrientationPatient": 6, "ImagePositionPatient": 3, "PixelSpacing": 2}
_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
#: Enhanced CT/MR and their Legacy Converted forms (PS3.4 B.5): frames placed by per-frame functional groups.
ENHANCED_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2.1", "MR": "1.2.840.10008.5.1.4.1.1.4.1"}
ENHANCED_SOP_CLASSES = frozenset(
    {*ENHANCED_SOP_CLASS.values(), "1.2.840.10008.5.1.4.1.1.2.2", "1.2.840.10008.5.1.4.1.1.4.4"}
)
#: Secondary Capture Image Storage and its multi-frame greyscale forms.
_SECONDARY_CAPTURE = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.2", "1.2.840.10008.5.1.4.1.1.7.3"}
#: Relative tolerance on slice gaps: scanners round positions to ~0.01 mm; a missing slice is a 100 % jump.
_GAP_TOLERANCE = 0.05


def read_header(path: Path) -> Dataset:
    """Read one image file's tags without pixel data; raise :class:`InputRejected` for anything unusable."""
    return check_image_header(read_dataset(path))


def read_dataset(path: Path, *, stop_before_pixels: bool = True) -> Dataset:
    """Read one DICOM file of any kind (image, SEG, report); only unreadable files are refused here."""
    if path.stat().st_size == 0:
        raise InputRejected("empty_file")
    try:
        # pydicom warns about every odd value in real-world files; the site log records what matters.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _dcmread(path, stop_before_pixels)
    except InvalidDicomError as e:
        raise InputRejected("unreadable") from e
    except (EOFError, struct.error) as e:
        raise InputRejected("truncated") from e
    except Exception as e:  # pydicom raises many types on damaged files; all mean the same to a site
        raise InputRejected("corrupt", type(e).__name__) from e


def check_image_header(ds: Dataset) -> Dataset:
    """Refuse what is not a greyscale slice (or Enhanced CT/MR volume) with usable size and geometry; return ``ds``.

    Colour images and secondary captures without geometry (screenshots, scanned request forms) get reasons of
    their own, so the catalogue says plainly that they are not supported rather than broken.
    """
    if "Rows" not in ds or "Columns" not in ds:
        raise InputRejected("not_an_image")
    if int(ds.get("SamplesPerPixel", 1)) != 1 or not str(ds.get("PhotometricInterpretation", "MONOCHROME2")).startswith(
        "MONOCHROME"
    ):
        raise InputRejected("colour_image", f"{ds.get('PhotometricInterpretation', 'colour')} images are not read")
    if is_enhanced(ds):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        check_dimensions((int(ds.Columns), int(ds.Rows), frames))
        if len(ds.get("PerFrameFunctionalGroupsSequence", [])) != frames:
            raise InputRejected("missing_geometry", "per-frame functional groups do not describe every frame")
        return ds
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise InputRejected("unsupported", "multi-frame objects other than Enhanced CT/MR are not read")
    check_dimensions((int(ds.Columns), int(ds.Rows)))
    for tag, multiplicity in _GEOMETRY_TAGS.items():
        if tag not in ds or ds[tag].VM != multiplicity:  # noqa: SIM300 - VM is the element's value multiplicity, not a constant
            if str(ds.get("SOPClassUID", "")) in _SECONDARY_CAPTURE:
                raise InputRejected("secondary_capture", f"no usable {tag}")
            raise InputRejected("missing_geometry", f"no usable {tag}")
    return ds


def is_enhanced(ds: Dataset) -> bool:
    """True for an Enhanced (or Legacy Converted Enhanced) CT/MR object: one file holding a whole stack."""
    return str(ds.get("SOPClassUID", "")) in ENHANCED_SOP_CLASSES and "PerFrameFunctionalGroupsSequence" in ds


def _dcmread(path: Path, stop_before_pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        # Older scanners and some exporters write the dataset without preamble and file meta. Accept those only
        # when the file starts like a dataset (group 0008, little endian), so text files stay "unreadable".
        with path.open("rb") as f:
            if f.read(2) != b"\x08\x00":
                raise
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
        if "TransferSyntaxUID" not in ds.file_meta:
            implicit = ds.original_encoding[0]
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        return ds


def read_pixels(path: Path) -> tuple[Dataset, np.ndarray]:
    """Read one slice with its pixels in modality units (RescaleSlope/Intercept or LUT applied), as [rows, cols]."""
    ds = check_image_header(read_dataset(path, stop_before_pixels=False))
    if "PixelData" not in ds:
        raise InputRejected("not_an_image")
    if not ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian).is_compressed:
        # Compare the buffer the file really holds with what the header claims before decoding anything.
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("BitsAllocated", 16)) // 8
        if len(ds.PixelData) < expected:
            raise InputRejected("truncated", "pixel data shorter than Rows x Columns")
    try:
        raw = ds.pixel_array
    except (NotImplementedError, RuntimeError) as e:
        raise InputRejected("unsupported", "no decoder for this transfer syntax") from e
    except Exception as e:
        raise InputRejected("corrupt", type(e).__name__) from e
    values = pydicom.pixels.apply_modality_lut(raw, ds)
    return ds, np.asarray(values, dtype=np.float32)


def drop_duplicate_instances(members: Sequence[tuple[Path, Dataset]]) -> tuple[list[tuple[Path, Dataset]], list[Path]]:
    """Keep the first file of each SOPInstanceUID; return the kept members and the paths of the extra copies.

    An export that wrote one slice twice (two names, one instance) would otherwise look like two slices at one
    position and sink the series. Copies that disagree on where the slice lies are not copies: they are kept, and
    :func:`order_slices` refuses the series.
    """
    kept: list[tuple[Path, Dataset]] = []
    first: dict[str, Dataset] = {}
    copies: list[Path] = []
    for path, header in members:
        uid = str(header.get("SOPInstanceUID", ""))
        seen = first.get(uid) if uid else None
        if seen is not None and seen.get("ImagePositionPatient") == header.get("ImagePositionPatient"):
            copies.append(path)
            continue
        first.setdefault(uid, header)
        kept.append((path, header))
    return kept, copies


def _vector(ds: Dataset, tag: str) -> np.ndarray:
    return np.asarray([float(v) for v in ds[tag].value], dtype=np.float64)


def order_slices(headers: Sequence[Dataset]) -> tuple[list[int], np.ndarray]:
    """Order a series' slices along the slice normal and check it is one regular stack.

    Returns the order (indices into ``headers``) and the mean step vector between consecutive slices in LPS mm.
    Raises ``mixed_series`` when slices disagree on matrix, orientation, spacing or modality, and
    ``inconsistent_spacing`` when positions repeat or gaps differ (a missing slice, two stacks in one UID).
    """
    first = headers[0]
    reference = _consistency_key(first)
    if any(_consistency_key(h) != reference for h in headers[1:]):
        raise InputRejected("mixed_series", "slices differ in matrix, orientation, spacing or modality")
    iop = _vector(first, "ImageOrientationPatient")
    normal = np.cross(iop[:3], iop[3:])
    positions = np.stack([_vector(h, "ImagePositionPatient") for h in headers])
    depth = positions @ normal
    order = [int(i) for i in np.argsort(depth, kind="stable")]
    if len(headers) == 1:
        thickness = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
        return order, normal * abs(thickness)
    gaps = np.diff(depth[order])
    median = float(np.median(gaps))
    if median <= 1e-3 or np.any(gaps <= 1e-3):
        raise InputRejected("inconsistent_spacing", "repeated slice positions")
    if np.max(np.abs(gaps - median)) > _GAP_TOLERANCE * median:
        raise InputRejected("inconsistent_spacing", "uneven gaps between slices")
    step = (positions[order[-1]] - positions[order[0]]) / (len(order) - 1)
    return order, step


def _consistency_key(ds: Dataset) -> tuple[Any, ...]:
    return (
        int(ds.Rows),
        int(ds.Columns),
        tuple(round(float(v), 3) for v in ds.ImageOrientationPatient),
        tuple(round(float(v), 3) for v in ds.PixelSpacing),
        str(ds.get("Modality", "")),
    )


def series_affine(first: Dataset, step_lps: np.ndarray) -> np.ndarray:
    """Voxel [column, row, slice] -> RAS+ mm affine of a series whose first (lowest) slice is ``first``."""
    iop = _vector(first, "ImageOrientationPatient")
    d_row, d_col = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * d_col
    lps[:3, 1] = iop[3:] * d_row
    lps[:3, 2] = step_lps
    lps[:3, 3] = _vector(first, "ImagePositionPatient")
    return _LPS_TO_RAS @ lps


def read_series(paths: Sequence[Path]) -> Volume:
    """Read the files of one series into a :class:`Volume`; any unusable file rejects the whole series.

    A series held in one Enhanced CT/MR file is read by :func:`site_kernel.data.multiframe.read_enhanced`.
    """
    if len(paths) == 1 and is_enhanced(read_header(paths[0])):
        from .multiframe import read_enhanced  # highdicom takes seconds to import; only enhanced files need it

        return read_enhanced(paths[0])
    slices = [read_pixels(p) for p in paths]  # each slice's size is checked before its pixels are decoded
    return assemble([ds for ds, _ in slices], [pixels for _, pixels in slices])


def assemble(headers: Sequence[Dataset], pixels: Sequence[np.ndarray]) -> Volume:
    """Stack decoded slices ([rows, cols] each, any order) into a volume indexed [column, row, slice]."""
    order, step = order_slices(headers)
    first = headers[order[0]]
    check_dimensions((int(first.Columns), int(first.Rows), len(headers)))
    return Volume(
        array=np.ascontiguousarray(np.stack([pixels[i].T for i in order], axis=-1), dtype=np.float32),
        affine=series_affine(first, step),
        modality=str(first.get("Modality", "unknown")) or "unknown",
        vendor=str(first.get("Manufacturer", "unknown")) or "unknown",
        extra={"frame_of_reference": str(first.get("FrameOfReferenceUID", ""))},
    )


def check_stored(stored: np.ndarray) -> None:
    if stored.dtype not in (np.int16, np.uint16):
        raise ValueError(f"stored values must be int16 or uint16, got {stored.dtype}")


@dataclass(frozen=True)
class Grid:
    """A [column, row, slice] voxel grid in the attribute values DICOM writes for it (LPS mm, rounded)."""

    lps: np.ndarray
    orientation: list[float]
    pixel_spacing: list[float]
    slice_step: float

    @classmethod
    def of(cls, affine_ras: np.ndarray) -> Grid:
        lps = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
        d_col, d_row, d_slice = (float(np.linalg.norm(lps[:3, k])) for k in range(3))
        orientation = [round(float(v), 6) for v in (*(lps[:3, 0] / d_col), *(lps[:3, 1] / d_row))]
        return cls(lps, orientation, [round(d_row, 6), round(d_col, 6)], round(d_slice, 4))

    def position(self, k: int) -> list[float]:
        """ImagePositionPatient of slice ``k``."""
        return [round(float(v), 4) for v in self.lps[:3, 3] + k * self.lps[:3, 2]]


def new_dataset(sop_class: str, modality: str, uid_seed: str) -> Dataset:
    """An image dataset with file meta and the study, series and frame-of-reference UIDs derived from ``uid_seed``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = modality
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_seed, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[uid_seed, "frame"])
    ds.SeriesNumber = 1
    return ds


def rescale(modality: str, slope: float, intercept: float) -> dict[str, Any]:
    """The Modality LUT attributes that turn stored values into ``modality``'s units (HU for CT)."""
    return {
        "RescaleSlope": float(slope),
        "RescaleIntercept": float(intercept),
        "RescaleType": "HU" if modality == "CT" else "US",
    }


def write_series(
    folder: Path,
    stored: np.ndarray,
    affine_ras: np.ndarray,
    *,
    modality: str,
    tags: Mapping[str, Any],
    slope: float = 1.0,
    intercept: float = 0.0,
    uid_seed: str,
    reverse_file_order: bool = False,
) -> list[Path]:
    """Write ``stored`` ([column, row, slice] integer values) as one DICOM series on ``affine_ras``'s grid.

    ``tags`` adds or overrides attributes (PatientName, Manufacturer, ...). UIDs derive from ``uid_seed`` so the
    same call writes byte-identical files. ``reverse_file_order`` numbers files against slice order, as some
    scanners do, so readers cannot rely on names.
    """
    check_stored(stored)
    folder.mkdir(parents=True, exist_ok=True)
    grid = Grid.of(affine_ras)
    # One dataset reused for every slice: only position, instance and pixels change between slices.
    ds = new_dataset(_SOP_CLASS.get(modality, "1.2.840.10008.5.1.4.1.1.7"), modality, uid_seed)
    ds.ImageOrientationPatient = grid.orientation
    ds.PixelSpacing = grid.pixel_spacing
    ds.SliceThickness = ds.SpacingBetweenSlices = grid.slice_step
    for key, value in {**rescale(modality, slope, intercept), **tags}.items():
        setattr(ds, key, value)
    ds.set_pixel_data(
        np.ascontiguousarray(stored[:, :, 0].T), "MONOCHROME2", bits_stored=16, generate_instance_uid=False
    )
    n = stored.shape[2]
    paths = []
    for k in range(n):
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, "instance", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = grid.position(k)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        number = n - k if reverse_file_order else k + 1
        path = folder / f"IM{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
