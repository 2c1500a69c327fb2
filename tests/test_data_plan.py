"""The example segmentation plan: a BatchNorm UNet, Dice + CE training, FedProx, and a Dice evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flip_lab.examples import SEGMENTATION_PLAN
from flip_lab.examples import segmentation_plan as plan
from site_kernel.data import validate_contract

torch.set_num_threads(1)


def _data(n: int = 24, seed: int = 0) -> SimpleNamespace:
    """Bright discs (the 'lesions') on noise: easy enough to learn in a few steps."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    x = torch.randn(n, 1, 64, 64, generator=g) * 0.1
    y = torch.zeros(n, 64, 64, dtype=torch.int64)
    for i in range(n):
        cy, cx = torch.randint(12, 52, (2,), generator=g).tolist()
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
        y[i][disc] = 1
        x[i, 0][disc] += 1.0
    half = n // 2
    return SimpleNamespace(
        train_x=x[:half], train_y=y[:half], test_x=x[half:], test_y=y[half:], num_train=half, num_test=n - half
    )


def test_the_contract_is_valid() -> None:
    assert validate_contract(plan.CONTRACT)["size"] == [64, 64]


def test_model_is_a_small_batchnorm_unet() -> None:
    model = plan.model()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(p.numel() for p in model.parameters()) < 200_000
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 2, 64, 64)


def test_training_lowers_the_loss_and_evaluation_reports_dice() -> None:
    torch.manual_seed(0)
    model, data = plan.model(), _data()
    before = plan.evaluate(model, data, {})
    first = plan.train(model, data, {"local_epochs": 1, "lr": 3e-3, "batch_size": 4, "seed": 0})
    later = plan.train(model, data, {"local_epochs": 6, "lr": 3e-3, "batch_size": 4, "seed": 1})
    after = plan.evaluate(model, data, {})
    assert set(first) == {"loss"} and later["loss"] < first["loss"]
    assert set(after) == {"dice", "loss"} and 0.0 <= before["dice"] <= 1.0
    assert after["dice"] > before["dice"] + 0.2


def test_the_proximal_term_keeps_weights_near_the_global_model() -> None:
    data = _data()
    distances = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = plan.model()
        anchors = [p.detach().clone() for p in model.parameters()]
        plan.train(
            model,
            data,
            {"local_epochs": 2, "lr": 3e-3, "batch_size": 4, "seed": 0, "proximal_mu": mu, "global_params": anchors},
        )
        distances[mu] = sum(float(((p - a) ** 2).sum()) for p, a in zip(model.parameters(), anchors, strict=True))
    assert distances[10.0] < 0.5 * distances[0.0]


def test_defaults_apply_when_the_config_is_empty() -> None:
    model, data = plan.model(), _data(8)
    assert plan.train(model, data, {})["loss"] > 0
    assert plan.evaluate(model, data, {})["loss"] > 0


def test_the_plan_loads_as_a_flip_lab_plan() -> None:
    flip_lab = pytest.importorskip("flip_lab.plan")
    loaded = flip_lab.Plan.from_file(SEGMENTATION_PLAN)
    assert loaded.contract == plan.CONTRACT
