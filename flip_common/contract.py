"""The data contract a plan declares, checked and completed with defaults before any data is touched.

>>> validate_contract({"modality": "MR", "dims": 2, "size": [64, 64], "spacing": [1.0, 1.0],
...                    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
...                    "labels": {"background": 0, "lesion": 1}})["orientation"]
'RAS'

Keys (unknown keys are refused, so a typo cannot silently change a study):

- ``modality``: ``"CT"``, ``"MR"``, ... or a list of them; a dataset of another modality is refused.
- ``dims``: ``2``: the site returns axial slices ([N, 1, H, W]). Every slice of every case is used (not only
  slices with a lesion), so the class balance of the data reaches the researcher as it is.
  ``3``: the site returns whole volumes, one case at a time (``data.train`` / ``data.test``, sequences of
  ``{"image": [1, X, Y, Z], "label": [1, X, Y, Z], "meta": ...}``), read lazily from the site's cache.
- ``size``: ``dims=2``: ``[H, W]`` output slice size in pixels (after resampling, centred crop or pad).
  ``dims=3``: ``[X, Y, Z]`` voxels (centred crop or pad), or left out (or ``None``): each case keeps its native
  extent after resampling, as patch training wants.
- ``spacing``: ``dims=2``: ``[row, column]`` in-plane pixel size in mm; slice thickness is kept. ``dims=3``:
  ``[x, y, z]`` voxel size in mm along the three output axes.
- ``orientation``: axis codes of the output (default ``"RAS"``); slices run along the third axis.
- ``intensity``: ``{"kind": "percentile", "lower": 1, "upper": 99}`` (per volume, to [0, 1], clipped),
  ``{"kind": "zscore"}`` (per volume, over all its voxels), or
  ``{"kind": "window", "center": 40, "width": 400}`` (fixed window to [0, 1], clipped).
- ``labels``: class name -> integer value, e.g. ``{"background": 0, "lesion": 1}``; must include 0. Label values
  of the site's data that the contract does not name become background. Segments of a DICOM SEG whose segment
  label the contract names (case-insensitively) take that name's value.
- ``task``: ``"segmentation"`` (default: ``train_y`` holds label maps [N, H, W]) or ``"classification"``
  (``train_y`` holds class indices [N]; with ``dims=2`` every slice of a case carries the case's class). For
  classification ``labels`` names every class of the dataset and numbers them 0 .. C-1, e.g.
  ``{"normal": 0, "pneumonia": 1}``; a class of the data that it does not name is an error at prepare time.
- ``dataset``: which registered dataset to use (default ``"default"``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .errors import FixedBy, FlipError


class ContractError(FlipError, ValueError):
    """A data contract is malformed or asks for something this site cannot provide.

    ``key`` is the contract key at fault (``"intensity.kind"``), ``expected`` what would have been accepted.
    """

    def __init__(self, message: str, *, key: str = "", expected: str = "", fixed_by: FixedBy = "researcher") -> None:
        super().__init__(message)
        self.key = key
        self.expected = expected
        self.fixed_by: FixedBy = fixed_by


DEFAULTS: dict[str, Any] = {"orientation": "RAS", "dataset": "default"}
REQUIRED = ("modality", "dims", "size", "spacing", "intensity", "labels")
DIMS = (2, 3)
TASKS = ("segmentation", "classification")
KNOWN = frozenset(REQUIRED) | frozenset(DEFAULTS) | {"task"}
_AXES = ({"R", "L"}, {"A", "P"}, {"S", "I"})


def validate_contract(contract: Mapping[str, Any]) -> dict[str, Any]:
    """Return a normalised copy of ``contract`` (defaults filled in) or raise :class:`ContractError`."""
    if not isinstance(contract, Mapping):
        raise ContractError(f"a data contract is a dict, got {type(contract).__name__}", expected="dict")
    unknown = sorted(set(contract) - KNOWN)
    if unknown:
        raise ContractError(
            f"unknown data contract key(s) {unknown}; allowed keys are {sorted(KNOWN)}",
            key=unknown[0],
            expected=", ".join(sorted(KNOWN)),
        )
    # A volumetric contract may leave out ``size``: its cases keep their native extent after resampling.
    native = contract.get("dims") == 3 and contract.get("size") is None
    missing = [k for k in REQUIRED if k not in contract and not (k == "size" and native)]
    if missing:
        raise ContractError(
            f"data contract lacks {missing}; e.g. {{'modality': 'MR', 'dims': 2, 'size': [64, 64], "
            "'spacing': [1.0, 1.0], 'intensity': {'kind': 'percentile', 'lower': 1, 'upper': 99}, "
            "'labels': {'background': 0, 'lesion': 1}}",
            key=missing[0],
            expected="present",
        )
    out = {**DEFAULTS, **contract}
    out["modality"] = _modality(out["modality"])
    if out["dims"] not in DIMS or isinstance(out["dims"], bool):
        raise ContractError(
            f"dims={out['dims']!r} is not supported; use dims=2 (axial slices) or dims=3 (volumes)",
            key="dims",
            expected="2 | 3",
        )
    axes = out["dims"]
    if native:
        out["size"] = None
    else:
        out["size"] = [_number(v, "size", int, 8, 1024) for v in _axes(out["size"], "size", axes)]
    out["spacing"] = [_number(v, "spacing", float, 0.01, 50.0) for v in _axes(out["spacing"], "spacing", axes)]
    out["orientation"] = _orientation(out["orientation"])
    out["intensity"] = _intensity(out["intensity"])
    # The default task is left out of the normalised form, so contracts written before ``task`` existed keep
    # their hash (plan approvals and harmonised caches are keyed by it).
    task = out.pop("task", "segmentation")
    if task not in TASKS:
        raise ContractError(f"task must be one of {list(TASKS)}, got {task!r}", key="task", expected=" | ".join(TASKS))
    if task == "classification":
        out["task"] = task
        out["labels"] = _class_labels(out["labels"])
    else:
        out["labels"] = _labels(out["labels"])
    if not isinstance(out["dataset"], str) or not out["dataset"]:
        raise ContractError("dataset must be a non-empty name such as 'default'", key="dataset", expected="str")
    return out


def contract_hash(contract: Mapping[str, Any]) -> str:
    """sha256 of the normalised contract, so equivalent spellings share one cache entry."""
    canonical = json.dumps(validate_contract(contract), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _modality(value: Any) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) and v for v in values):
        raise ContractError(
            f"modality must be a name like 'MR' or a list like ['CT', 'MR'], got {value!r}",
            key="modality",
            expected="str or list[str]",
        )
    return sorted({v.upper() for v in values})


def _axes(value: Any, key: str, dims: int) -> list[Any]:
    """A value per output axis: ``[rows, columns]`` for slices, ``[x, y, z]`` for volumes."""
    if not isinstance(value, (list, tuple)) or len(value) != dims:
        shape = "a pair [rows, columns]" if dims == 2 else "three values [x, y, z]"
        hint = "" if dims == 2 or key != "size" else " (or leave size out to keep each case's extent)"
        raise ContractError(
            f"{key} must be {shape} for dims={dims}, got {value!r}{hint}",
            key=key,
            expected="[a, b]" if dims == 2 else "[x, y, z]",
        )
    return list(value)


def _number(value: Any, key: str, kind: type, low: float, high: float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ContractError(f"{key} values must be {kind.__name__}s, got {value!r}", key=key, expected=kind.__name__)
    if not low <= value <= high:
        raise ContractError(
            f"{key} values must lie in [{low}, {high}], got {value!r}", key=key, expected=f"[{low}, {high}]"
        )
    return kind(value)


def _orientation(value: Any) -> str:
    ok = (
        isinstance(value, str) and len(value) == 3 and all(sum(c.upper() in axis for c in value) == 1 for axis in _AXES)
    )
    if not ok:
        raise ContractError(
            f"orientation must be three axis codes, one of R/L, A/P, S/I each (e.g. 'RAS'), got {value!r}",
            key="orientation",
            expected="e.g. 'RAS'",
        )
    return str(value).upper()


def _intensity(value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping) or "kind" not in value:
        raise ContractError("intensity must be a dict with a 'kind'", key="intensity", expected="{'kind': ...}")
    kind = value["kind"]
    allowed = {"percentile": {"lower", "upper"}, "zscore": set(), "window": {"center", "width"}}
    if kind not in allowed:
        raise ContractError(
            f"intensity.kind {kind!r} is unknown; use one of {sorted(allowed)}",
            key="intensity.kind",
            expected=" | ".join(sorted(allowed)),
        )
    extra = sorted(set(value) - allowed[kind] - {"kind"})
    if extra:
        raise ContractError(
            f"intensity kind {kind!r} takes no {extra}",
            key=f"intensity.{extra[0]}",
            expected=str(sorted(allowed[kind])),
        )
    if kind == "percentile":
        lower = _number(value.get("lower", 1.0), "intensity.lower", float, 0.0, 100.0)
        upper = _number(value.get("upper", 99.0), "intensity.upper", float, 0.0, 100.0)
        if lower >= upper:
            raise ContractError(
                f"intensity.lower ({lower}) must be below intensity.upper ({upper})",
                key="intensity.lower",
                expected="lower < upper",
            )
        return {"kind": kind, "lower": lower, "upper": upper}
    if kind == "window":
        for key in ("center", "width"):
            if key not in value:
                raise ContractError(f"intensity kind 'window' needs {key!r}", key=f"intensity.{key}", expected="number")
        return {
            "kind": kind,
            "center": _number(value["center"], "intensity.center", float, -1e6, 1e6),
            "width": _number(value["width"], "intensity.width", float, 1e-6, 1e6),
        }
    return {"kind": kind}


def _labels(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping) or not value:
        raise ContractError(
            "labels must map class names to integers, e.g. {'background': 0, 'lesion': 1}",
            key="labels",
            expected="dict[str, int]",
        )
    out = {}
    for name, index in value.items():
        if not isinstance(name, str):
            raise ContractError(f"label names must be strings, got {name!r}", key="labels", expected="str")
        out[name] = _number(index, f"labels.{name}", int, 0, 255)
    if 0 not in out.values():
        raise ContractError("labels must give background the value 0", key="labels", expected="a class = 0")
    if len(set(out.values())) != len(out):
        raise ContractError("labels must give each class its own value", key="labels", expected="unique values")
    return out


def _class_labels(value: Any) -> dict[str, int]:
    """Classification labels: at least two classes, numbered 0 .. C-1 as a classifier's outputs are."""
    if not isinstance(value, Mapping) or len(value) < 2:
        raise ContractError(
            "a classification contract's labels name at least two classes, e.g. {'normal': 0, 'pneumonia': 1}",
            key="labels",
            expected="dict[str, int], 2+ classes",
        )
    out = {}
    for name, index in value.items():
        if not isinstance(name, str) or not name:
            raise ContractError(f"class names must be non-empty strings, got {name!r}", key="labels", expected="str")
        out[name] = _number(index, f"labels.{name}", int, 0, 255)
    if sorted(out.values()) != list(range(len(out))):
        raise ContractError(
            f"a classification contract numbers its classes 0 .. {len(out) - 1}, one each, got {sorted(out.values())}",
            key="labels",
            expected=f"values 0 .. {len(out) - 1}",
        )
    return out
