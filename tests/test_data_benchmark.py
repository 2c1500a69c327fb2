"""The heterogeneity benchmark's quick mode: harmonised FedAvg must beat unharmonised FedAvg and local training."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "heterogeneity.py"


def _load_benchmark():  # bench/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location("heterogeneity", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered by name so that its worker processes can find the functions they are handed.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_benchmark_shows_what_harmonisation_buys(tmp_path: Path) -> None:
    summary = _load_benchmark().main(["--quick", "--out", str(tmp_path)])

    rows = {name: row["mean_dice"] for name, row in summary["rows"].items()}
    assert rows["fedavg_full"] > rows["fedavg_none"] + 0.05
    assert rows["fedavg_full"] > rows["local_cross"]
    written = json.loads((tmp_path / "heterogeneity.json").read_text())
    assert written["rows"]["fedavg_full"]["mean_dice"] == pytest.approx(rows["fedavg_full"])
    assert "FedAvg, no harmonisation" in (tmp_path / "heterogeneity.md").read_text()
    assert (tmp_path / "heterogeneity.png").stat().st_size > 10_000


@pytest.mark.e2e
@pytest.mark.slow
def test_the_real_federation_row_trains_on_the_same_hospitals_as_the_in_process_rows(tmp_path: Path) -> None:
    bench = _load_benchmark()
    args = {"rounds": 1, "local_epochs": 1, "lr": 3e-3, "batch_size": 8, "scale": 0.5}
    sites = bench.load_sites(bench.build_federation(tmp_path / "data", 0, args["scale"]), "full")

    result = bench.run_real_federation_row(args, 0, sites, tmp_path)

    # Each site scored the final global model on its own harmonised test set; the benchmark scored the same weights
    # on the test sets it generated and harmonised in-process. Equal scores mean same patients, same harmonisation,
    # same model: the real row is comparable with the others.
    names = [site.name for site in sites]
    assert sorted(result["site_reported"]) == sorted(names)
    for site, dice in zip(sites, result["rows"]["fedavg_real"], strict=True):
        assert result["site_reported"][site.name] == pytest.approx(dice, abs=1e-5)
        loss = bench.plan.evaluate(result["model"], site, {"batch_size": args["batch_size"]})["loss"]
        assert result["site_reported_loss"][site.name] == pytest.approx(loss, rel=1e-4)
    assert len(result["curve"]) == args["rounds"]


def test_fedavg_weights_states_by_training_set_size() -> None:
    import torch

    bench = _load_benchmark()
    states = [{"w": torch.tensor([0.0]), "n": torch.tensor(3)}, {"w": torch.tensor([4.0]), "n": torch.tensor(5)}]
    averaged = bench.weighted_average(states, [3, 1])
    assert float(averaged["w"]) == pytest.approx(1.0) and int(averaged["n"]) == 5
