"""Errors raised by the site's data layer, and the reasons a file can be quarantined.

Every error derives from :class:`DataError` (itself a :class:`site_kernel.errors.SiteKernelError`), except
:class:`~flip_common.contract.ContractError`, which the lab raises too and which carries ``fixed_by`` all the same.
Messages are written for the data owner and the researcher alike: they name the dataset, the contract key or the reason,
never a patient name, a file name or a pixel value.
"""

from __future__ import annotations

from typing import Literal

from flip_common.errors import FixedBy
from site_kernel.errors import SiteKernelError

QuarantineReason = Literal[
    "empty_file",
    "unreadable",
    "truncated",
    "corrupt",
    "unsupported",
    "colour_image",
    "secondary_capture",
    "not_an_image",
    "missing_geometry",
    "absurd_dimensions",
    "header_size_mismatch",
    "inconsistent_spacing",
    "mixed_series",
    "duplicate_instance",
    "non_finite",
    "missing_label",
    "label_mismatch",
    "unmatched_label",
    "duplicate_label",
    "not_a_label_map",
]

#: What the catalogue says about each reason ("3 files skipped: unreadable").
REASON_TEXT: dict[str, str] = {
    "empty_file": "empty file",
    "unreadable": "unreadable (neither DICOM nor NIfTI)",
    "truncated": "truncated file",
    "corrupt": "corrupt file",
    "unsupported": "unsupported encoding or layout",
    "colour_image": "colour image (RGB, YBR or palette): not supported, only greyscale images are read",
    "secondary_capture": "secondary capture without patient geometry (screenshot or scanned page): not supported",
    "not_an_image": "DICOM object without an image",
    "missing_geometry": "missing spacing or orientation tags",
    "absurd_dimensions": "implausible image dimensions",
    "header_size_mismatch": "header promises more data than the file holds",
    "inconsistent_spacing": "series with inconsistent slice spacing",
    "mixed_series": "series mixing incompatible slices",
    "duplicate_instance": "second copy of a slice already read (same SOP instance); the series keeps one",
    "non_finite": "image with non-finite voxels (NaN or infinity)",
    "missing_label": "image without a label (label map, SEG or CSV row)",
    "label_mismatch": "label map does not match its image",
    "unmatched_label": "segmentation of an image that is not there",
    "duplicate_label": "second label for an image that already has one",
    "not_a_label_map": "label file is not a label map (non-integer values or too many classes)",
}


class DataError(SiteKernelError):
    """Root of every error raised by ``site_kernel.data``. ``fixed_by`` says whose action fixes it."""

    fixed_by: FixedBy = "data_owner"


class DatasetNotFound(DataError):
    """No dataset of that name is registered at this site."""

    fixed_by: FixedBy = "researcher"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"dataset {name!r} is not registered at this site; register it with "
            "site_kernel.data.register_dataset(site_dir, name, source) or pick another name"
        )
        self.name = name


class RegistrationError(DataError):
    """A dataset could not be registered at all (no source folder, no usable case, bad arguments)."""


class HarmonisationError(DataError):
    """A site harmonisation step is unknown or malformed in the site's settings."""


class DatasetUnusable(DataError):
    """A registered dataset has no case left that can be read (files moved, edited or damaged since)."""


class InputRejected(DataError):
    """One input file or series cannot be used; ingestion quarantines it under ``reason``.

    ``detail`` is for the site's own log (it may name a tag, never a tag's value).
    """

    def __init__(self, reason: QuarantineReason, detail: str = "") -> None:
        super().__init__(f"{REASON_TEXT[reason]}{': ' + detail if detail else ''}")
        self.reason: QuarantineReason = reason
        self.detail = detail
