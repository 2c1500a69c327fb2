"""A 3D study end to end: a real SuperLink and two real site kernels holding the 3D demo's volumes; a MONAI UNet
trained on patches read lazily from each site's cache, evaluated per case with a sliding window."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flip_lab

PLANS = Path(__file__).parent / "plans"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def volumes_federation(tmp_path_factory):
    # 17 and 11 patients; the 3D demo's policies accept replies computed on 3 patients or more.
    fed = flip_lab.local_federation(2, workdir=tmp_path_factory.mktemp("volumes"), scale=0.7, volumes=True)
    yield fed
    fed.shutdown()


def test_a_3d_unet_study_runs_across_two_sites_from_their_harmonised_caches(volumes_federation):
    plan = flip_lab.Plan.from_file(PLANS / "volume_plan.py")
    job = volumes_federation.submit(plan, rounds=1, lr=0.01, local_epochs=1, expected_sites=2, round_timeout=300)
    job.wait(timeout=900)
    assert job.status == "completed"
    history = job.history
    assert set(history.site) - {"aggregate"} == {"st-aldhelm", "northgate"}
    dice = history[(history.metric == "dice") & (history.site != "aggregate")]
    assert len(dice) == 2 and dice.value.between(0.0, 1.0).all()
    examples = history[(history.metric == "num_examples") & (history.phase == "train")]
    for name, site_dir in volumes_federation.site_dirs.items():
        entries = [p for p in (site_dir / "cache").iterdir() if (p / "index.json").is_file()]
        assert len(entries) == 1, "each case harmonised once, into one entry for the contract"
        cases = json.loads((entries[0] / "index.json").read_text())["cases"]
        assert all((entries[0] / c["image"]).is_file() for c in cases)
        counted = set(examples[examples.site == name].value)
        assert counted == {float(sum(c["split"] == "train" for c in cases))}, "a site counts cases, not patches"
        log = "".join(p.read_text() for p in (site_dir / "logs").glob("researcher-*.log"))
        assert "plans run on cpu" in log
