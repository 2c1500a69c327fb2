"""Platform overhead of the spine: 3 sites, a tiny model, loopback. Results: bench/results/spine_overhead.{json,md}.

- per-round overhead: a round's wall time at the hub (training pushed -> evaluation aggregated) minus the slowest
  site's compute in each phase (the time the plan functions themselves ran);
- cold start: from the researcher's ``submit`` call to the first site starting ``train()`` (sites' clocks are this
  machine's clock), with the harmonised data already cached from an earlier job;
- idle site kernel memory: resident memory of one site (daemon + SuperNode) after its job's worker was released;
- the sandbox's cost: the same per-round overhead with the sandbox switched off (demo policy only).

Each figure is the median over ``--repeats`` jobs. ``python bench/spine_overhead.py [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

import flip_lab
from flip_lab.local import LocalFederation

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "tests" / "plans" / "tiny_plan.py"
OUT = Path(__file__).resolve().parent / "results"


def round_overheads(events: list[dict]) -> list[float]:
    out = []
    rounds = sorted({e["round"] for e in events if e["type"] == "aggregate"})
    for r in rounds:
        pushed = [e["t"] for e in events if e["type"] == "site_state" and e["round"] == r and e["state"] == "training"]
        done = [e["t"] for e in events if e["type"] == "aggregate" and e["round"] == r and e["phase"] == "evaluate"]
        compute = 0.0
        for phase in ("train", "evaluate"):
            times = [e["compute_s"] for e in events if e["type"] == "reply" and e["round"] == r and e["phase"] == phase]
            compute += max(times) if times else 0.0
        if pushed and done:
            out.append(done[0] - min(pushed) - compute)
    return out


def run_job(fed: LocalFederation, plan: flip_lab.Plan, rounds: int) -> dict:
    t0 = time.time()
    job = fed.submit(plan, rounds=rounds, expected_sites=3, min_sites=3, local_epochs=1, round_timeout=300)
    job.wait(timeout=900)
    events = job.events
    starts = [e["started_at"] for e in events if e["type"] == "reply" and e["round"] == 1 and e["phase"] == "train"]
    overheads = round_overheads(events)
    return {
        "cold_start_s": min(starts) - t0,
        "round_overheads_s": overheads[1:] or overheads,
        "first_round_overhead_s": overheads[0] if overheads else None,
    }


def site_memory_mb(fed: LocalFederation) -> float:
    pid = next(iter(fed.state["site_pids"].values()))
    family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return sum(p.memory_info().rss for p in family) / 2**20


def set_sandbox(fed: LocalFederation, enabled: bool) -> None:
    from site_kernel.settings import load_settings, write_settings

    for site_dir in fed.site_dirs.values():
        settings = load_settings(site_dir)
        write_settings(site_dir, type(settings)(**{**settings.__dict__, "sandbox": enabled}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    plan = flip_lab.Plan.from_file(PLAN)
    results: dict = {
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "sites": 3,
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory() as tmp, LocalFederation.start(3, workdir=tmp, scale=0.3) as fed:
        run_job(fed, plan, 1)  # harmonise and cache each site's data once
        for label, sandbox in (("sandbox_on", True), ("sandbox_off", False)):
            set_sandbox(fed, sandbox)
            runs = [run_job(fed, plan, args.rounds) for _ in range(args.repeats)]
            results[label] = {
                "per_round_overhead_s": statistics.median(o for r in runs for o in r["round_overheads_s"]),
                "cold_start_s": statistics.median(r["cold_start_s"] for r in runs),
                "runs": runs,
            }
        set_sandbox(fed, True)
        from site_kernel.settings import load_settings, write_settings

        for site_dir in fed.site_dirs.values():  # let the workers go, then measure an idle site
            s = load_settings(site_dir)
            write_settings(site_dir, type(s)(**{**s.__dict__, "worker_idle_s": 1.0}))
        time.sleep(10)
        results["idle_site_memory_mb"] = site_memory_mb(fed)
    on, off = results["sandbox_on"], results["sandbox_off"]
    results["sandbox_cost_per_round_s"] = on["per_round_overhead_s"] - off["per_round_overhead_s"]
    OUT.mkdir(exist_ok=True)
    (OUT / "spine_overhead.json").write_text(json.dumps(results, indent=1))
    table = (
        "| measure (3 sites, tiny model, loopback, median) | result | target |\n|---|---|---|\n"
        f"| per-round platform overhead | {on['per_round_overhead_s']:.2f} s | <= 0.5 s |\n"
        f"| cold start (submit -> first site training) | {on['cold_start_s']:.2f} s | <= 5 s |\n"
        f"| idle site kernel memory (daemon + SuperNode) | {results['idle_site_memory_mb']:.0f} MB | <= 300 MB |\n"
        f"| sandbox cost per round (on - off) | {results['sandbox_cost_per_round_s']:+.2f} s | <= 0.3 s |\n"
    )
    (OUT / "spine_overhead.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
