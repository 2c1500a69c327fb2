"""The tiny plan's model and one training step on 32 synthetic 32x32 slices (the plan trains on 32 per round)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 2, 3, padding=1),
    )


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 1, 32, 32, generator=g)
    return x, (x > 1.0).long().squeeze(1)


def train(net: torch.nn.Module, seed: int) -> float:
    x, y = batch(seed)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    net.train()
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss)


def evaluate(net: torch.nn.Module, seed: int) -> float:
    x, y = batch(seed + 1)
    net.eval()
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))
