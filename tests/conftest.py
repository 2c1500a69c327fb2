"""Shared fixtures: a real local federation (hub + site kernels on 127.0.0.1), started once per module that asks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PLANS = Path(__file__).parent / "plans"

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
# One home per xdist worker: modules run in parallel processes and must not share job stores or federations.
os.environ.setdefault(
    "FLIP_LAB_HOME",
    str(Path(__file__).resolve().parent.parent / ".flip" / "home" / os.environ.get("PYTEST_XDIST_WORKER", "main")),
)

# Modules that start real federations, Jupyter or Chromium, longest first. ``./run test`` runs the suite in parallel
# processes, one module per process at a time (xdist's ``--dist loadfile``), and hands modules out in collection
# order: starting the long ones first keeps one long module from running alone at the end.
LONG_MODULES = (
    "test_notebooks",
    "test_e2e_hub_restart",
    "test_secagg",
    "test_multihost",
    "test_e2e_faults",
    "test_governance_battery",
    "test_daily_messages",
    "test_governance_concurrency",
    "test_governance_worker",
    "test_governance_hub",
    "test_directory",
    "test_packaging",
    "test_lab_ui",
    "test_privacy",
    "test_server_manager",
    "test_data_benchmark",
    "test_e2e_spine",
    "test_e2e_volumes",
    "test_e2e_approval",
    "test_server_handlers",
    "test_local_lifecycle",
    "test_provision",
    "test_pace",
    "test_sandbox",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a module is kept


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Three small simulated hospitals behind a real SuperLink; stopped by PID after the module."""
    import flip_lab

    fed = flip_lab.local_federation(3, workdir=tmp_path_factory.mktemp("federation"), scale=0.3)
    yield fed
    fed.shutdown()


@pytest.fixture
def tiny_plan():
    import flip_lab

    return flip_lab.Plan.from_file(PLANS / "tiny_plan.py")
