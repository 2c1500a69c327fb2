"""Liver lesion segmentation on axial slices: a small BatchNorm UNet trained with a Dice + cross-entropy loss.

The plan the default demo study runs. Each site harmonises its scans onto ``CONTRACT`` (CT or MR, 64 x 64 slices
at 3 mm, RAS, intensities scaled by their 1st/99th percentiles), so ``data`` holds ``train_x``/``test_x`` float32
[N, 1, 64, 64] and ``train_y``/``test_y`` int64 [N, 64, 64] tensors.

Config keys: ``local_epochs`` (2), ``lr`` (1e-3), ``batch_size`` (16), ``seed`` (0), ``lr_schedule`` ("constant",
or "cosine": the learning rate decays over the study's ``rounds`` by ``server-round``, never below 2% of ``lr``),
and for FedProx ``proximal_mu`` > 0 with ``global_params`` (the round's global weights, in ``model.parameters()``
order).
"""

import math

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet

CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 2,
    "size": [64, 64],
    "spacing": [3.0, 3.0],
    "orientation": "RAS",
    "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0},
    "labels": {"background": 0, "lesion": 1},
    "dataset": "default",
}


def model():
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=2,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=0,
        norm="batch",
    )


def dice_ce_loss():
    # Dice of the lesion class only, pooled over the whole batch (batch=True): batches where lesions are rare
    # still pull towards them instead of settling on an all-background prediction.
    return DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=False)


def augment(x, y, generator):
    # Mirror each batch at random along both axes: lesions look the same either way round, and a few hundred
    # patients are not enough to learn that from the data alone.
    for axis in (-2, -1):
        if torch.rand(1, generator=generator).item() < 0.5:
            x, y = x.flip(axis), y.flip(axis)
    return x, y


def learning_rate(config):
    lr = float(config.get("lr", 1e-3))
    if config.get("lr_schedule", "constant") != "cosine":
        return lr
    progress = (int(config.get("server-round", 1)) - 1) / max(int(config.get("rounds", 1)), 1)
    return max(lr * 0.5 * (1 + math.cos(math.pi * progress)), lr * 0.02)


def train(model, data, config):
    epochs = int(config.get("local_epochs", 2))
    batch_size = int(config.get("batch_size", 16))
    mu = float(config.get("proximal_mu", 0.0))
    anchors = [p.detach().clone() for p in config["global_params"]] if mu > 0 else []
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate(config))
    loss_fn = dice_ce_loss()
    generator = torch.Generator().manual_seed(int(config.get("seed", 0)))
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(data.num_train, generator=generator)
        for start in range(0, data.num_train, batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm needs two samples
                continue
            x, y = augment(data.train_x[index], data.train_y[index], generator)
            loss = loss_fn(model(x), y.unsqueeze(1))
            if anchors:  # FedProx: stay close to the round's global model
                loss = loss + mu / 2 * sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True)
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return {"loss": total / max(steps, 1)}


def evaluate(model, data, config):
    batch_size = int(config.get("batch_size", 16)) * 4
    loss_fn = dice_ce_loss()
    # Dice of the lesion class per test image, averaged over the images that show a lesion.
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    model.eval()
    total, seen = 0.0, 0
    with torch.no_grad():
        for start in range(0, data.num_test, batch_size):
            x = data.test_x[start : start + batch_size]
            y = data.test_y[start : start + batch_size]
            logits = model(x)
            total += float(loss_fn(logits, y.unsqueeze(1))) * len(x)
            seen += len(x)
            prediction = torch.nn.functional.one_hot(logits.argmax(1), 2).permute(0, 3, 1, 2)
            metric(prediction, torch.nn.functional.one_hot(y, 2).permute(0, 3, 1, 2))
    dice = metric.aggregate()
    dice = float(dice) if seen and not torch.isnan(dice) else 0.0
    return {"dice": dice, "loss": total / max(seen, 1)}
