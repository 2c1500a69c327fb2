"""Platform overhead of the spine: 3 sites, a tiny model, loopback. Results: bench/results/spine_overhead.{json,md}.

- per-round overhead: a round's wall time at the hub (training pushed -> evaluation aggregated) minus the slowest
  site's compute in each phase (the time the plan functions themselves ran);
- cold start: from the researcher's ``submit`` call to the first site starting ``train()`` (sites' clocks are this
  machine's clock), with the harmonised data already cached from an earlier job;
- idle site kernel memory: resident memory of one site (daemon + SuperNode) after its job's worker was released;
- the sandbox's cost: the same per-round overhead with the sandbox switched off (demo policy only);
- federation start: ``LocalFederation.start(3)`` to all three sites online at the hub, the simulated hospitals
  already in the cache (a first start on a machine also generates them);
- dead-site detection: a site kernel's PID killed (SIGKILL) to the hub no longer listing that site as online;
- idle CPU: the CPU time of every process of an idle 3-site federation (hub, runner, sites, SuperNodes) over 20 s,
  as a share of one core;
- stock Flower: the same tiny task on Flower's deployment runtime (``bench/stock_flower.py``): start to all
  SuperNodes online and round time, so the table shows ratios. Flower's simulation runtime needs Ray, which is not
  installed here, and is recorded as not measured.

Each figure is the median over ``--repeats`` jobs (``--starts`` starts). ``python bench/spine_overhead.py
[--repeats 5] [--only start,dead,idle,rounds,stock]``. The load average during the run is recorded with the results:
on a shared machine every figure grows with it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
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
    done = sorted(e["t"] for e in events if e["type"] == "aggregate" and e["phase"] == "evaluate")
    return {
        "round_s": [b - a for a, b in itertools.pairwise(done)],
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


def start_and_kill(starts: int) -> dict:
    """Start-to-online times of ``starts`` 3-site federations and, in each, how long the hub takes to stop listing a
    killed site as online."""
    from flip_lab.local import _node_id

    up, dead = [], []
    for _ in range(starts):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            with LocalFederation.start(3, workdir=tmp, watch_parent=False) as fed:
                up.append(time.perf_counter() - t0)
                victim = min(fed.site_dirs)
                node = _node_id(fed.site_dirs[victim])
                t1 = time.perf_counter()
                os.kill(fed.state["site_pids"][victim], signal.SIGKILL)
                while {n.node_id: n.status for n in fed.nodes()}.get(node) == "online":
                    if time.perf_counter() - t1 > 120:
                        break
                    time.sleep(0.05)
                dead.append(time.perf_counter() - t1)
    return {"start_to_online_s": up, "dead_site_noticed_s": dead}


def idle_cpu(fed: LocalFederation, seconds: float = 20.0) -> float:
    """Share of one core used by the federation's processes (all descendants) over ``seconds`` of idling."""
    family: dict[int, psutil.Process] = {}
    for pid in fed.state["pids"]:
        try:
            root = psutil.Process(pid)
            family.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            pass

    def used() -> float:
        total = 0.0
        for proc in family.values():
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    before = used()
    time.sleep(seconds)
    return (used() - before) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--only", default="start,dead,idle,rounds,stock")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    plan = flip_lab.Plan.from_file(PLAN)
    results: dict = {
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "load_average_at_start": os.getloadavg()[0],
        "sites": 3,
        "repeats": args.repeats,
        "rounds": args.rounds,
    }
    if only & {"start", "dead"}:
        starts = start_and_kill(args.starts)
        results["start"] = {
            "start_to_online_s": statistics.median(starts["start_to_online_s"]),
            "dead_site_noticed_s": statistics.median(starts["dead_site_noticed_s"]),
            "runs": starts,
        }
    if only & {"idle", "rounds"}:
        with tempfile.TemporaryDirectory() as tmp, LocalFederation.start(3, workdir=tmp, scale=0.3) as fed:
            run_job(fed, plan, 1)  # harmonise and cache each site's data once
            if "idle" in only:
                time.sleep(35)  # past the sites' idle back-off (30 s)
                results["idle_cpu_share_of_one_core"] = idle_cpu(fed)
            if "rounds" in only:
                rounds_and_memory(fed, plan, args, results)
    if "stock" in only:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import stock_flower

        runs = [stock_flower.deployment(3, args.rounds) for _ in range(max(1, args.repeats // 2))]
        results["stock_flower_deployment"] = stock_flower.summary(runs)
        results["stock_flower_simulation"] = stock_flower.simulation_note()
    results["load_average_at_end"] = os.getloadavg()[0]
    OUT.mkdir(exist_ok=True)
    (OUT / "spine_overhead.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (OUT / "spine_overhead.md").write_text(table)
    print(table)
    return 0


def rounds_and_memory(fed: LocalFederation, plan: flip_lab.Plan, args: argparse.Namespace, results: dict) -> None:
    for label, sandbox in (("sandbox_on", True), ("sandbox_off", False)):
        set_sandbox(fed, sandbox)
        runs = [run_job(fed, plan, args.rounds) for _ in range(args.repeats)]
        times = [t for r in runs for t in r["round_s"]]
        results[label] = {
            "per_round_overhead_s": statistics.median(o for r in runs for o in r["round_overheads_s"]),
            "round_s": statistics.median(times) if times else None,
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


def markdown(r: dict) -> str:
    rows = [
        "| measure (3 sites, tiny model, loopback, median) | FLIP Lab | stock Flower deployment | target |",
        "|---|---|---|---|",
    ]
    stock = r.get("stock_flower_deployment", {})

    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    if "start" in r:
        st = stock.get("start_to_online_s")
        ratio = f" (x{r['start']['start_to_online_s'] / st:.2f})" if st else ""
        rows.append(f"| start to all sites online | {s(r['start']['start_to_online_s'])}{ratio} | {s(st)} | <= 5 s |")
        rows.append(f"| killed site noticed by the hub | {s(r['start']['dead_site_noticed_s'])} | - | <= 5 s |")
    if "idle_cpu_share_of_one_core" in r:
        rows.append(
            f"| idle 3-site federation, CPU | {100 * r['idle_cpu_share_of_one_core']:.0f}% of a core | - | <= 5% |"
        )
    if "sandbox_on" in r:
        on = r["sandbox_on"]
        st = stock.get("median_round_s")
        ratio = f" (x{on['round_s'] / st:.2f})" if st and on.get("round_s") else ""
        rows.append(f"| round time | {s(on.get('round_s'))}{ratio} | {s(st)} | - |")
        rows.append(f"| per-round platform overhead | {s(on['per_round_overhead_s'])} | - | <= 0.5 s |")
        rows.append(f"| cold start (submit -> first site training) | {s(on['cold_start_s'])} | - | <= 3 s |")
        rows.append(f"| idle site kernel memory | {r['idle_site_memory_mb']:.0f} MB | - | <= 300 MB |")
        rows.append(f"| sandbox cost per round (on - off) | {r['sandbox_cost_per_round_s']:+.2f} s | - | <= 0.3 s |")
    elif "median_round_s" in stock:
        rows.append(f"| round time | - | {s(stock['median_round_s'])} | - |")
    rows.append("")
    rows.append(
        f"Load average {r['load_average_at_start']:.1f} at the start, {r['load_average_at_end']:.1f} at the end "
        f"({r['machine']}). Flower's simulation runtime: {r.get('stock_flower_simulation', 'not run')}."
    )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
