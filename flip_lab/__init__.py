"""FLIP Lab: federated learning on medical images from a notebook.

>>> import flip_lab
>>> fed = flip_lab.local_federation(n_sites=3)           # doctest: +SKIP
>>> plan = flip_lab.Plan.from_file("my_plan.py")          # or @plan.model / @plan.train / @plan.evaluate
>>> job = fed.submit(plan, rounds=3, strategy="fedavg")   # doctest: +SKIP
>>> job.wait(); job.history                                # doctest: +SKIP

Names are imported on first use, so the hub and the site kernels (which share a few private modules with this
package) do not pay for pandas, matplotlib or ipywidgets.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "BuiltPlan": "plan",
    "Plan": "plan",
    "ConfigError": "errors",
    "FederationError": "errors",
    "FlipError": "errors",
    "HubUnreachable": "errors",
    "JobFailed": "errors",
    "JobTimeout": "errors",
    "PlanCheckFailed": "errors",
    "PlanCheckWarning": "errors",
    "PlanError": "errors",
    "Federation": "federation",
    "connect": "federation",
    "Job": "job",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'flip_lab' has no attribute {name!r}")


def local_federation(n_sites: int = 3, **kwargs: Any) -> Any:
    """Start a hub and ``n_sites`` simulated hospitals on 127.0.0.1 (see ``flip_lab.local.LocalFederation.start``).

    In JupyterLab, while the FLIP panel runs a local federation, a notebook uses that one instead of starting a
    second beside it (its ``shutdown()`` then leaves it running for the panel). Give ``workdir`` to start a
    federation of your own anyway. Outside Lab (papermill, plain Python) a new federation always starts.
    """
    from .local import LocalFederation, panel_federation

    if not kwargs.get("workdir") and (joined := panel_federation()) is not None:
        n = len(joined.site_dirs)
        print(
            f"Using the local federation of the FLIP Lab panel: a hub at {joined.address} and {n} simulated "
            f"hospital{'s' if n != 1 else ''} (stop it from the panel)."
        )
        return joined
    return LocalFederation.start(n_sites, **kwargs)


def attach(workdir: str | Path) -> Any:
    """Use a local federation already running in ``workdir`` (e.g. one started with ``flip-lab up``)."""
    from .local import LocalFederation

    return LocalFederation.attach(workdir)


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext flip_lab``: the ``%%flip_plan`` cell magic."""
    from .magic import load_ipython_extension as load

    load(ipython)


__all__ = [*sorted(_EXPORTS), "attach", "local_federation"]  # noqa: PLE0604 - _EXPORTS is keyed by name
