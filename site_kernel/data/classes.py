"""Class names: per-case classes from a CSV, and a dataset's class names mapped onto a contract's ``labels``.

A classification dataset is registered with a CSV in place of a labels folder::

    case,label
    case01,pneumonia
    series_folder_7,normal
    1.2.826.0.1.3680043.8.498.1234,1

``case`` is a NIfTI file's stem, a DICOM series' folder name or its SeriesInstanceUID; ``label`` is a class name
or an integer. At prepare time each class must be named by the contract's ``labels`` (``{"normal": 0,
"pneumonia": 1}``; names compare case-insensitively) or be one of its integer values.

Segmentation label maps read from DICOM SEG carry segment labels ("Liver"). Where a contract names them, segments
take the contract's value for that name, whatever number the SEG gave them, so sites that numbered their segments
differently still agree (:func:`segment_lookup`).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from flip_common.contract import ContractError

from .errors import RegistrationError
from .manifest import CaseEntry

#: A class table larger than this is not a table of cases (16 MiB hold some 200,000 rows keyed by long UIDs).
MAX_TABLE_BYTES = 16 << 20


def is_class_table(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".csv"


def read_class_table(path: Path) -> dict[str, str]:
    """Read ``case,label`` rows into {case: class}. Raises :class:`RegistrationError` naming the row at fault.

    Messages give row numbers, never a case key: keys can be patient folder names.
    """
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise RegistrationError(f"the labels CSV is larger than {MAX_TABLE_BYTES >> 20} MiB; split the dataset")
    try:
        with path.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            if "case" not in columns or "label" not in columns:
                raise RegistrationError(
                    "the labels CSV needs a header row with the columns 'case' and 'label' (e.g. 'case,label')"
                )
            table: dict[str, str] = {}
            for row in reader:
                case = (row.get(columns["case"]) or "").strip()
                label = (row.get(columns["label"]) or "").strip()
                if not case and not label:
                    continue  # blank line
                if not case or not label:
                    raise RegistrationError(
                        f"labels CSV row {reader.line_num} lacks a case or a label; give both or remove the row"
                    )
                if table.get(case, label) != label:
                    raise RegistrationError(
                        f"labels CSV row {reader.line_num} gives a case a second, different "
                        "class; keep one row per case"
                    )
                table[case] = label
    except (UnicodeDecodeError, csv.Error) as e:
        raise RegistrationError(
            f"the labels CSV cannot be read as UTF-8 CSV ({type(e).__name__}); save it as UTF-8 CSV"
        ) from e
    if not table:
        raise RegistrationError("the labels CSV has no rows; add one 'case,label' row per image")
    return table


def class_indices(classes: Iterable[str], labels: Mapping[str, int], dataset: str) -> dict[str, int]:
    """Map each class of ``dataset`` to the contract's integer for it, or raise :class:`ContractError` naming it."""
    by_name = {name.casefold(): value for name, value in labels.items()}
    values = set(labels.values())
    out = {}
    for name in sorted(set(classes)):
        if name.casefold() in by_name:
            out[name] = by_name[name.casefold()]
        elif name.lstrip("-").isdigit() and int(name) in values:
            out[name] = int(name)
        else:
            raise ContractError(
                f"dataset {dataset!r} holds cases of class {name!r}, which the contract's labels do not name; "
                f"add it to labels (they name {sorted(labels)}) or use another dataset",
                key="labels",
                expected=f"a class named {name!r}",
            )
    return out


def segment_lookup(names: Mapping[str, str], labels: Mapping[str, int]) -> np.ndarray | None:
    """A 256-entry table from a SEG's segment numbers to the contract's values, by segment label.

    ``names`` maps segment numbers (as strings, as stored in the manifest) to segment labels. Segments whose label
    the contract names take its value; the others become background. Returns None when no segment label is named:
    then the segment numbers are the label values, as for a NIfTI label map.
    """
    by_name = {name.casefold(): value for name, value in labels.items()}
    matched = {int(number): by_name[label.casefold()] for number, label in names.items() if label.casefold() in by_name}
    if not matched:
        return None
    table = np.zeros(256, np.int64)
    for number, value in matched.items():
        table[number] = value
    return table


def class_counts(cases: list[CaseEntry]) -> dict[str, int]:
    """Cases per class, for the data owner's summary: CSV classes, or label values named by SEG segment labels."""
    counts: Counter[str] = Counter()
    for case in cases:
        if case.get("class_name"):
            counts[str(case.get("class_name"))] += 1
            continue
        names = case.get("label_names", {})
        counts.update(f"{v} ({names[str(v)]})" if names.get(str(v)) else str(v) for v in case["label_values"])
    return dict(sorted(counts.items()))
