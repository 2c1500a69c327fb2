"""Shared fixtures: a real local federation (hub + site kernels on 127.0.0.1), started once per module that asks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PLANS = Path(__file__).parent / "plans"

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLIP_LAB_HOME", str(Path(__file__).resolve().parent.parent / ".flip" / "home"))


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
