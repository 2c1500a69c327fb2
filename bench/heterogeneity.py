"""Heterogeneity benchmark: what federation and harmonisation buy on the simulated hospitals.

    python bench/heterogeneity.py            # 3 seeds, full table: 28 CPU-minutes, ~15 min on 2 idle cores
    python bench/heterogeneity.py --quick    # 1 seed, fewer rounds and patients, < 2 min

Every row trains the plan in ``flip_lab/examples/segmentation_plan.py`` (its ``model``, ``train`` and ``evaluate``,
unchanged) on the demo hospitals of :func:`site_kernel.data.generate_demo_hospitals`, prepared by
:func:`site_kernel.data.prepare`, and reports the mean over sites of each site's test Dice:

- ``pooled``: one model on all sites' training data together (the upper reference; impossible in practice).
- ``local (own site)`` / ``local (cross-site)``: one model per site on its own data, scored on its own test set,
  and on every site's test set (mean over all model x site pairs).
- ``FedAvg`` / ``FedProx`` with full harmonisation (site steps + the plan's contract), FedAvg with geometric
  harmonisation only (orientation, spacing, size; raw intensities x 1e-3) and with none (stored arrays resized to
  the contract size; raw intensities x 1e-3).

``FedAvg, full harmonisation, real federation`` runs the same study through a Flower SuperLink and one site kernel
per hospital on 127.0.0.1 (``--real-seeds``, default the first seed). The other federated rows run in-process: each
round every site trains a copy of the global model for ``local_epochs`` and the server averages the weights
(BatchNorm statistics included) by training-set size. Every row gets the same
number of passes over the data and the same learning-rate schedule (cosine over rounds). Seeds change both the
simulated patients and the training. Results go to ``bench/results/heterogeneity.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch

from flip_lab.examples import segmentation_plan as plan
from site_kernel.data import generate_demo_hospitals, prepare

RESULTS = Path(__file__).resolve().parent / "results"
ROW_LABELS = {
    "pooled": "pooled (upper reference)",
    "local_own": "local only (own site)",
    "local_cross": "local only (cross-site)",
    "fedavg_full": "FedAvg, full harmonisation",
    "fedavg_real": "FedAvg, full harmonisation, real federation",
    "fedprox_full": "FedProx, full harmonisation",
    "fedavg_geometric": "FedAvg, geometric only",
    "fedavg_none": "FedAvg, no harmonisation",
}
FULL_JOBS = ("pooled", "local", "fedavg_full", "fedprox_full", "fedavg_geometric", "fedavg_none")
QUICK_JOBS = ("local", "fedavg_full", "fedavg_none")


def build_federation(root: Path, seed: int, scale: float) -> list[dict[str, Any]]:
    """Write and register the demo hospitals for ``seed`` and prepare them in every harmonisation mode."""
    sites = generate_demo_hospitals(root / f"seed{seed}", seed=seed, scale=scale, register=True)
    described = []
    for site in sites:
        for mode in ("full", "geometric", "none"):
            prepare(site.site_dir, plan.CONTRACT, site_steps=site.site_steps, harmonise=mode)
        described.append({"name": site.name, "site_dir": str(site.site_dir), "site_steps": site.site_steps})
    return described


def load_sites(federation: list[dict[str, Any]], mode: str) -> list[SimpleNamespace]:
    """Each site's harmonised data as the tensors a plan's ``train``/``evaluate`` receive (from the cache)."""
    sites = []
    for site in federation:
        data = prepare(Path(site["site_dir"]), plan.CONTRACT, site_steps=site["site_steps"], harmonise=mode)
        sites.append(
            SimpleNamespace(
                name=site["name"],
                train_x=torch.from_numpy(data.train_x),
                train_y=torch.from_numpy(data.train_y),
                test_x=torch.from_numpy(data.test_x),
                test_y=torch.from_numpy(data.test_y),
                num_train=data.num_train,
                num_test=data.num_test,
            )
        )
    return sites


def round_config(args: dict[str, Any], round_index: int, seed: int, **extra: Any) -> dict[str, Any]:
    """The config one site's ``train`` gets in one round, as the real federation hands it over (``server-round``
    is 1-based); the plan itself turns it into a cosine-decayed learning rate."""
    return {
        "rounds": args["rounds"],
        "server-round": round_index + 1,
        "local_epochs": args["local_epochs"],
        "lr": args["lr"],
        "lr_schedule": "cosine",
        "batch_size": args["batch_size"],
        "seed": seed,
        **extra,
    }


def mean_dice(model: torch.nn.Module, sites: list[SimpleNamespace]) -> list[float]:
    return [plan.evaluate(model, site, {"batch_size": 16})["dice"] for site in sites]


def weighted_average(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """FedAvg of state dicts, BatchNorm running statistics included; integer counters keep the largest."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
        else:
            out[key] = torch.stack([s[key] for s in states]).max(0).values
    return out


def fedavg(
    sites: list[SimpleNamespace],
    args: dict[str, Any],
    seed: int,
    *,
    mu: float = 0.0,
    evaluate_on: list[SimpleNamespace] | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """In-process FedAvg (FedProx when ``mu`` > 0): local training at every site, weighted averaging.

    Returns the final global model and its mean test Dice after every round (on ``evaluate_on``, default
    ``sites``).
    """
    torch.manual_seed(seed)
    global_model = plan.model()
    curve = []
    for r in range(args["rounds"]):
        states, weights = [], []
        anchors = [p.detach().clone() for p in global_model.parameters()]
        for index, site in enumerate(sites):
            local = copy.deepcopy(global_model)
            config = round_config(args, r, seed * 1000 + r * 10 + index, proximal_mu=mu, global_params=anchors)
            plan.train(local, site, config)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(site.num_train)
        global_model.load_state_dict(weighted_average(states, weights))
        curve.append(float(np.mean(mean_dice(global_model, evaluate_on or sites))))
    return global_model, curve


def centralised(
    data: SimpleNamespace, args: dict[str, Any], seed: int, sites: list[SimpleNamespace] | None = None
) -> tuple[torch.nn.Module, list[float]]:
    """One model on one dataset with the same rounds x local epochs schedule as the federated rows."""
    torch.manual_seed(seed)
    model = plan.model()
    curve = []
    for r in range(args["rounds"]):
        plan.train(model, data, round_config(args, r, seed * 1000 + r))
        if sites is not None:
            curve.append(float(np.mean(mean_dice(model, sites))))
    return model, curve


def pooled_data(sites: list[SimpleNamespace]) -> SimpleNamespace:
    return SimpleNamespace(
        train_x=torch.cat([s.train_x for s in sites]),
        train_y=torch.cat([s.train_y for s in sites]),
        num_train=sum(s.num_train for s in sites),
    )


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One row (or the two local-only rows) for one seed; runs in a worker process with one torch thread."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    kind, seed, args = job["kind"], job["seed"], job["args"]
    mode = {"fedavg_geometric": "geometric", "fedavg_none": "none"}.get(kind, "full")
    sites = load_sites(job["federation"], mode)
    result: dict[str, Any] = {"kind": kind, "seed": seed}
    if kind == "pooled":
        model, curve = centralised(pooled_data(sites), args, seed, sites)
        result["rows"] = {"pooled": mean_dice(model, sites)}
        result["curve"] = curve
    elif kind == "local":
        own, cross = [], []
        for index, site in enumerate(sites):
            model, _ = centralised(site, args, seed + 100 * index)
            scores = mean_dice(model, sites)
            own.append(scores[index])
            cross.append(float(np.mean(scores)))
        result["rows"] = {"local_own": own, "local_cross": cross}
    else:
        mu = args["proximal_mu"] if kind == "fedprox_full" else 0.0
        model, curve = fedavg(sites, args, seed, mu=mu)
        result["rows"] = {kind: mean_dice(model, sites)}
        result["curve"] = curve
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def run_real_federation_row(
    args: dict[str, Any], seed: int, sites: list[SimpleNamespace], workdir: Path
) -> dict[str, Any]:
    """FedAvg with full harmonisation through the real federation: a Flower SuperLink and one site kernel per
    hospital on 127.0.0.1, each harmonising its own data in its own job worker.

    The hospitals are generated by the federation itself from the same seed and scale as the in-process rows (the
    generator is deterministic), so the final global model is scored on the same test sets (``sites``); the sites'
    own evaluation of that model is kept beside it as ``site_reported``.
    """
    from flip_lab.cli import demo_plan
    from flip_lab.local import LocalFederation

    started = time.perf_counter()
    with LocalFederation.start(
        len(sites), workdir=workdir / f"federation-seed{seed}", seed=seed, scale=args["scale"]
    ) as fed:
        up_s = time.perf_counter() - started
        job = fed.submit(
            demo_plan(),
            rounds=args["rounds"],
            strategy="fedavg",
            seed=seed,
            local_epochs=args["local_epochs"],
            lr=args["lr"],
            batch_size=args["batch_size"],
            min_sites=len(sites),
            expected_sites=len(sites),
            round_timeout=600,
            extra={"lr_schedule": "cosine"},
        )
        job.wait(timeout=60 * 60)
        history = job.history
        model = plan.model()
        model.load_state_dict(job.final_weights())
    evaluated = history[(history["phase"] == "evaluate") & (history["site"] != "aggregate")]
    curve = evaluated[evaluated["metric"] == "dice"].groupby("round")["value"].mean().sort_index().tolist()
    last = evaluated[evaluated["round"] == evaluated["round"].max()]
    reported = {
        metric: {row.site: float(row.value) for row in last[last["metric"] == metric].itertuples()}
        for metric in ("dice", "loss")
    }
    return {
        "kind": "fedavg_real",
        "seed": seed,
        "rows": {"fedavg_real": mean_dice(model, sites)},
        "curve": curve,
        "model": model,
        "site_reported": reported["dice"],
        "site_reported_loss": reported["loss"],
        "federation_up_s": round(up_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }


def summarise(results: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
    """Mean over sites per seed, then mean and spread over seeds, per row; plus the targets."""
    per_row: dict[str, list[float]] = {}
    per_site: dict[str, list[list[float]]] = {}
    for result in results:
        for row, scores in result["rows"].items():
            per_row.setdefault(row, []).append(float(np.mean(scores)))
            per_site.setdefault(row, []).append([float(s) for s in scores])
    table = {
        row: {
            "label": ROW_LABELS.get(row, row),
            "mean_dice": float(np.mean(v)),
            "std_over_seeds": float(np.std(v)),
            "per_seed": v,
            "per_site_mean": [float(x) for x in np.mean(per_site[row], axis=0)],
        }
        for row, v in per_row.items()
    }
    summary: dict[str, Any] = {"config": args, "rows": table}
    if "fedavg_full" in table:
        fed = table["fedavg_full"]["mean_dice"]
        checks = {}
        if "pooled" in table:
            checks["fedavg_full >= 0.98 x pooled"] = fed >= 0.98 * table["pooled"]["mean_dice"]
        if "local_cross" in table:
            checks["fedavg_full >= local_cross + 0.08"] = fed >= table["local_cross"]["mean_dice"] + 0.08
        if "fedavg_none" in table:
            checks["fedavg_full > fedavg_none"] = fed > table["fedavg_none"]["mean_dice"]
        summary["targets"] = checks
    return summary


def write_outputs(summary: dict[str, Any], results: list[dict[str, Any]], out: Path, site_names: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        **summary,
        "sites": site_names,
        "curves": {f"{r['kind']}/seed{r['seed']}": r["curve"] for r in results if r.get("curve")},
        "job_seconds": {f"{r['kind']}/seed{r['seed']}": r["seconds"] for r in results},
        "real_federation": {
            f"seed{r['seed']}": {k: r[k] for k in ("site_reported", "federation_up_s", "seconds")}
            for r in results
            if r["kind"] == "fedavg_real"
        },
    }
    (out / "heterogeneity.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Heterogeneity benchmark",
        "",
        (
            "Mean over sites of each site's test Dice (lesion class, per image), "
            f"{summary['config']['seeds']} seed(s); "
            f"{summary['config']['rounds']} rounds x {summary['config']['local_epochs']} local epochs, "
            f"batch {summary['config']['batch_size']}, lr {summary['config']['lr']} (cosine over rounds)."
        ),
        "",
        "| setting | mean Dice | std over seeds | " + " | ".join(site_names) + " |",
        "|---|---|---|" + "---|" * len(site_names),
    ]
    for row in ROW_LABELS:
        if row in summary["rows"]:
            r = summary["rows"][row]
            sites = " | ".join(f"{v:.3f}" for v in r["per_site_mean"])
            lines.append(f"| {r['label']} | {r['mean_dice']:.3f} | {r['std_over_seeds']:.3f} | {sites} |")
    if summary["real_federation"]:
        lines += [
            "",
            f"The real-federation row ran on {len(summary['real_federation'])} seed(s): a Flower SuperLink "
            "and one site kernel per hospital on 127.0.0.1, each site harmonising its own data; wall time "
            + ", ".join(f"{v['seconds']:.0f} s" for v in summary["real_federation"].values())
            + " (federation start included).",
        ]
    if summary.get("targets"):
        lines += [
            "",
            "Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in summary["targets"].items()),
        ]
    (out / "heterogeneity.md").write_text("\n".join(lines) + "\n")
    _plot(summary, out / "heterogeneity.png")


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = [r for r in ROW_LABELS if r in summary["rows"]]
    means = [summary["rows"][r]["mean_dice"] for r in rows]
    spread = [summary["rows"][r]["std_over_seeds"] for r in rows]
    bars.barh([ROW_LABELS[r] for r in rows][::-1], means[::-1], xerr=spread[::-1], color="#4c72b0")
    bars.set_xlabel("mean Dice over sites' test sets")
    bars.set_xlim(0, 1)
    for kind in ("pooled", "fedavg_full", "fedavg_real", "fedprox_full", "fedavg_geometric", "fedavg_none"):
        runs = [v for k, v in summary["curves"].items() if k.startswith(kind + "/")]
        if runs:
            curves.plot(range(1, len(runs[0]) + 1), np.mean(runs, axis=0), label=ROW_LABELS[kind])
    curves.set_xlabel("round")
    curves.set_ylabel("mean Dice")
    curves.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer rounds and patients (< 2 min)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--proximal-mu", type=float, default=0.01)
    parser.add_argument("--scale", type=float, default=1.0, help="patients per hospital, relative to the demo")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--real-seeds",
        type=int,
        default=1,
        help="how many seeds also run harmonised FedAvg through the real federation (hub + site "
        "kernels on 127.0.0.1); 0 to skip",
    )
    parser.add_argument("--data", type=Path, default=None, help="where to write the hospitals (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    ns = parser.parse_args(argv)
    if ns.quick:
        # The real federation's row has its own test (tests/test_data_benchmark.py); quick mode stays in-process.
        ns.seeds, ns.rounds, ns.scale, ns.real_seeds = 1, 6, min(ns.scale, 0.5), 0
    args = {
        "rounds": ns.rounds,
        "local_epochs": ns.local_epochs,
        "lr": ns.lr,
        "batch_size": ns.batch_size,
        "proximal_mu": ns.proximal_mu,
        "scale": ns.scale,
        "seeds": ns.seeds,
        "quick": ns.quick,
        "real_seeds": min(ns.real_seeds, ns.seeds),
    }
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="flip-heterogeneity-") as scratch:
        return _run(ns, args, ns.data or Path(scratch))


def _build(task: tuple[Path, int, float]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    return build_federation(*task)


def _run(ns: argparse.Namespace, args: dict[str, Any], data: Path) -> dict[str, Any]:
    started = time.perf_counter()
    seeds = list(range(ns.seeds))
    with ProcessPoolExecutor(max(1, ns.workers)) as pool:
        federations = dict(zip(seeds, pool.map(_build, [(data, seed, ns.scale) for seed in seeds]), strict=True))
        prepared_s = time.perf_counter() - started
        jobs = [
            {"kind": kind, "seed": seed, "args": args, "federation": federations[seed]}
            for seed in seeds
            for kind in (QUICK_JOBS if ns.quick else FULL_JOBS)
        ]
        results = list(pool.map(run_job, jobs))
    # The real federation runs alone: its site kernels share the machine's cores among themselves.
    results.extend(
        run_real_federation_row(args, seed, load_sites(federations[seed], "full"), data)
        for seed in seeds[: args["real_seeds"]]
    )
    summary = summarise(results, args)
    summary["wall_seconds"] = {"data": round(prepared_s, 1), "total": round(time.perf_counter() - started, 1)}
    write_outputs(summary, results, ns.out, [s["name"] for s in federations[0]])
    print((ns.out / "heterogeneity.md").read_text())
    return summary


if __name__ == "__main__":
    main()
