"""NIfTI files, read without trusting the header.

nibabel allocates a buffer of the size the header declares before it reads a compressed file, so a 1 kB file
that claims 10^12 voxels would exhaust memory. Here the claimed shape is capped first, an uncompressed file's size
is compared with what the header promises, and a ``.nii.gz`` is decompressed in bounded chunks, so memory follows
the bytes that really exist. A BIDS-style JSON sidecar (``case.json`` beside ``case.nii.gz``) may name the
modality and vendor, which NIfTI headers do not carry.
"""

from __future__ import annotations

import gzip
import json
import zlib
from math import prod
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputRejected
from .volume import Volume, check_dimensions, check_finite

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHUNK = 1 << 20


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """File name without ``.nii`` / ``.nii.gz``."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_nifti(path: Path) -> Volume:
    """Read one 3D (or 2D, or 4D with one frame) NIfTI image; raise :class:`InputRejected` when unusable.

    Voxels that are NaN or infinite make the whole file unusable (``non_finite``).
    """
    if path.stat().st_size == 0:
        raise InputRejected("empty_file")
    compressed = path.name.lower().endswith(".gz")
    try:
        header_img = nib.load(path)  # parses the header only; no data is read yet
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputRejected("truncated" if isinstance(e, EOFError) else "corrupt") from e
    except Exception as e:  # ImageFileError, HeaderDataError, struct errors: not a NIfTI we can use
        raise InputRejected("unreadable") from e
    if not isinstance(header_img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputRejected("unreadable", "not a single-file NIfTI image")
    header = header_img.header
    shape = tuple(int(n) for n in header.get_data_shape())
    check_dimensions(shape)
    volume_shape = _as_3d(shape)
    offset = int(header_img.dataobj.offset)
    expected = offset + prod(shape) * header.get_data_dtype().itemsize
    if compressed:
        img = type(header_img).from_bytes(_bounded_gunzip(path, expected))
    else:
        if path.stat().st_size < expected:
            raise InputRejected("header_size_mismatch")
        img = header_img
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(volume_shape)
    except Exception as e:
        raise InputRejected("corrupt", type(e).__name__) from e
    check_finite(data)
    modality, vendor = _sidecar(path)
    return Volume(array=data, affine=_affine(img, volume_shape), modality=modality, vendor=vendor)


def _as_3d(shape: tuple[int, ...]) -> tuple[int, int, int]:
    trimmed = list(shape)
    while len(trimmed) > 3 and trimmed[-1] == 1:
        trimmed.pop()
    if len(trimmed) == 2:
        trimmed.append(1)
    if len(trimmed) != 3:
        raise InputRejected("unsupported", "only 2D and 3D images are read (4D series with several frames are not)")
    return (trimmed[0], trimmed[1], trimmed[2])


def _bounded_gunzip(path: Path, expected: int) -> bytes:
    """Decompress at most ``expected`` bytes, growing the buffer only as real data arrives."""
    buffer = bytearray()
    try:
        with gzip.open(path, "rb") as stream:
            while len(buffer) < expected:
                chunk = stream.read(min(_CHUNK, expected - len(buffer)))
                if not chunk:
                    break
                buffer.extend(chunk)
            # Read on to the end of the stream (gzip checks its CRC there), tolerating a little trailing data.
            if len(buffer) == expected and len(stream.read(_CHUNK)) == _CHUNK:
                raise InputRejected("corrupt", "far more data than the header describes")
    except EOFError as e:
        raise InputRejected("truncated") from e
    except (gzip.BadGzipFile, zlib.error, OSError) as e:
        raise InputRejected("corrupt") from e
    if len(buffer) < expected:
        raise InputRejected("header_size_mismatch")
    return bytes(buffer)


def _affine(img: nib.Nifti1Image, shape: tuple[int, int, int]) -> np.ndarray:
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        # A broken qform/sform still leaves the voxel sizes usable; assume RAS order rather than refuse the scan.
        zooms = [float(z) if z > 0 else 1.0 for z in img.header.get_zooms()[:3]]
        zooms += [1.0] * (3 - len(zooms))
        affine = np.diag([*zooms, 1.0])
    return affine


def _sidecar(path: Path) -> tuple[str, str]:
    sidecar = path.with_name(nifti_stem(path) + ".json")
    if not sidecar.is_file() or sidecar.stat().st_size > 1 << 20:
        return "unknown", "unknown"
    try:
        meta = json.loads(sidecar.read_text())
    except (ValueError, OSError):
        return "unknown", "unknown"
    if not isinstance(meta, dict):
        return "unknown", "unknown"
    return str(meta.get("Modality", "unknown")), str(meta.get("Manufacturer", "unknown"))


def write_nifti(
    path: Path,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    sidecar: dict[str, object] | None = None,
    descrip: str = "",
) -> None:
    """Write ``array`` on ``affine`` (gzip if the name ends in ``.gz``) and an optional JSON sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(array, affine)
    image.header["descrip"] = descrip.encode()[:79]
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    if sidecar is not None:
        path.with_name(nifti_stem(path) + ".json").write_text(json.dumps(sidecar, sort_keys=True, indent=1))
