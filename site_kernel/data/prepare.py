"""``prepare``: a registered dataset harmonised onto a plan's data contract, as training and test arrays.

>>> data = prepare(site_dir, CONTRACT, site_steps=[{"kind": "ct_window", "center": 40, "width": 400}])
>>> data.train_x.shape, data.train_y.dtype
((492, 1, 64, 64), dtype('int64'))

A ``dims=3`` contract gives :class:`PreparedVolumes` instead: each case harmonised once into the site's cache as
memory-mappable ``.npy`` files, read lazily through ``.train`` / ``.test``.

With ``"task": "classification"`` in the contract, ``train_y``/``test_y`` are class indices int64 [N] from the
contract's ``labels``: each slice carries its case's class (:mod:`site_kernel.data.classes`).

The first call reads every case, applies the site's steps then the contract (:mod:`site_kernel.data.harmonise`)
and caches the result (:mod:`site_kernel.data.cache`); later calls with the same contract, data and site steps
load it. ``stats`` holds aggregate intensity histograms before and after harmonisation: numbers over all of the
dataset's voxels, safe to show the researcher (:func:`harmonisation_report`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from flip_common.contract import ContractError, contract_hash, validate_contract
from flip_common.sitedata import VolumeData, open_volumes

from . import cache
from .classes import class_indices, segment_lookup
from .errors import DataError, DatasetUnusable, InputRejected
from .manifest import Manifest, load_case, manifest_hash, read_manifest
from .sitelog import site_log
from .steps import build_steps

#: How much of harmonisation runs: ``"geometric"`` and ``"none"`` exist for the heterogeneity benchmark.
Mode = Literal["full", "geometric", "none"]
MODES: tuple[str, ...] = ("full", "geometric", "none")

HISTOGRAM_BINS = 32
_SAMPLE = 4096  # voxels per case kept for the aggregate histograms


@dataclass
class PreparedData:
    """Harmonised slices: images float32 ``[N, 1, H, W]``; label maps int64 ``[N, H, W]``, or class indices int64
    ``[N]`` for a classification contract."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)
    cache_key: str = ""
    from_cache: bool = False

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_x.shape[0])


@dataclass
class PreparedVolumes:
    """A ``dims=3`` dataset harmonised into the site's cache: ``folder`` holds one ``.npy`` image and label per
    case and an ``index.json`` (:mod:`site_kernel.data.cache`). ``train``/``test`` read the cases lazily, as the
    worker does (:mod:`flip_common.sitedata`)."""

    folder: Path
    stats: dict[str, Any] = field(default_factory=dict)
    cache_key: str = ""
    from_cache: bool = False

    def data(self, device: str = "cpu") -> VolumeData:
        return open_volumes(self.folder, device=device)

    @property
    def train(self) -> Sequence[dict[str, Any]]:
        return self.data().train

    @property
    def test(self) -> Sequence[dict[str, Any]]:
        return self.data().test

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)


def prepare(
    site_dir: Path,
    contract: Mapping[str, Any],
    *,
    site_steps: Sequence[Mapping[str, Any]] | None = None,
    harmonise: Mode = "full",
) -> PreparedData | PreparedVolumes:
    """Harmonise dataset ``contract["dataset"]`` of ``site_dir`` onto ``contract`` (cached).

    ``site_steps`` come from the site's settings and run first. ``harmonise`` is ``"full"`` for studies;
    ``"geometric"`` and ``"none"`` exist for benchmarks. Raises :class:`ContractError` when the contract is
    malformed or the dataset cannot satisfy it, :class:`DatasetNotFound` when no such dataset is registered,
    :class:`DatasetUnusable` when none of its cases can be read any more. Every failure is also written to the
    site's ``logs/data.log`` with its cause, for the data owner.
    """
    dataset = contract.get("dataset", "-") if isinstance(contract, Mapping) else "-"
    try:
        return _prepare(site_dir, contract, site_steps, harmonise)
    except (DataError, ContractError) as error:
        site_log(
            site_dir,
            f"dataset={dataset} prepare failed ({type(error).__name__}, "
            f"to be fixed by the {error.fixed_by.replace('_', ' ')}): {error}",
        )
        raise
    except Exception as error:
        site_log(site_dir, f"dataset={dataset} prepare failed ({type(error).__name__}): {error}")
        raise


def _prepare(
    site_dir: Path,
    contract: Mapping[str, Any],
    site_steps: Sequence[Mapping[str, Any]] | None,
    harmonise: Mode,
) -> PreparedData | PreparedVolumes:
    spec = validate_contract(contract)
    if harmonise not in MODES:
        raise ContractError(f"harmonise must be one of {list(MODES)}, got {harmonise!r}", key="harmonise")
    manifest = read_manifest(site_dir, spec["dataset"])
    _check_dataset(manifest, spec)
    classify = spec.get("task") == "classification"
    # Every class is checked against the contract before any case is read, so a mismatch costs nothing.
    classes = (
        class_indices([str(c.get("class_name")) for c in manifest["cases"]], spec["labels"], manifest["name"])
        if classify
        else {}
    )
    steps = build_steps(site_steps)
    key = cache.cache_key(spec, manifest_hash(manifest), [s.spec() for s in steps], harmonise)
    if spec["dims"] == 3:
        return _prepare_volumes(site_dir, spec, manifest, steps, harmonise, key, classes)
    hit = cache.load(site_dir, key)
    if hit is not None:
        arrays, meta = hit
        return PreparedData(**arrays, stats=meta["stats"], cache_key=key, from_cache=True)
    # torch and MONAI (about 5 s of CPU to import): only harmonising pays for them, not a study that finds the cache
    from .harmonise import harmonise_case

    parts: dict[str, list[np.ndarray]] = {name: [] for name in cache.ARRAYS}
    before: list[np.ndarray] = []
    skipped: list[str] = []
    for case, volume, label in _read_cases(site_dir, manifest, spec, skipped):
        before.append(_sample(volume.array))
        slices, maps = harmonise_case(volume, None if classify else label, spec, steps=steps, mode=harmonise)
        if classify:
            maps = np.full(len(slices), classes[str(case.get("class_name"))], np.int64)
        parts[f"{case['split']}_x"].append(slices)
        parts[f"{case['split']}_y"].append(maps)
    _check_some_read(manifest, skipped)
    height, width = spec["size"]
    empty_y = (0,) if classify else (0, height, width)
    arrays = {
        name: np.concatenate(chunks)
        if chunks
        else np.zeros(
            (0, 1, height, width) if name.endswith("x") else empty_y,
            np.float32 if name.endswith("x") else np.int64,
        )
        for name, chunks in parts.items()
    }
    after = np.concatenate([arrays["train_x"].ravel(), arrays["test_x"].ravel()])
    stats = _stats(np.concatenate(before) if before else np.zeros(0), after[:: max(1, after.size // 200_000)])
    stats.update(
        cases=len(manifest["cases"]) - len(skipped),
        skipped_cases=len(skipped),
        slices=int(after.size // (height * width)),
    )
    cache.store(site_dir, key, arrays, {"stats": stats, "contract": spec, "mode": harmonise})
    site_log(
        site_dir,
        f"dataset={manifest['name']} prepared contract={contract_hash(spec)[:12]} mode={harmonise} "
        f"train={arrays['train_x'].shape[0]} test={arrays['test_x'].shape[0]} skipped={len(skipped)}",
    )
    return PreparedData(**arrays, stats=stats, cache_key=key, from_cache=False)


def _prepare_volumes(
    site_dir: Path,
    spec: dict[str, Any],
    manifest: Manifest,
    steps: list[Any],
    harmonise: Mode,
    key: str,
    classes: dict[str, int],
) -> PreparedVolumes:
    """``dims=3``: harmonise each case once into the cache, one at a time; memory holds one case, not the dataset."""
    meta = cache.load_volumes(site_dir, key)
    if meta is not None:
        return PreparedVolumes(cache.entry_dir(site_dir, key), meta["stats"], key, from_cache=True)
    from .harmonise import harmonise_volume

    classify = spec.get("task") == "classification"
    writer = cache.VolumeWriter(site_dir, key)
    before: list[np.ndarray] = []
    after: list[np.ndarray] = []
    skipped: list[str] = []
    try:
        for case, volume, label in _read_cases(site_dir, manifest, spec, skipped):
            before.append(_sample(volume.array))
            image, label_out, affine = harmonise_volume(
                volume, None if classify else label, spec, steps=steps, mode=harmonise
            )
            after.append(_sample(image))
            index = classes[str(case.get("class_name"))] if classify else None
            writer.add(str(case["split"]), image, None if classify else label_out, affine, index)
            del volume, label, image, label_out
        _check_some_read(manifest, skipped)
        stats = _stats(
            np.concatenate(before) if before else np.zeros(0), np.concatenate(after) if after else np.zeros(0)
        )
        stats.update(cases=len(writer.cases), skipped_cases=len(skipped))
        folder = writer.commit({"stats": stats, "contract": spec, "mode": harmonise})
    except BaseException:
        writer.abort()
        raise
    site_log(
        site_dir,
        f"dataset={manifest['name']} prepared contract={contract_hash(spec)[:12]} mode={harmonise} dims=3 "
        f"train={writer.counts.get('train', 0)} test={writer.counts.get('test', 0)} skipped={len(skipped)}",
    )
    return PreparedVolumes(folder, stats, key, from_cache=False)


def _read_cases(
    site_dir: Path, manifest: Manifest, spec: dict[str, Any], skipped: list[str]
) -> Iterator[tuple[dict[str, Any], Any, np.ndarray | None]]:
    """Each readable case with its image and its label mapped onto the contract's segment names; a case whose files
    changed or vanished since registration is logged for the data owner and appended to ``skipped``."""
    for case in manifest["cases"]:
        try:
            volume, label = load_case(case)
        except (InputRejected, OSError) as error:  # a file changed or vanished since registration
            site_log(
                site_dir,
                f"dataset={manifest['name']} case={case['id']} skipped in prepare: {type(error).__name__}: {error}",
            )
            skipped.append(str(case["id"]))
            continue
        except Exception as error:  # unexpected trouble with one case: name it for the data owner, then stop
            site_log(site_dir, f"dataset={manifest['name']} case={case['id']} failed: {type(error).__name__}: {error}")
            raise DataError(
                f"case {case['id']} of dataset {manifest['name']!r} could not be read "
                f"({type(error).__name__}); see the site's data.log"
            ) from error
        lookup = segment_lookup(case.get("label_names", {}), spec["labels"])
        if label is not None and lookup is not None:
            label = lookup[label]
        yield case, volume, label


def _check_some_read(manifest: Manifest, skipped: list[str]) -> None:
    if manifest["cases"] and len(skipped) == len(manifest["cases"]):
        raise DatasetUnusable(
            f"no case of dataset {manifest['name']!r} can be read any more (files moved, edited or damaged since "
            "registration); its data owner must register it again (flip-site data add)"
        )


def harmonisation_report(
    site_dir: Path, contract: Mapping[str, Any], *, site_steps: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """Aggregate intensity histograms before/after harmonisation (numbers only), for the researcher's plots."""
    return prepare(site_dir, contract, site_steps=site_steps).stats


def _check_dataset(manifest: Manifest, spec: dict[str, Any]) -> None:
    found = sorted({case["modality"] for case in manifest["cases"]})
    refused = [m for m in found if m not in spec["modality"]]
    if "UNKNOWN" in refused:  # NIfTI without a sidecar: only the site knows what scanner made it
        raise ContractError(
            f"dataset {manifest['name']!r} has images of unknown modality; register it again with --modality "
            "(flip-site data add NAME PATH --modality CT)",
            key="modality",
            expected=str(spec["modality"]),
            fixed_by="data_owner",
        )
    if refused:
        raise ContractError(
            f"dataset {manifest['name']!r} holds {refused} images but the contract asks for {spec['modality']}; "
            "widen the contract's modality or pick another dataset",
            key="modality",
            expected=str(found),
        )
    if spec.get("task") == "classification":
        if manifest.get("task") != "classification":
            raise ContractError(
                f"dataset {manifest['name']!r} has no per-case classes, so it cannot serve a classification "
                "contract; register it with a CSV of classes (flip-site data add NAME PATH --labels cases.csv)",
                key="task",
                expected="a dataset registered with a labels CSV",
            )
        return
    if manifest.get("task") == "classification":
        raise ContractError(
            f"dataset {manifest['name']!r} holds per-case classes, not label maps; declare "
            "'task': 'classification' in the contract or pick a dataset with label maps",
            key="task",
            expected="classification",
        )
    if len(spec["labels"]) > 1 and not manifest["labelled"]:
        raise ContractError(
            f"dataset {manifest['name']!r} has no label maps, so it cannot serve a segmentation contract",
            key="labels",
            expected="a labelled dataset",
        )


def _sample(array: np.ndarray) -> np.ndarray:
    flat = array.ravel()
    return flat[:: max(1, flat.size // _SAMPLE)].astype(np.float32)


def _stats(before: np.ndarray, after: np.ndarray) -> dict[str, Any]:
    return {"bins": HISTOGRAM_BINS, "before": _histogram(before), "after": _histogram(after)}


def _histogram(values: np.ndarray) -> dict[str, Any]:
    """Density over the 0.5-99.5 percentile range: aggregate shape of the intensities, no single voxel."""
    if values.size == 0:
        return {"edges": [], "density": [], "percentiles": {}}
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    if hi <= lo:
        hi = lo + 1.0
    density, edges = np.histogram(np.clip(values, lo, hi), bins=HISTOGRAM_BINS, range=(lo, hi), density=True)
    pct = np.percentile(values, [1, 25, 50, 75, 99])
    return {
        "edges": [round(float(e), 5) for e in edges],
        "density": [round(float(d), 6) for d in density],
        "percentiles": {str(p): round(float(v), 5) for p, v in zip((1, 25, 50, 75, 99), pct, strict=True)},
        "mean": round(float(values.mean()), 5),
        "std": round(float(values.std()), 5),
    }
