"""Volumes benchmark: memory, sandbox throughput, cache reuse and learning of ``dims=3`` studies.

    python bench/volumes.py            # the table in the README: about 20 min on 2 shared cores
    python bench/volumes.py --quick    # smaller: about 5 min

Four measures, each written to ``bench/results/volumes.{json,md}``:

- **memory**: peak resident memory (``ru_maxrss``) of a site worker process that loads a ``dims=3`` job from a
  harmonised cache entry and trains one epoch over every case (one patch per case), for 50 and for 200 cases of
  ``--size``^3 voxels. The cases are synthetic (random intensities, a sphere as label) written straight into a
  cache entry with :class:`site_kernel.data.cache.VolumeWriter`: what is measured is the worker's reading, not
  harmonisation. Confined in the sandbox where the machine allows it (root and every mechanism), else plain.
- **throughput**: voxels per CPU-second (the process's own CPU time, so that other work on a shared machine does not
  count) through a 3D UNet training step (forward, backward, Adam) on patches cut from the same cached cases, in a
  sandboxed worker divided by the same loop in a plain Python process; one torch thread each, run alternately,
  median of 3 runs.
- **cache**: time from ``prepare`` to the end of the first training step for a study on a 3D demo hospital with an
  empty cache (harmonises every case) and for a second study with the same contract (finds the cache).
- **learning**: the 3D demo hospitals (four sites, CT and MR, DICOM and NIfTI, different grids, orientations and
  intensities), a MONAI UNet trained on patches (``RandCropByPosNegLabeld``) and evaluated per case with
  ``sliding_window_inference`` and ``DiceMetric`` (cases with a lesion; an empty case would score 1 for an empty
  prediction); mean over sites of each site's mean per-case test Dice for pooled
  training, local training scored on every site (cross-site), FedAvg on fully harmonised data and FedAvg on
  unharmonised data (stored grids, raw intensities x 1e-3). In-process simulation of FedAvg (weights averaged by
  number of training cases), the same number of passes over the data for every row, several seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
CONTRACT = {
    "modality": ["CT", "MR"],
    "dims": 3,
    "spacing": [4.0, 4.0, 4.0],
    "intensity": {"kind": "zscore"},
    "labels": {"background": 0, "lesion": 1},
}

# The worker side of the memory and throughput measures, run as ``python bench/volumes.py --child SPEC``.
CHILD_PLAN = """
import time
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from monai.transforms import RandSpatialCropd

def model():
    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)

def train(model, data, config):
    patch = tuple(config["patch"])
    crop = RandSpatialCropd(["image", "label"], roi_size=patch, random_size=False)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    steps, started = 0, None
    limit = int(config["steps"]) or len(data.train)
    while steps < limit:
        for case in data.train:
            sample = crop(case)
            x = torch.as_tensor(sample["image"])[None]
            y = torch.as_tensor(sample["label"])[None]
            if steps == 1:
                started = time.process_time()  # the first step warms up
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            steps += 1
            if steps >= limit:
                break
    seconds = time.process_time() - started  # CPU time: other work on a shared machine does not count
    voxels = (steps - 1) * patch[0] * patch[1] * patch[2]
    return {"voxels_per_s": voxels / seconds, "steps": float(steps)}

def evaluate(model, data, config):
    return {}
"""


def child(spec: dict[str, Any]) -> None:
    """Load a dims=3 job as the site's worker does, confine it (or not), train, print peak memory and speed."""
    from safetensors.torch import save

    from site_kernel import egress, sandbox  # noqa: F401  (imported before confinement, as the worker does)
    from site_kernel.worker import Worker

    worker = Worker(-1, -1)
    header = {
        "cases": spec["cases"],
        "source": CHILD_PLAN,
        "scratch": spec["scratch"],
        "readable": [spec["cases"]],
        "uid": 65534,
        "threads": 1,
        "confine": spec["confine"],
        "limits": {
            "memory_mb": 8192,
            "cpu_seconds": 3600,
            "processes": 16,
            "open_files": 256,
            "file_size_mb": 64,
            "train_seconds": 3600,
            "evaluate_seconds": 60,
            "wall_seconds": 3600,
        },
    }
    assert worker.load_data(header)["ok"]
    loaded = worker.load(header)
    assert loaded["ok"], loaded
    config = {"patch": spec["patch"], "steps": spec["steps"]}
    reply, _ = worker.step({"op": "train", "config": config}, save(worker.model.state_dict()))
    assert reply["ok"], reply
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    applied = loaded.get("confinement", {}).get("applied", [])
    print(json.dumps({**reply["metrics"], "peak_mb": peak_mb, "applied": applied}))


def _run_child(cases: Path, scratch: Path, *, confine: bool, patch: list[int], steps: int) -> dict[str, Any]:
    spec = {"cases": str(cases), "scratch": str(scratch), "confine": confine, "patch": patch, "steps": steps}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.update(USER="flip-plan", LOGNAME="flip-plan", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=3600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _synthetic_entry(root: Path, count: int, size: int, seed: int) -> Path:
    """A cache entry of ``count`` synthetic cases of ``size``^3 voxels, written as prepare writes them."""
    from site_kernel.data.cache import VolumeWriter

    writer = VolumeWriter(root, f"synthetic-{count}-{size}")
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(size),) * 3, indexing="ij"))
    for _ in range(count):
        centre = rng.uniform(size * 0.3, size * 0.7, 3)[:, None, None, None]
        label = (np.sum((grid - centre) ** 2, axis=0) < (size / 8) ** 2).astype(np.uint8)[None]
        image = rng.standard_normal((1, size, size, size), dtype=np.float32) + label
        writer.add("train", image, label, np.diag([1.5, 1.5, 1.5, 1.0]), None)
    return writer.commit({"stats": {}})


def _sandbox_ready() -> bool:
    from site_kernel.sandbox import probe_isolation

    return os.geteuid() == 0 and all(probe_isolation().values())


def measure_memory(work: Path, counts: list[int], size: int) -> dict[str, Any]:
    confine = _sandbox_ready()
    rows = {}
    for count in counts:
        entry = _synthetic_entry(work / "memory", count, size, seed=count)
        scratch = Path(tempfile.mkdtemp(dir=work))
        scratch.chmod(0o755)
        out = _run_child(entry, scratch, confine=confine, patch=[32, 32, 32], steps=0)
        rows[str(count)] = {"peak_mb": round(out["peak_mb"], 1), "steps": out["steps"]}
        shutil.rmtree(entry)
    peaks = [r["peak_mb"] for r in rows.values()]
    return {
        "cases": rows,
        "size": size,
        "confined": confine,
        "ratio": round(max(peaks) / min(peaks), 3),
        "disk_mb_per_case": round(size**3 * 5 / 2**20, 1),
    }


def measure_throughput(work: Path, size: int, steps: int, repeats: int) -> dict[str, Any]:
    if not _sandbox_ready():
        return {"skipped": "needs root and every sandbox mechanism"}
    entry = _synthetic_entry(work / "throughput", 16, size, seed=1)
    runs: dict[str, list[float]] = {"sandbox": [], "plain": []}
    for _ in range(repeats):
        for mode in ("sandbox", "plain"):
            scratch = Path(tempfile.mkdtemp(dir=work))
            scratch.chmod(0o755)
            out = _run_child(entry, scratch, confine=mode == "sandbox", patch=[32, 32, 32], steps=steps)
            runs[mode].append(out["voxels_per_s"])
    sandbox, plain = statistics.median(runs["sandbox"]), statistics.median(runs["plain"])
    return {
        "sandbox_voxels_per_s": round(sandbox),
        "plain_voxels_per_s": round(plain),
        "ratio": round(sandbox / plain, 3),
        "runs": runs,
        "steps": steps,
        "patch": [32, 32, 32],
    }


def measure_cache(work: Path) -> dict[str, Any]:
    import torch

    from site_kernel.data import generate_demo_hospitals, prepare

    site = generate_demo_hospitals(work / "cache-demo", n_sites=1, seed=0, register=True, volumes=True)[0]
    net = _unet()
    times = []
    for _ in range(2):
        started = time.perf_counter()
        data = prepare(site.site_dir, CONTRACT, site_steps=site.site_steps)
        batch = _patches(data.train[0], (32, 32, 16), 2, np.random.default_rng(0))
        _step(net, torch.optim.Adam(net.parameters()), batch)
        times.append((time.perf_counter() - started, data.from_cache))
    return {
        "cases": site.num_cases,
        "first_study_s": round(times[0][0], 2),
        "second_study_s": round(times[1][0], 2),
        "second_from_cache": times[1][1],
    }


# -- learning --------------------------------------------------------------------------------------------------------
def _unet() -> Any:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)


def _patches(case: dict[str, Any], patch: tuple[int, ...], n: int, rng: np.random.Generator) -> dict[str, Any]:
    from monai.transforms import Compose, RandCropByPosNegLabeld, SpatialPadd

    transform = Compose(
        [
            SpatialPadd(["image", "label"], spatial_size=patch),
            RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=patch, pos=1, neg=1, num_samples=n),
        ]
    )
    transform.set_random_state(seed=int(rng.integers(2**31)))
    samples = transform(case)
    import torch

    return {k: torch.stack([torch.as_tensor(np.asarray(s[k])) for s in samples]) for k in ("image", "label")}


def _step(net: Any, opt: Any, batch: dict[str, Any]) -> float:
    from monai.losses import DiceCELoss

    net.train()
    opt.zero_grad()
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(net(batch["image"].float()), batch["label"])
    loss.backward()
    opt.step()
    return float(loss)


def _train(net: Any, cases: list[Any], epochs: int, rng: np.random.Generator, patch: tuple[int, ...]) -> None:
    import torch

    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        for i in rng.permutation(len(cases)):
            _step(net, opt, _patches(cases[i], patch, 4, rng))


def _dice(net: Any, cases: list[Any], patch: tuple[int, ...]) -> float:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    # Cases without a lesion are left out of the mean (ignore_empty): an empty prediction on them would score 1.
    metric = DiceMetric(include_background=False, reduction="mean", ignore_empty=True)
    net.eval()
    with torch.no_grad():
        for case in cases:
            logits = sliding_window_inference(torch.as_tensor(case["image"])[None], patch, 4, net)
            metric(one_hot(logits.argmax(1, keepdim=True), 2), one_hot(torch.as_tensor(case["label"])[None], 2))
    return float(metric.aggregate())


def _average(states: list[dict[str, Any]], weights: list[int]) -> dict[str, Any]:
    total = sum(weights)
    return {
        k: sum(s[k].float() * (w / total) for s, w in zip(states, weights, strict=True)).to(states[0][k].dtype)
        for k in states[0]
    }


def learning_seed(work: Path, seed: int, rounds: int, epochs: int, scale: float) -> dict[str, float]:
    import torch

    from site_kernel.data import generate_demo_hospitals, prepare

    torch.manual_seed(seed)
    sites = generate_demo_hospitals(
        work / f"learn-{seed}", n_sites=4, seed=seed, scale=scale, register=True, volumes=True
    )
    patch = (32, 32, 16)
    sets = {}
    for mode in ("full", "none"):
        sets[mode] = []
        for s in sites:
            data = prepare(s.site_dir, CONTRACT, site_steps=s.site_steps, harmonise=mode)
            sets[mode].append((list(data.train), list(data.test)))  # a few MB each at this size
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}
    full = sets["full"]
    pooled = _unet()
    _train(pooled, [c for train, _ in full for c in train], rounds * epochs, rng, patch)
    out["pooled"] = float(np.mean([_dice(pooled, test, patch) for _, test in full]))
    local_cross = []
    for train, _ in full:
        net = _unet()
        _train(net, train, rounds * epochs, rng, patch)
        local_cross += [_dice(net, test, patch) for _, test in full]
    out["local_cross"] = float(np.mean(local_cross))
    for mode in ("full", "none"):
        global_net = _unet()
        for _ in range(rounds):
            states, weights = [], []
            for train, _ in sets[mode]:
                net = copy.deepcopy(global_net)
                _train(net, train, epochs, rng, patch)
                states.append(net.state_dict())
                weights.append(len(train))
            global_net.load_state_dict(_average(states, weights))
        out[f"fedavg_{mode}"] = float(np.mean([_dice(global_net, test, patch) for _, test in sets[mode]]))
    shutil.rmtree(work / f"learn-{seed}", ignore_errors=True)
    return out


def measure_learning(work: Path, seeds: list[int], rounds: int, epochs: int, scale: float) -> dict[str, Any]:
    per_seed = [learning_seed(work, seed, rounds, epochs, scale) for seed in seeds]
    rows = {}
    for name in per_seed[0]:
        values = [s[name] for s in per_seed]
        rows[name] = {"mean_dice": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}
    pooled = rows["pooled"]["mean_dice"]
    for row in rows.values():
        row["vs_pooled"] = round(row["mean_dice"] / pooled, 3) if pooled > 0 else None
    return {
        "rows": rows,
        "seeds": seeds,
        "rounds": rounds,
        "local_epochs": epochs,
        "scale": scale,
        "per_seed": per_seed,
    }


MEASURES = ("memory", "throughput", "cache", "learning")
LABELS = {
    "pooled": "pooled (upper reference)",
    "local_cross": "local only (cross-site)",
    "fedavg_full": "FedAvg, full harmonisation",
    "fedavg_none": "FedAvg, no harmonisation",
}


def markdown(summary: dict[str, Any]) -> str:
    mem, thr, cache, learn = (summary[k] for k in ("memory", "throughput", "cache", "learning"))
    counts = sorted(mem["cases"], key=int)
    lines = [
        "| measure | result | target |",
        "|---|---|---|",
        *(
            f"| worker peak memory, {c} cases of {mem['size']}^3 | {mem['cases'][c]['peak_mb']:.0f} MB | < 2048 MB |"
            for c in counts
        ),
        f"| memory ratio {counts[-1]} / {counts[0]} cases | {mem['ratio']:.2f} | <= 1.10 |",
    ]
    if "ratio" in thr:
        lines.append(f"| sandboxed / plain training throughput (voxels/s) | {thr['ratio']:.2f} | >= 0.9 |")
    lines += [
        f"| time to first step, empty cache ({cache['cases']} cases) | {cache['first_study_s']:.1f} s | |",
        f"| time to first step, same contract again (cache) | {cache['second_study_s']:.1f} s | no harmonising |",
        "",
        "| setting (3D demo, mean per-case test Dice) | mean Dice | std over seeds | vs pooled |",
        "|---|---|---|---|",
    ]
    for name, label in LABELS.items():
        row = learn["rows"][name]
        lines.append(f"| {label} | {row['mean_dice']:.3f} | {row['std']:.3f} | {row['vs_pooled']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=None, help="voxels a side of the memory benchmark's cases")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", default="memory,throughput,cache,learning", help="which measures to run again")
    parser.add_argument("--rounds", type=int, default=None, help="learning: federated rounds")
    parser.add_argument("--epochs", type=int, default=None, help="learning: local epochs per round")
    parser.add_argument("--scale", type=float, default=0.5, help="learning: demo hospital size (1.0: 12-24 patients)")
    parser.add_argument("--seeds", type=int, default=None, help="learning: how many seeds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return {}
    import torch

    torch.set_num_threads(1)
    quick = args.quick
    size = args.size or (64 if quick else 128)
    work = Path(tempfile.mkdtemp(prefix="flip-bench-volumes-", dir="/tmp"))
    work.chmod(0o755)
    started = time.time()
    parts = set(args.parts.split(","))
    previous = args.out / "volumes.json"
    # Measures not run again keep their earlier results (each measure states its own conditions).
    summary = json.loads(previous.read_text()) if previous.is_file() and parts != set(MEASURES) else {}
    measures = {
        "memory": lambda: measure_memory(work, [50, 200], size),
        "throughput": lambda: measure_throughput(work, 64, steps=8 if quick else 20, repeats=1 if quick else 3),
        "cache": lambda: measure_cache(work),
        "learning": lambda: measure_learning(
            work,
            seeds=list(range(args.seeds or (1 if quick else 2))),
            rounds=args.rounds or (3 if quick else 16),
            epochs=args.epochs or 1,
            scale=args.scale,
        ),
    }
    try:
        for name in MEASURES:
            if name in parts:
                summary[name] = measures[name]()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["conditions"] = {
        "quick": quick,
        "cores": os.cpu_count(),
        "torch_threads": 1,
        "seconds": round(time.time() - started),
        "parts_run": sorted(parts),
        "machine": "shared 2-core CPU machine, no GPU" if os.cpu_count() == 2 else f"{os.cpu_count()} cores",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "volumes.json").write_text(json.dumps(summary, indent=1))
    (args.out / "volumes.md").write_text(markdown(summary))
    print(markdown(summary))
    return summary


if __name__ == "__main__":
    main()
