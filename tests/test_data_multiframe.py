"""What scanners write: Enhanced multi-frame CT/MR, slices exported twice, colour and secondary-capture images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from site_kernel.data import InputRejected, prepare, public_catalogue, register_dataset
from site_kernel.data.dicom import read_series, write_series
from site_kernel.data.manifest import read_manifest
from site_kernel.data.multiframe import read_enhanced, write_enhanced

torch.set_num_threads(1)

CONTRACT = {
    "dataset": "default",
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [24, 24],
    "spacing": [2.0, 2.0],
    "orientation": "RAS",
    "intensity": {"kind": "window", "center": 0.0, "width": 2000.0},
    "labels": {"background": 0},
}


def _volume(shape: tuple[int, int, int] = (20, 16, 6)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij"))
    return (
        800 * np.exp(-((grid[0] - 0.2) ** 2 + (grid[1] + 0.3) ** 2) * 3) + 150 * grid[2] + 90 * grid[0] + 300
    ).astype(np.int16)


def _grid() -> np.ndarray:
    affine = np.diag([-1.5, -1.5, 4.0, 1.0])
    affine[:3, 3] = [20.0, 15.0, -10.0]
    return affine


def _flipped(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same world grid stored with columns and slices reversed."""
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = array.shape[0] - 1, array.shape[2] - 1
    return np.flip(array, (0, 2)).copy(), affine @ flip


def _register_and_prepare(root: Path, dims: int = 2) -> np.ndarray:
    register_dataset(root / "site", "default", root / "export", test_fraction=0.0)
    if dims == 2:
        return prepare(root / "site", CONTRACT).train_x
    volumes = prepare(root / "site", {**CONTRACT, "dims": 3, "size": None, "spacing": [2.0, 2.0, 4.0]})
    return np.stack([case["image"] for case in volumes.train])


@pytest.mark.parametrize(("dims", "shape"), [(2, (6, 1, 24, 24)), (3, (1, 1, 15, 12, 6))])
def test_a_flipped_reversed_series_and_an_enhanced_file_harmonise_to_the_same_array(
    tmp_path: Path, dims: int, shape: tuple[int, ...]
) -> None:
    stored = _volume()
    flipped, flipped_affine = _flipped(stored, _grid())
    write_series(
        tmp_path / "series" / "export" / "s1",
        flipped,
        flipped_affine,
        modality="CT",
        tags={},
        slope=2.0,
        intercept=-1024.0,
        uid_seed="series",
        reverse_file_order=True,
    )
    write_enhanced(
        tmp_path / "enhanced" / "export" / "volume.dcm",
        stored,
        _grid(),
        modality="CT",
        tags={},
        slope=2.0,
        intercept=-1024.0,
        uid_seed="enhanced",
        frame_order=[3, 0, 5, 1, 4, 2],
    )

    from_series = _register_and_prepare(tmp_path / "series", dims)
    from_enhanced = _register_and_prepare(tmp_path / "enhanced", dims)

    assert from_series.shape == shape
    np.testing.assert_allclose(from_enhanced, from_series, atol=1e-6)
    (case,) = read_manifest(tmp_path / "enhanced" / "site", "default")["cases"]
    assert (case["shape"], case["spacing"], case["modality"]) == ([20, 16, 6], [1.5, 1.5, 4.0], "CT")


def test_an_enhanced_file_reads_onto_the_world_grid_of_its_series(tmp_path: Path) -> None:
    paths = write_series(tmp_path / "s", _volume(), _grid(), modality="MR", tags={}, uid_seed="s")
    enhanced = read_enhanced(
        write_enhanced(
            tmp_path / "e.dcm", _volume(), _grid(), modality="MR", tags={}, uid_seed="e", frame_order=[5, 4, 3, 2, 1, 0]
        )
    )
    series = read_series(paths)
    world = np.array([[3, 7, 2, 1]]).T
    # The same voxel of each (found through its own affine) lies at the same point and holds the same value.
    for volume in (enhanced, series):
        index = np.rint(np.linalg.inv(volume.affine) @ series.affine @ world).astype(int)[:3, 0]
        assert volume.array[tuple(index)] == series.array[3, 7, 2]
    assert enhanced.modality == "MR" and enhanced.shape == series.shape


def test_per_frame_rescale_is_applied_frame_by_frame(tmp_path: Path) -> None:
    real = _volume((8, 8, 4)).astype(np.int32) * 6  # divisible by every slope below
    path = write_enhanced(
        tmp_path / "e.dcm", (real // 6).astype(np.int16), _grid(), modality="CT", tags={}, uid_seed="rescale"
    )
    ds = pydicom.dcmread(path)
    slopes = [1.0, 2.0, 3.0, 6.0]
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    frames = ds.pixel_array.astype(np.int32)
    for k, (frame, slope) in enumerate(zip(ds.PerFrameFunctionalGroupsSequence, slopes, strict=True)):
        item = pydicom.Dataset()
        item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, -1000.0, "HU"
        frame.PixelValueTransformationSequence = [item]
        frames[k] = real[:, :, k].T // int(slope)
    ds.PixelData = frames.astype(np.int16).tobytes()
    ds.save_as(path)

    volume = read_enhanced(path)

    in_slice_order = volume.array if volume.affine[2, 2] > 0 else volume.array[:, :, ::-1]
    np.testing.assert_array_equal(in_slice_order, real.astype(np.float32) - 1000.0)


def test_an_enhanced_file_with_two_frames_at_one_position_is_quarantined(tmp_path: Path) -> None:
    write_enhanced(
        tmp_path / "export" / "bad.dcm",
        _volume(),
        _grid(),
        modality="CT",
        tags={},
        uid_seed="bad",
        frame_order=[0, 1, 2, 2, 3, 4],
    )
    write_enhanced(tmp_path / "export" / "good.dcm", _volume(), _grid(), modality="CT", tags={}, uid_seed="good")

    summary = register_dataset(tmp_path / "site", "d", tmp_path / "export")

    assert summary.num_cases == 1 and summary.skipped == {"inconsistent_spacing": 1}
    (entry,) = read_manifest(tmp_path / "site", "d")["quarantine"]
    assert entry["paths"] == [str(tmp_path / "export" / "bad.dcm")] and "regular stack" in entry["detail"]


def test_a_truncated_enhanced_file_is_refused_before_decoding(tmp_path: Path) -> None:
    path = write_enhanced(tmp_path / "e.dcm", _volume(), _grid(), modality="CT", tags={}, uid_seed="cut")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 600])

    with pytest.raises(InputRejected) as caught:
        read_enhanced(path)

    assert caught.value.reason == "truncated"


def test_a_slice_exported_twice_is_read_once_and_the_series_kept(tmp_path: Path) -> None:
    source = tmp_path / "export"
    paths = write_series(source / "s1", _volume(), _grid(), modality="CT", tags={}, uid_seed="twice")
    shutil.copy(paths[2], source / "s1" / "IM0003 (copy).dcm")

    summary = register_dataset(tmp_path / "site", "d", source)

    assert summary.num_cases == 1 and summary.skipped == {"duplicate_instance": 1}
    (case,) = read_manifest(tmp_path / "site", "d")["cases"]
    assert case["shape"] == [20, 16, 6] and len(case["files"]) == 6
    assert "1 file skipped: second copy of a slice" in " ".join(
        public_catalogue(tmp_path / "site")["datasets"]["d"]["skipped"]
    )


def test_two_different_slices_at_one_position_still_sink_the_series(tmp_path: Path) -> None:
    source = tmp_path / "export"
    paths = write_series(source / "s1", _volume(), _grid(), modality="CT", tags={}, uid_seed="re-export")
    ds = pydicom.dcmread(paths[2])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["another"])
    ds.save_as(source / "s1" / "IM0099.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), source / "fine.dcm")

    summary = register_dataset(tmp_path / "site", "d", source)

    assert summary.num_cases == 1 and summary.skipped == {"inconsistent_spacing": 7}


def _secondary_capture(path: Path) -> None:
    """A greyscale secondary capture as a scanned form or screenshot comes: no patient geometry."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    del ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["sc"])
    ds.save_as(path)


@pytest.mark.parametrize(
    ("file_name", "reason", "shown"),
    [
        ("SC_rgb_small_odd.dcm", "colour_image", "colour image (RGB, YBR or palette): not supported"),
        ("examples_palette.dcm", "colour_image", "colour image (RGB, YBR or palette): not supported"),
        ("examples_ybr_color.dcm", "colour_image", "colour image (RGB, YBR or palette): not supported"),
        ("rtdose.dcm", "unsupported", "unsupported encoding or layout"),
        (None, "secondary_capture", "secondary capture without patient geometry"),
    ],
)
def test_images_that_are_not_read_say_so_in_the_catalogue(
    tmp_path: Path, file_name: str | None, reason: str, shown: str
) -> None:
    source = tmp_path / "export"
    source.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), source / "fine.dcm")
    if file_name is None:
        _secondary_capture(source / "other.dcm")
    else:
        shutil.copy(get_testdata_file(file_name), source / "other.dcm")

    summary = register_dataset(tmp_path / "site", "d", source)

    assert summary.num_cases == 1 and summary.skipped == {reason: 1}
    (line,) = public_catalogue(tmp_path / "site")["datasets"]["d"]["skipped"]
    assert line.startswith(f"1 file skipped: {shown}")
    assert f"reason={reason}" in (tmp_path / "site" / "logs" / "data.log").read_text()
