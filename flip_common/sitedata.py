"""What a plan's ``train(model, data, config)`` and ``evaluate(model, data, config)`` receive as ``data``.

Shared by the site's worker, which builds it from the site's harmonised cache, and the lab's dry run, which builds
it from synthetic data: the plan meets one interface in both places.

- ``dims=2`` (:class:`SiteData`): ``train_x`` float32 ``[N, 1, H, W]``, ``train_y`` int64 (label maps
  ``[N, H, W]`` or class indices ``[N]``), the same for ``test_*``, as torch tensors. ``data.train`` /
  ``data.test`` view the same slices as cases (below), for plans written the MONAI way.
- ``dims=3`` (:class:`VolumeData`): ``data.train`` / ``data.test`` are sequences of cases, each a dict
  ``{"image": float32 [1, X, Y, Z], "label": int64 [1, X, Y, Z] (or a class index), "meta": {"index", "spacing",
  "affine"}}`` (numpy arrays), directly usable as ``monai.data.Dataset(data.train, transform=...)`` with
  dictionary transforms such as ``RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", ...)``.

Volumes are read lazily: a case is read from its memory-mapped ``.npy`` file when it is indexed and copied into
an array of its own (so transforms may write to it); nothing else of the dataset is held in memory. A site's memory
therefore does not grow with the number of cases. ``meta`` carries no identifier of the site's data, only the
case's position in the sequence and its geometry after harmonisation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

#: The harmonised cache entry of a ``dims=3`` contract lists its cases here (written by the site's preparation).
INDEX = "index.json"


class VolumeCases(Sequence[dict[str, Any]]):
    """The cases of one split of a harmonised cache entry, read one at a time when indexed.

    Each case is two ``.npy`` files (image and label) read through ``np.load(..., mmap_mode="r")``: the operating
    system pages in what is read and shares it between processes (DataLoader workers, later jobs) through its page
    cache, and only numpy is needed to read it.
    """

    def __init__(self, folder: Path, entries: Sequence[dict[str, Any]]) -> None:
        self.folder = Path(folder)
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> VolumeCases: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | VolumeCases:
        if isinstance(index, slice):
            return VolumeCases(self.folder, self._entries[index])
        entry = self._entries[index]
        image = np.array(np.load(self.folder / entry["image"], mmap_mode="r", allow_pickle=False), dtype=np.float32)
        if "class" in entry:
            label: Any = np.int64(entry["class"])
        else:
            label = np.array(np.load(self.folder / entry["label"], mmap_mode="r", allow_pickle=False), dtype=np.int64)
        return {"image": image, "label": label, "meta": _meta(entry, index % len(self._entries))}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each case's image shape ``(1, X, Y, Z)``, from the index alone (nothing is read)."""
        return [tuple(e["shape"]) for e in self._entries]


class MemoryCases(Sequence[dict[str, Any]]):
    """Cases held in memory, in the form :class:`VolumeCases` returns: the dry run's synthetic volumes, and the
    slices of a ``dims=2`` dataset seen as cases."""

    def __init__(self, cases: Sequence[dict[str, Any]]) -> None:
        self._cases = list(cases)

    def __len__(self) -> int:
        return len(self._cases)

    @overload
    def __getitem__(self, index: int) -> dict[str, Any]: ...

    @overload
    def __getitem__(self, index: slice) -> MemoryCases: ...

    def __getitem__(self, index: int | slice) -> dict[str, Any] | MemoryCases:
        if isinstance(index, slice):
            return MemoryCases(self._cases[index])
        return self._cases[index]


def _meta(entry: dict[str, Any], index: int) -> dict[str, Any]:
    return {
        "index": index,
        "spacing": np.asarray(entry["spacing"], dtype=np.float64),
        "affine": np.asarray(entry["affine"], dtype=np.float64),
    }


def _slice_cases(x: Any, y: Any) -> MemoryCases:
    """Slices ``[N, 1, H, W]`` and labels (``[N, H, W]`` maps or ``[N]`` classes) as cases; views, no copies."""
    cases = []
    for i in range(int(x.shape[0])):
        label = y[i][None] if getattr(y, "ndim", 1) > 1 else y[i]
        cases.append({"image": x[i], "label": label, "meta": {"index": i}})
    return MemoryCases(cases)


@dataclass
class SiteData:
    """A ``dims=2`` study's data: harmonised slices as tensors, and the same slices as ``train``/``test`` cases."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    device: str = "cpu"

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])

    @property
    def train(self) -> MemoryCases:
        return _slice_cases(self.train_x, self.train_y)

    @property
    def test(self) -> MemoryCases:
        return _slice_cases(self.test_x, self.test_y)


@dataclass
class VolumeData:
    """A ``dims=3`` study's data: ``train`` and ``test`` sequences of cases, read lazily (see the module)."""

    train: Sequence[dict[str, Any]]
    test: Sequence[dict[str, Any]]
    device: str = "cpu"

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def __getattr__(self, name: str) -> Any:
        if name in ("train_x", "train_y", "test_x", "test_y"):
            raise AttributeError(
                f"a dims=3 study has no data.{name}: its cases are volumes of their own sizes, read one at a time; "
                "use data.train / data.test (sequences of {'image', 'label', 'meta'} dicts), e.g. with "
                "monai.data.Dataset(data.train, transform=...)"
            )
        raise AttributeError(name)


def open_volumes(folder: Path, *, device: str = "cpu") -> VolumeData:
    """The cases of a harmonised ``dims=3`` cache entry (``folder/index.json``); reads the index only."""
    folder = Path(folder)
    index = json.loads((folder / INDEX).read_text())
    cases = index["cases"]
    return VolumeData(
        VolumeCases(folder, [c for c in cases if c["split"] == "train"]),
        VolumeCases(folder, [c for c in cases if c["split"] == "test"]),
        device=device,
    )
