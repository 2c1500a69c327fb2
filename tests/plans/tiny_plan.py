"""A tiny segmentation plan for tests: a two-layer conv net, fast on one CPU thread."""

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


def dice(pred, target):
    inter = ((pred == 1) & (target == 1)).sum().item()
    total = (pred == 1).sum().item() + (target == 1).sum().item()
    return 1.0 if total == 0 else 2.0 * inter / total


def train(model, data, config):
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(config["local_epochs"]):
        for i in range(0, data.num_train, config["batch_size"]):
            x, y = data.train_x[i : i + config["batch_size"]], data.train_y[i : i + config["batch_size"]]
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if config.get("proximal_mu", 0) > 0:
                loss = loss + config["proximal_mu"] / 2 * sum(
                    ((p - g) ** 2).sum() for p, g in zip(model.parameters(), config["global_params"], strict=True)
                )
            loss.backward()
            opt.step()
    return {"loss": float(loss)}


def evaluate(model, data, config):
    model.eval()
    with torch.no_grad():
        logits = model(data.test_x)
        loss = F.cross_entropy(logits, data.test_y).item()
        return {"loss": loss, "dice": dice(logits.argmax(1), data.test_y)}
