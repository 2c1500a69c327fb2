"""A site's data: registering DICOM/NIfTI datasets, the public catalogue, harmonisation onto a plan's data
contract, and simulated hospitals for teaching and tests.

Nothing here sends anything anywhere: the site kernel decides what leaves the site. ``public_catalogue`` is the
only view written for researchers; manifests, logs and caches stay under the site folder.

Each name is imported when first used: ``public_catalogue`` (what a site's executor answers a directory request
with) needs the manifests only, not the harmonisation stack (MONAI and torch, some 350 MiB and seconds to
import) that ``demo`` and ``prepare`` bring, and a site daemon should neither hold that nor wait for it.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalogue import public_catalogue
    from .contract import contract_hash, validate_contract
    from .demo import DemoSite, generate_demo_hospitals, register_demo_site
    from .errors import (
        ContractError,
        DataError,
        DatasetNotFound,
        HarmonisationError,
        InputRejected,
        RegistrationError,
    )
    from .ingest import DatasetSummary, register_dataset
    from .manifest import list_datasets
    from .prepare import PreparedData, harmonisation_report, prepare
    from .steps import SiteStep, build_steps, register_step

_WHERE = {
    "public_catalogue": "catalogue",
    "contract_hash": "contract",
    "validate_contract": "contract",
    "DemoSite": "demo",
    "generate_demo_hospitals": "demo",
    "register_demo_site": "demo",
    "ContractError": "errors",
    "DataError": "errors",
    "DatasetNotFound": "errors",
    "HarmonisationError": "errors",
    "InputRejected": "errors",
    "RegistrationError": "errors",
    "DatasetSummary": "ingest",
    "register_dataset": "ingest",
    "list_datasets": "manifest",
    "PreparedData": "prepare",
    "harmonisation_report": "prepare",
    "prepare": "prepare",
    "SiteStep": "steps",
    "build_steps": "steps",
    "register_step": "steps",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; where a function has the submodule's name (``prepare``),
    the package keeps the function, as it did when this file imported everything eagerly."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "ContractError",
    "DataError",
    "DatasetNotFound",
    "DatasetSummary",
    "DemoSite",
    "HarmonisationError",
    "InputRejected",
    "PreparedData",
    "RegistrationError",
    "SiteStep",
    "build_steps",
    "contract_hash",
    "generate_demo_hospitals",
    "harmonisation_report",
    "list_datasets",
    "prepare",
    "public_catalogue",
    "register_dataset",
    "register_demo_site",
    "register_step",
    "validate_contract",
]
