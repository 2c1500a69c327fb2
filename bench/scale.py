"""Round time as a federation grows: 3, 10 and 20 sites on one machine, the tiny plan, FLIP Lab and stock Flower.

    python bench/scale.py                        # 3 and 10 sites (20 with --sites 3 10 20), 1 job x 4 rounds
    python bench/scale.py --sites 3 10 20 --repeats 2

For each size: a real local federation (a SuperLink, FLIP's runner and one site kernel per simulated hospital, small
hospitals: ``scale=0.1``), one warm-up round (each site harmonises and caches its data), then ``--repeats`` jobs of
``--rounds`` rounds of the tiny plan (``tests/plans/tiny_plan.py``). The figure is the median wall time of a round
at the hub (evaluation aggregate to evaluation aggregate, rounds after the first), and the sites lost along the way
(a ``site_error`` of kind ``site_offline``: a site whose heartbeat the hub missed). The same task runs on stock
Flower's deployment runtime (``bench/stock_flower.py``: SuperLink and N SuperNodes on 127.0.0.1) for the ratio.
Flower's simulation runtime needs Ray, which is not installed here, and is recorded as not measured.

Results: ``bench/results/scale.{json,md}``, with the load average at the start and end of each size: on a shared
2-core machine every figure grows with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

import flip_lab
from flip_lab.local import LocalFederation

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

import stock_flower

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "tests" / "plans" / "tiny_plan.py"
OUT = Path(__file__).resolve().parent / "results"


def flip_rounds(n_sites: int, repeats: int, rounds: int) -> dict[str, Any]:
    plan = flip_lab.Plan.from_file(PLAN)
    times: list[float] = []
    lost: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with LocalFederation.start(n_sites, workdir=tmp, scale=0.1, watch_parent=False) as fed:
            up_s = time.perf_counter() - started
            for policy in (d / "policy.toml" for d in fed.site_dirs.values()):  # tiny hospitals: a cohort of one
                policy.write_text(policy.read_text().replace("min_cohort = 10", "min_cohort = 1"))
            for i in range(repeats + 1):  # the first job warms the sites' data caches
                job = fed.submit(
                    plan,
                    rounds=1 if i == 0 else rounds,
                    local_epochs=1,
                    min_sites=max(2, n_sites - 2),
                    expected_sites=n_sites,
                    round_timeout=900,
                )
                job.wait(timeout=3600, raise_on_failure=False)
                lost += [e["site"] for e in job.errors if e["type"] == "site_error" and e["kind"] == "site_offline"]
                if i:
                    done = sorted(e["t"] for e in job.events if e["type"] == "aggregate" and e["phase"] == "evaluate")
                    times += [b - a for a, b in itertools.pairwise(done)]
    return {
        "start_to_online_s": up_s,
        "median_round_s": statistics.median(times) if times else None,
        "round_s": times,
        "sites_lost_to_heartbeats": len(lost),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-stock", action="store_true", help="FLIP Lab only")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "repeats": args.repeats,
        "rounds": args.rounds,
        "stock_flower_simulation": stock_flower.simulation_note(),
        "sizes": [],
    }
    for n in args.sites:
        row: dict[str, Any] = {"sites": n, "load_average_at_start": os.getloadavg()[0]}
        row["flip"] = flip_rounds(n, args.repeats, args.rounds)
        if not args.no_stock:
            runs = [stock_flower.deployment(n, args.rounds) for _ in range(args.repeats)]
            row["stock_flower_deployment"] = stock_flower.summary(runs)
        row["load_average_at_end"] = os.getloadavg()[0]
        results["sizes"].append(row)
        OUT.mkdir(exist_ok=True)
        (OUT / "scale.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (OUT / "scale.md").write_text(table)
    print(table)
    return 0


def markdown(results: dict[str, Any]) -> str:
    base = next((r["flip"]["median_round_s"] for r in results["sizes"] if r["sites"] == 3), None)
    lines = [
        (
            "| sites | FLIP round (vs 3 sites) | stock Flower round | FLIP / stock | sites lost | FLIP start to online "
            "| load avg |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["sizes"]:
        flip = r["flip"]["median_round_s"]
        stock = r.get("stock_flower_deployment", {}).get("median_round_s")
        vs = f" (x{flip / base:.2f})" if flip and base else ""
        ratio = f"x{flip / stock:.2f}" if flip and stock else "-"
        lines.append(
            f"| {r['sites']} | {flip:.2f} s{vs} | {f'{stock:.2f} s' if stock else '-'} | {ratio} | "
            f"{r['flip']['sites_lost_to_heartbeats']} | {r['flip']['start_to_online_s']:.1f} s | "
            f"{r['load_average_at_start']:.1f}-{r['load_average_at_end']:.1f} |"
            if flip
            else f"| {r['sites']} | no round completed | - | - | {r['flip']['sites_lost_to_heartbeats']} | - | - |"
        )
    lines += [
        "",
        (
            f"Median of {results['rounds']}-round jobs x {results['repeats']}, rounds after the first; "
            f"{results['machine']}. Flower's simulation runtime: {results['stock_flower_simulation']}."
        ),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
