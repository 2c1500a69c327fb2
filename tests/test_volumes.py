"""Volumetric studies (``dims=3``): the contract, each case harmonised once into the cache as memory-mappable
``.npy`` files, lazy reading by the worker, the MONAI-shaped ``data.train``/``data.test``, the dry run, and the
site's ``[resources] devices`` policy with its CPU fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from flip_common.sitedata import SiteData, VolumeCases, VolumeData, open_volumes
from site_kernel.data import ContractError, generate_demo_hospitals, prepare, validate_contract
from site_kernel.data.prepare import PreparedVolumes

torch.set_num_threads(1)

CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 3,
    "spacing": [4.0, 4.0, 5.0],
    "intensity": {"kind": "zscore"},
    "labels": {"background": 0, "lesion": 1},
}


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list:
    return generate_demo_hospitals(tmp_path_factory.mktemp("volumes"), n_sites=2, seed=3, scale=0.06, register=True)


# -- the contract ----------------------------------------------------------------------------------------------
def test_a_volumetric_contract_is_accepted_with_or_without_a_size() -> None:
    native = validate_contract(CONTRACT)
    assert native["dims"] == 3 and native["size"] is None and native["spacing"] == [4.0, 4.0, 5.0]
    fixed = validate_contract({**CONTRACT, "size": [32, 32, 16]})
    assert fixed["size"] == [32, 32, 16] and fixed["orientation"] == "RAS"
    assert validate_contract({**CONTRACT, "size": None}) == native


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"spacing": [4.0, 4.0]}, "spacing", "three values [x, y, z]"),
        ({"size": [32, 32]}, "size", "leave size out"),
        ({"size": [32, 32, 4]}, "size", "[8, 1024]"),
        ({"dims": 4, "size": [8, 8, 8]}, "dims", "dims=3 (volumes)"),
        ({"orientation": "RAR"}, "orientation", "one of R/L"),
    ],
)
def test_a_malformed_volumetric_contract_names_its_key(change: dict, key: str, words: str) -> None:
    with pytest.raises(ContractError) as caught:
        validate_contract({**CONTRACT, **change})
    assert caught.value.key == key and words in str(caught.value)


def test_two_dimensional_contracts_are_unchanged() -> None:
    flat = {**CONTRACT, "dims": 2, "size": [48, 48], "spacing": [4.0, 4.0]}
    assert validate_contract(flat)["size"] == [48, 48]
    with pytest.raises(ContractError) as caught:
        validate_contract({k: v for k, v in flat.items() if k != "size"})
    assert caught.value.key == "size"


# -- harmonised once, on disk, read lazily -----------------------------------------------------------------------
def test_each_case_is_written_once_as_npy_with_its_geometry(sites: list) -> None:
    site = sites[0]
    data = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps)
    assert isinstance(data, PreparedVolumes) and not data.from_cache
    index = json.loads((data.folder / "index.json").read_text())["cases"]
    assert len(index) == data.num_train + data.num_test == site.num_cases
    for entry in index:
        image = np.load(data.folder / entry["image"], mmap_mode="r")
        assert isinstance(image, np.memmap) and image.dtype == np.float32 and list(image.shape) == entry["shape"]
        assert np.load(data.folder / entry["label"], mmap_mode="r").dtype == np.uint8
        assert entry["spacing"] == pytest.approx([4.0, 4.0, 5.0])
        assert np.allclose(np.linalg.norm(np.asarray(entry["affine"])[:3, :3], axis=0), [4.0, 4.0, 5.0])
    case = data.train[0]
    assert case["image"].shape[0] == 1 and case["label"].shape == case["image"].shape
    assert case["label"].dtype == np.int64 and set(np.unique(case["label"])) <= {0, 1}
    assert set(case["meta"]) == {"index", "spacing", "affine"}, "no identifier of the site's data"
    again = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps)
    assert again.from_cache and again.folder == data.folder


def test_a_fixed_size_crops_or_pads_every_case(sites: list) -> None:
    site = sites[1]
    data = prepare(site.site_dir, {**CONTRACT, "size": [40, 32, 8]}, site_steps=site.site_steps)
    assert {tuple(c["image"].shape) for c in data.train} == {(1, 40, 32, 8)}


def test_the_worker_reads_only_the_cases_the_plan_asks_for(sites: list, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a dims=3 job reads the index, not the cases; indexing one case reads that case's two files."""
    from flip_common import sitedata
    from site_kernel.worker import Worker

    site = sites[0]
    folder = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps).folder
    opened: list[str] = []
    real_load = np.load

    def counting_load(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(sitedata.np, "load", counting_load)
    worker = Worker(-1, -1)
    assert worker.load_data({"cases": str(folder), "arrays": None}) == {"ok": True}
    assert isinstance(worker.data, VolumeData) and worker.data.num_train > 1
    assert opened == [], "loading the job read case files"
    worker.data.train[1]
    assert sorted(opened) == ["0001_image.npy", "0001_label.npy"]


def test_a_volumetric_plan_that_asks_for_train_x_is_told_what_to_use(sites: list) -> None:
    data = open_volumes(prepare(sites[0].site_dir, CONTRACT, site_steps=sites[0].site_steps).folder)
    with pytest.raises(AttributeError, match=r"use data.train / data.test"):
        data.train_x  # noqa: B018


# -- the MONAI-shaped interface ----------------------------------------------------------------------------------
def test_cases_feed_monai_datasets_patch_samplers_and_sliding_windows(sites: list) -> None:
    from monai.data import DataLoader, Dataset
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    data = open_volumes(prepare(sites[0].site_dir, CONTRACT, site_steps=sites[0].site_steps).folder)
    patch = (16, 16, 4)
    transform = Compose(
        [
            SpatialPadd(["image", "label"], spatial_size=patch),
            RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=patch, pos=1, neg=1, num_samples=2),
        ]
    )
    loader = DataLoader(Dataset(data.train, transform=transform), batch_size=2, num_workers=0)
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (4, 1, *patch) and tuple(batch["label"].shape) == (4, 1, *patch)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    for case in data.test:
        image = torch.as_tensor(case["image"])[None]
        with torch.no_grad():
            logits = sliding_window_inference(image, patch, 2, net)
        prediction = torch.nn.functional.one_hot(logits.argmax(1), 2).permute(0, 4, 1, 2, 3)
        target = torch.nn.functional.one_hot(torch.as_tensor(case["label"])[:, ...].long(), 2).permute(0, 4, 1, 2, 3)
        metric(prediction, target)
    assert metric.aggregate().shape == (len(data.test), 1)


def test_two_dimensional_data_also_reads_as_cases() -> None:
    x, y = torch.rand(3, 1, 8, 8), torch.randint(0, 2, (3, 8, 8))
    data = SiteData(x, y, x[:1], y[:1])
    assert len(data.train) == 3 and len(data.test) == 1
    case = data.train[2]
    assert tuple(case["image"].shape) == (1, 8, 8) and tuple(case["label"].shape) == (1, 8, 8)
    assert torch.equal(case["image"], x[2])


def test_the_dry_run_hands_a_volumetric_plan_synthetic_cases() -> None:
    from flip_lab._dryrun import NATIVE_SIZE, SAMPLES, synthetic_data

    data = synthetic_data(validate_contract(CONTRACT))
    assert isinstance(data, VolumeData) and data.num_train == data.num_test == SAMPLES
    case = data.train[0]
    assert case["image"].shape == (1, NATIVE_SIZE, NATIVE_SIZE, NATIVE_SIZE) and case["label"].dtype == np.int64
    sized = synthetic_data(validate_contract({**CONTRACT, "size": [16, 24, 8]}))
    assert sized.test[1]["image"].shape == (1, 16, 24, 8)


# -- the 3D demo hospitals ---------------------------------------------------------------------------------------
def test_the_3d_demo_writes_whole_volumes_as_varied_as_the_2d_demo(tmp_path: Path) -> None:
    from site_kernel.data.demo import demo_profiles
    from site_kernel.data.manifest import read_manifest
    from site_kernel.data.scanners import PROFILES

    sites = generate_demo_hospitals(tmp_path / "3d", n_sites=4, seed=0, scale=0.2, register=True, volumes=True)
    assert [(s.modality, s.file_format) for s in sites] == [
        ("CT", "dicom"),
        ("MR", "nifti"),
        ("CT", "nifti"),
        ("MR", "dicom"),
    ]
    manifests = [read_manifest(s.site_dir, "default") for s in sites]
    shapes = [m["cases"][0]["shape"] for m in manifests]
    assert all(min(s[:2]) >= 48 and max(s[:2]) <= 96 and s[2] >= 18 for s in shapes), shapes
    assert len({tuple(s) for s in shapes}) == 4 and len({tuple(m["cases"][0]["spacing"]) for m in manifests}) == 4
    assert len({m["cases"][0]["axcodes"] for m in manifests}) == 4
    assert all(m["quarantine"] == [] and m["labelled"] for m in manifests)
    # Lesions lie throughout the volume, not only in the 2D demo's slab of a few slices around z = 0.
    data = prepare(sites[0].site_dir, {**CONTRACT, "spacing": [4.0, 4.0, 4.0]}, site_steps=sites[0].site_steps)
    depths = [np.nonzero(c["label"][0].any(axis=(0, 1)))[0] for c in [*data.train, *data.test]]
    assert max(d.max() - d.min() for d in depths if d.size) * 4.0 > 16.0
    # The 2D demo stays the default: thin slabs of a few slices.
    assert [p.slices for p in demo_profiles(4)] == [p.slices for p in PROFILES]
    assert max(p.slices for p in PROFILES) <= 5


# -- the site's GPU ------------------------------------------------------------------------------------------------
def test_the_policy_names_devices_and_refuses_anything_else(tmp_path: Path) -> None:
    from site_kernel.errors import PolicyError
    from site_kernel.policy import load_policy, write_default_policy

    path = write_default_policy(tmp_path, demo=True)
    assert load_policy(tmp_path).devices == ()
    text = path.read_text()
    path.write_text(text.replace("devices = []", 'devices = ["cuda:0", "cuda:1"]'))
    assert load_policy(tmp_path).devices == ("cuda:0", "cuda:1")
    for bad in ('["gpu0"]', '"cuda:0"', '["cuda:0", "cuda:0"]', '["cuda:x"]'):
        path.write_text(text.replace("devices = []", f"devices = {bad}"))
        with pytest.raises(PolicyError) as caught:
            load_policy(tmp_path)
        assert caught.value.key == "resources.devices"


def test_without_a_granted_gpu_plans_run_on_the_cpu_and_are_told_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from site_kernel import worker

    assert worker._device([]) == ("cpu", "the site's policy grants no GPU ([resources] devices is empty)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    device, note = worker._device(["cuda:0"])
    assert device == "cpu" and "no usable GPU" in note


def test_the_sandbox_grants_device_files_only_for_granted_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from site_kernel import sandbox

    assert sandbox.gpu_paths([]) == ([], [])
    present = {"/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm", "/proc/driver/nvidia", "/dev/nvidia0"}
    monkeypatch.setattr(sandbox.os.path, "exists", lambda p: str(p) in present)
    files, info = sandbox.gpu_paths(["cuda:1"])
    assert [str(f) for f in files] == ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"]
    assert [str(p) for p in info] == ["/proc/driver/nvidia"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_granted_gpu_reaches_the_plan() -> None:
    from site_kernel import worker

    assert worker._device(["cuda:0"])[0] == "cuda:0"


def test_volume_cases_slice_lazily(sites: list) -> None:
    data = prepare(sites[1].site_dir, CONTRACT, site_steps=sites[1].site_steps)
    cases = data.train
    assert isinstance(cases, VolumeCases)
    assert len(cases[1:]) == len(cases) - 1 and cases[1:].shapes == cases.shapes[1:]


# -- inside the sandbox ------------------------------------------------------------------------------------------
CONFINED_PLAN = """
import torch
from monai.data import DataLoader, Dataset, ThreadDataLoader

def model():
    return torch.nn.Conv3d(1, 2, 1)

def _reads(path):
    try:
        open(path, "rb").read(1)
        return 1.0
    except PermissionError:
        return 0.0

def train(model, data, config):
    out = {"cases": float(len(data.train)), "own": float(data.train[0]["image"].ndim)}
    out["other_contract"] = _reads(config["other"])
    out["raw"] = _reads(config["raw"])
    try:
        open(data.train.folder / "index.json", "a").close()
        out["writes_own"] = 1.0
    except PermissionError:
        out["writes_own"] = 0.0
    out["plain"] = float(sum(1 for _ in DataLoader(Dataset(data.train), batch_size=1, num_workers=0)))
    out["threads"] = float(sum(1 for _ in ThreadDataLoader(Dataset(data.train), batch_size=1, num_workers=0)))
    try:
        out["processes"] = float(sum(1 for _ in DataLoader(Dataset(data.train), batch_size=1, num_workers=2)))
    except PermissionError:
        out["processes"] = -1.0
    return out

def evaluate(model, data, config):
    return {}
"""

CONFINED_WORKER = r"""
import json, sys
spec = json.loads(sys.argv[1])
from safetensors.torch import save
from site_kernel import egress, sandbox  # as the worker's main() imports them before confinement
from site_kernel.worker import Worker

worker = Worker(-1, -1)
header = {
    "cases": spec["cases"], "source": spec["plan"], "scratch": spec["scratch"], "readable": [spec["cases"]],
    "uid": 65534, "threads": 1,
    "limits": {"memory_mb": 4096, "cpu_seconds": 120, "processes": 16, "open_files": 256, "file_size_mb": 64,
               "train_seconds": 60, "evaluate_seconds": 60, "wall_seconds": 60},
}
assert worker.load_data(header)["ok"]
loaded = worker.load(header)
assert loaded["ok"], loaded
reply, _ = worker.step({"op": "train", "config": spec["config"]}, save(worker.model.state_dict()))
print(json.dumps({"reply": reply, "device": loaded["device"], "applied": loaded["confinement"]["applied"]}))
"""


def _sandbox_ready() -> bool:
    import os

    from site_kernel.sandbox import probe_isolation

    return os.geteuid() == 0 and all(probe_isolation().values())


@pytest.mark.skipif(not _sandbox_ready(), reason="needs root and a kernel with every sandbox mechanism")
def test_a_confined_worker_reads_its_own_contract_s_cases_and_nothing_else(tmp_path_factory) -> None:
    """The sandbox grants the job's own cache entry, read-only; another contract's entry and the raw files (both
    readable by everyone through file modes) stay out of reach. DataLoader worker processes cannot start inside
    it (their semaphores live in /dev/shm and tensors pass over UNIX sockets the sandbox forbids: see
    docs/architecture.md); loading in the plan's process and MONAI's ThreadDataLoader work."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="flip-volumes-", dir="/tmp"))  # reachable by the sandbox user
    root.chmod(0o755)
    try:
        _confined_worker_run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _confined_worker_run(root: Path) -> None:
    import os
    import subprocess
    import sys

    site = generate_demo_hospitals(root, n_sites=1, seed=5, scale=0.04, register=True)[0]
    own = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps).folder
    other = prepare(site.site_dir, {**CONTRACT, "size": [16, 16, 8]}, site_steps=site.site_steps).folder
    raw = next(p for p in site.images_dir.rglob("*") if p.is_file())
    for path in (raw, *raw.parents):
        if path == root.parent:
            break
        path.chmod(0o755 if path.is_dir() else 0o644)
    scratch = root / "scratch"
    scratch.mkdir()
    config = {"other": str(next(other.rglob("*_image.npy"))), "raw": str(raw)}
    spec = {"cases": str(own), "plan": CONFINED_PLAN, "scratch": str(scratch), "config": config}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(USER="flip-plan", LOGNAME="flip-plan")  # as the executor starts workers (jobs._worker_env)
    proc = subprocess.run(
        [sys.executable, "-c", CONFINED_WORKER, json.dumps(spec)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "landlock" in out["applied"] and out["device"] == "cpu"
    metrics = out["reply"]["metrics"]
    assert metrics["cases"] > 0 and metrics["own"] == 4.0
    assert metrics["other_contract"] == 0.0 and metrics["raw"] == 0.0
    assert metrics["writes_own"] == 0.0, "the job's own cases are read-only"
    assert metrics["plain"] == metrics["threads"] == metrics["cases"]
    assert metrics["processes"] == -1.0
    assert "plans run on cpu" in proc.stderr
