"""A site's data: registering DICOM/NIfTI datasets, the public catalogue, harmonisation onto a plan's data
contract, and simulated hospitals for teaching and tests.

Nothing here sends anything anywhere: the site kernel decides what leaves the site. ``public_catalogue`` is the
only view written for researchers; manifests, logs and caches stay under the site folder.

The simulated hospitals (``DemoSite``, ``generate_demo_hospitals``, ``register_demo_site``) are imported on first
use: their scanners are MONAI transforms, and a data owner registering or listing data should not wait seconds for
torch and MONAI to load. Harmonisation imports them inside ``prepare`` for the same reason.
"""

from typing import TYPE_CHECKING, Any

from flip_common.contract import ContractError, contract_hash, validate_contract

from .catalogue import public_catalogue
from .errors import (
    DataError,
    DatasetNotFound,
    DatasetUnusable,
    HarmonisationError,
    InputRejected,
    RegistrationError,
)
from .ingest import DatasetSummary, register_dataset
from .manifest import list_datasets
from .prepare import PreparedData, harmonisation_report, prepare
from .steps import SiteStep, build_steps, register_step

if TYPE_CHECKING:
    from .demo import DemoSite, generate_demo_hospitals, register_demo_site

_DEMO = ("DemoSite", "generate_demo_hospitals", "register_demo_site")


def __getattr__(name: str) -> Any:
    if name in _DEMO:
        from . import demo

        return getattr(demo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ContractError",
    "DataError",
    "DatasetNotFound",
    "DatasetSummary",
    "DatasetUnusable",
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
