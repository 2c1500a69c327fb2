"""The tiny plan with two faults for drills, each at the site holding a given number of training examples: it is slow
in round ``straggler_round`` (``straggler_examples``, ``straggler_delay_s``), or it sends a model scaled by 1e6
(``poison_examples``)."""

import time

import torch
import torch.nn.functional as F

CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [32, 32],
    "spacing": [6.0, 6.0],
    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
    "labels": {"background": 0, "lesion": 1},
}


def model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 2, 3, padding=1),
    )


def train(model, data, config):
    if config.get("server-round") == config.get("straggler_round") and data.num_train == config.get(
        "straggler_examples"
    ):
        time.sleep(float(config["straggler_delay_s"]))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    loss = F.cross_entropy(model(data.train_x[:32]), data.train_y[:32])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if data.num_train == config.get("poison_examples"):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1e6)
    return {"loss": float(loss)}


def evaluate(model, data, config):
    model.eval()
    with torch.no_grad():
        return {"loss": F.cross_entropy(model(data.test_x), data.test_y).item()}
