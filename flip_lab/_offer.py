"""Does any site offer what a plan's contract asks for? Checked at submit, from the sites' public catalogues.

A contract that asks for a dataset, modality, task or label no site has would otherwise travel to every site,
wait for approval and fail there, one site at a time. The catalogues are the published, aggregate view
(``site_kernel.data.public_catalogue``), so this check sees nothing a researcher may not see.
"""

from __future__ import annotations

from typing import Any

from .errors import PlanError

_DATA_ADD = "flip-site data add NAME FOLDER --site SITE"


def check_offered(contract: dict[str, Any], catalogues: dict[str, dict[str, Any]]) -> None:
    """Raise ``PlanError`` naming the contract's key when no site offers a dataset that matches it.

    ``contract`` is a validated contract (``flip_common.contract.validate_contract``); ``catalogues`` maps
    each site's name to its public catalogue.
    """
    name = contract["dataset"]
    found = {site: cat["datasets"][name] for site, cat in catalogues.items() if name in cat.get("datasets", {})}
    if not found:
        offered = _by_value({site: list(cat.get("datasets", {})) for site, cat in catalogues.items()})
        raise PlanError(
            f"the contract asks for dataset {name!r}; the sites offer {offered or 'no dataset yet'}: change "
            f"`dataset` in the contract, or ask a site's data owner to register one (`{_DATA_ADD}` with NAME "
            f"{name})",
            name="dataset",
        )
    wanted = set(contract["modality"])
    offered_modality = {site: entry.get("modality", []) for site, entry in found.items()}
    found = {site: entry for site, entry in found.items() if wanted & set(offered_modality[site])}
    if not found:
        asked = " or ".join(sorted(wanted))
        raise PlanError(
            f"the contract asks for modality {_quoted(wanted)}; the sites offer {_by_value(offered_modality)} "
            f"(dataset {name!r}): change `modality` in the contract, or ask a site's data owner to register "
            f"{asked} data (`{_DATA_ADD} --modality {min(wanted)}`)",
            name="modality",
        )
    task = contract.get("task", "segmentation")
    offered_task = {site: [entry.get("task", "segmentation")] for site, entry in found.items()}
    found = {site: entry for site, entry in found.items() if entry.get("task", "segmentation") == task}
    if not found:
        raise PlanError(
            f"the contract asks for a {task} dataset; the sites offer {_by_value(offered_task)} (dataset "
            f"{name!r}, modality {_quoted(wanted)}): change `task` in the contract, or ask a site's data owner "
            f"to register {task} data",
            name="task",
        )
    _check_labels(contract, found, task)


def _check_labels(contract: dict[str, Any], found: dict[str, dict[str, Any]], task: str) -> None:
    """Every label the contract names, other than background, must be in some matching site's data.

    A segmentation label counts as offered by its value or by a DICOM SEG segment of the same name (the sites
    map those by name, case-insensitively); a classification label by its class name.
    """
    labels: dict[str, int] = contract["labels"]
    values = {str(v) for entry in found.values() for v in entry.get("label_classes", [])}
    names = {n.lower() for entry in found.values() for ns in entry.get("label_names", {}).values() for n in ns}
    if task == "classification":
        missing = [label for label in labels if label not in values]
    else:
        missing = [
            label
            for label, value in labels.items()
            if value != 0 and str(value) not in values and label.lower() not in names
        ]
    if missing:
        offered = _by_value(
            {
                site: [
                    *map(str, entry.get("label_classes", [])),
                    *(n for ns in entry.get("label_names", {}).values() for n in ns),
                ]
                for site, entry in found.items()
            }
        )
        what = ", ".join(f"{label!r} ({labels[label]})" for label in missing)
        raise PlanError(
            f"the contract asks for label {what}; no site's matching data has it (labels offered: {offered}): "
            f"change `labels` in the contract, or ask a site's data owner to register labelled data "
            f"(`{_DATA_ADD} --labels PATH`)",
            name="labels",
        )


def _by_value(offers: dict[str, list[Any]]) -> str:
    """``CT (st-aldhelm, riverside), MR (northgate)``: each offered value with the sites that offer it."""
    sites_of: dict[str, list[str]] = {}
    for site, values in offers.items():
        for value in values:
            sites_of.setdefault(str(value), []).append(site)
    return ", ".join(f"{value} ({', '.join(sorted(sites))})" for value, sites in sorted(sites_of.items()))


def _quoted(values: set[str]) -> str:
    return " or ".join(repr(v) for v in sorted(values))
