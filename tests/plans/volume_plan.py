"""A tiny 3D segmentation plan for tests: MONAI's UNet on patches, sliding-window evaluation, per-case Dice."""

import torch
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

PATCH = (16, 16, 8)

CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 3,
    "spacing": [6.0, 6.0, 6.0],
    "intensity": {"kind": "zscore"},
    "labels": {"background": 0, "lesion": 1},
}


def model():
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0)


def train(model, data, config):
    device = torch.device(config["device"])
    model.to(device).train()
    patches = Compose(
        [
            SpatialPadd(["image", "label"], spatial_size=PATCH),
            RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=PATCH, pos=1, neg=1, num_samples=2),
        ]
    )
    loader = DataLoader(Dataset(data.train, transform=patches), batch_size=2, shuffle=True, num_workers=0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    loss = torch.tensor(0.0)
    for _ in range(config["local_epochs"]):
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
            loss.backward()
            opt.step()
    model.cpu()
    return {"loss": float(loss)}


def evaluate(model, data, config):
    device = torch.device(config["device"])
    model.to(device).eval()
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    with torch.no_grad():
        for case in data.test:
            image = torch.as_tensor(case["image"])[None].to(device)
            logits = sliding_window_inference(image, PATCH, 4, model)
            prediction = one_hot(logits.argmax(1, keepdim=True), 2)
            metric(prediction.cpu(), one_hot(torch.as_tensor(case["label"])[None], 2))
    model.cpu()
    return {"dice": float(metric.aggregate())}
