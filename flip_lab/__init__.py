"""FLIP Lab: federated learning on medical images from a notebook.

>>> import flip_lab
>>> fed = flip_lab.local_federation(n_sites=3)           # doctest: +SKIP
>>> plan = flip_lab.Plan.from_file("my_plan.py")          # or @plan.model / @plan.train / @plan.evaluate
>>> job = fed.submit(plan, rounds=3, strategy="fedavg")   # doctest: +SKIP
>>> job.wait(); job.history                                # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError, FederationError, FlipError, HubUnreachable, JobFailed, JobTimeout, PlanError
from .federation import Federation, connect
from .job import Job
from .plan import BuiltPlan, Plan

__version__ = "0.1.0"


def local_federation(n_sites: int = 3, **kwargs: Any) -> Any:
    """Start a hub and ``n_sites`` simulated hospitals on 127.0.0.1 (see ``flip_lab.local.LocalFederation.start``)."""
    from .local import LocalFederation

    return LocalFederation.start(n_sites, **kwargs)


def attach(workdir: str | Path) -> Any:
    """Use a local federation already running in ``workdir`` (e.g. one started with ``flip-lab up``)."""
    from .local import LocalFederation

    return LocalFederation.attach(workdir)


__all__ = [
    "BuiltPlan",
    "ConfigError",
    "Federation",
    "FederationError",
    "FlipError",
    "HubUnreachable",
    "Job",
    "JobFailed",
    "JobTimeout",
    "Plan",
    "PlanError",
    "attach",
    "connect",
    "local_federation",
]
