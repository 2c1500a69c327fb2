"""The public catalogue: what a researcher may learn about a site's datasets before proposing a study.

Counts below ``min_count`` are shown as ``"<k"``; ranges and vendor names are shown only where enough cases stand
behind them; quarantined inputs are counted by reason. No identifier, file name, date or pixel leaves here.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from .errors import REASON_TEXT
from .manifest import CaseEntry, list_datasets, read_manifest


def public_catalogue(site_dir: Path, *, min_count: int = 5) -> dict[str, Any]:
    """Describe every registered dataset of ``site_dir`` in terms safe to publish.

    Per dataset: the task (``"segmentation"`` or ``"classification"``), modalities, case/slice counts (``"<k"``
    below ``min_count``), shape and spacing ranges and vendors (only where at least ``min_count`` cases stand
    behind them), label classes with the number of cases showing each (label values, with DICOM SEG segment labels
    in ``label_names``; class names for classification), and skipped files by reason
    (``"3 files skipped: unreadable (neither DICOM nor NIfTI)"``).
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    datasets = {}
    for name in list_datasets(site_dir):
        manifest = read_manifest(site_dir, name)
        datasets[name] = _describe(manifest["cases"], manifest["skipped"], min_count)
        datasets[name]["task"] = manifest.get("task", "segmentation")
    return {"min_count": min_count, "datasets": datasets}


def _describe(cases: list[CaseEntry], skipped: dict[str, int], k: int) -> dict[str, Any]:
    def count(n: int) -> int | str:
        return n if n >= k or n == 0 else f"<{k}"

    enough = len(cases) >= k
    vendors = Counter(case["vendor"] for case in cases)
    shown = sorted(v for v, n in vendors.items() if n >= k and v != "unknown")
    if len(shown) < len(vendors) and shown:
        shown.append("other")
    label_classes: list[Any]
    if any(case.get("class_name") for case in cases):
        per_class = Counter(str(case.get("class_name")) for case in cases)
        label_classes = sorted(per_class)
    else:
        values = Counter(value for case in cases for value in set(case["label_values"]))
        label_classes = sorted(values)
        per_class = Counter({str(value): n for value, n in values.items()})
    names: dict[str, set[str]] = {}
    for case in cases:
        for value, name in case.get("label_names", {}).items():
            names.setdefault(value, set()).add(name)
    entry: dict[str, Any] = {
        "modality": sorted({case["modality"] for case in cases}),
        "cases": count(len(cases)),
        "train_cases": count(sum(case["split"] == "train" for case in cases)),
        "test_cases": count(sum(case["split"] == "test" for case in cases)),
        "slices": count(sum(case["shape"][2] for case in cases)),
        "labelled": any(case["label"] or case.get("class_name") for case in cases),
        "label_classes": label_classes,
        "cases_per_class": {str(c): count(per_class[str(c)]) for c in label_classes},
        "label_names": {value: sorted(found) for value, found in sorted(names.items(), key=lambda i: int(i[0]))},
        "vendors": shown,
        "shape_range": _range([case["shape"] for case in cases]) if enough else f"hidden (<{k} cases)",
        "spacing_range_mm": _range([case["spacing"] for case in cases]) if enough else f"hidden (<{k} cases)",
        "skipped_files": dict(skipped),
        "skipped": [f"{n} file{'s' if n != 1 else ''} skipped: {REASON_TEXT.get(r, r)}" for r, n in skipped.items()],
    }
    return entry


def _range(rows: list[list[Any]]) -> dict[str, list[float]]:
    columns = list(zip(*rows, strict=True))
    return {"min": [min(c) for c in columns], "max": [max(c) for c in columns]}
