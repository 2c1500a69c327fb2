"""A site's data: registering DICOM/NIfTI datasets, the public catalogue, harmonisation onto a plan's data
contract, and simulated hospitals for teaching and tests.

Nothing here sends anything anywhere: the site kernel decides what leaves the site. ``public_catalogue`` is the
only view written for researchers; manifests, logs and caches stay under the site folder.
"""

from .catalogue import public_catalogue
from .contract import contract_hash, validate_contract
from .demo import DemoSite, generate_demo_hospitals, register_demo_site
from .errors import (
    ContractError,
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
