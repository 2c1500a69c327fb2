"""What privacy costs per round: differential privacy at the sites and secure aggregation, on and off, 3 and 10 sites.

    python bench/privacy_cost.py                 # 3 and 10 sites, 3 jobs x 4 rounds per setting
    python bench/privacy_cost.py --sites 3 --repeats 1

Each setting runs the tiny plan of ``tests/plans/tiny_plan.py`` on a real local federation (a Flower SuperLink and
one site kernel per simulated hospital on 127.0.0.1). The figure is the median wall time of a round at the hub
(from one round's evaluation aggregate to the next), over every round after the first of ``--repeats`` jobs:
training time is included and the same in every setting, so the differences are what privacy adds.

- ``dp``: every site's policy gains a ``[dp]`` section (clip 0.01, noise multiplier 1.0, an ample budget): each site
  clips and noises its update and records the spend in its ledger before replying.
- ``secure_aggregation``: the job is submitted with ``secure_aggregation=True`` (pairwise masking between sites,
  fresh keys every round); every site's policy bounds its own update (``[secure_aggregation] max_update_norm``).

The sites' policies allow a cohort of one (``min_cohort = 1``) because the hospitals are tiny, for speed: this
benchmark is about time, not learning. Results: ``bench/results/privacy_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

import flip_lab
from flip_lab.config import SCHEMA
from flip_lab.local import LocalFederation

ROOT = Path(__file__).resolve().parent.parent
PLAN = ROOT / "tests" / "plans" / "tiny_plan.py"
OUT = Path(__file__).resolve().parent / "results"
# Under secure aggregation the hub cannot screen updates, so each site bounds its own (the tiny model's updates
# stay far below this bound).
SECAGG_SECTION = "\n[secure_aggregation]\nmax_update_norm = 10.0\n"
DP_SECTION = "\n[dp]\nclip_norm = 0.01\nnoise_multiplier = 1.0\nepsilon_budget = 1000000.0\ndelta = 1e-05\n"
SETTINGS = {  # name -> (dp at the sites, secure aggregation)
    "plain": (False, False),
    "dp": (True, False),
    "secure_aggregation": (False, True),
    "dp + secure_aggregation": (True, True),
}


def round_times(events: list[dict[str, Any]]) -> list[float]:
    """Wall time of each round after the first: evaluation aggregate to evaluation aggregate, at the hub."""
    done = sorted(e["t"] for e in events if e["type"] == "aggregate" and e["phase"] == "evaluate")
    return [b - a for a, b in itertools.pairwise(done)]


def set_policies(fed: LocalFederation, *, dp: bool) -> None:
    for site_dir in fed.site_dirs.values():
        path = site_dir / "policy.toml"
        text = path.read_text().split(SECAGG_SECTION)[0].replace("min_cohort = 10", "min_cohort = 1")
        path.write_text(text + SECAGG_SECTION + (DP_SECTION if dp else ""))


def measure(
    fed: LocalFederation, plan: flip_lab.Plan, n_sites: int, *, secagg: bool, repeats: int, rounds: int
) -> tuple[list[float], int]:
    """Round times over ``repeats`` jobs, and how many site errors (timeouts, missed heartbeats) they had."""
    extra = {"secure_aggregation": True} if secagg else {}
    times: list[float] = []
    dropped: list[str] = []
    for _ in range(repeats):
        # On 2 cores ten site kernels can miss a heartbeat under load: a round may go on without one of them.
        job = fed.submit(
            plan,
            rounds=rounds,
            local_epochs=1,
            min_sites=max(2, n_sites - 2),
            expected_sites=n_sites,
            round_timeout=600,
            **extra,
        )
        job.wait(timeout=1800)
        times += round_times(job.events)
        dropped.extend(e["site"] for e in job.errors if e["type"] == "site_error")
    return times, len(dropped)


def run(n_sites: int, repeats: int, rounds: int) -> dict[str, Any]:
    plan = flip_lab.Plan.from_file(PLAN)
    secagg_available = "secure_aggregation" in SCHEMA
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with LocalFederation.start(n_sites, workdir=tmp, scale=0.1) as fed:
            up_s = time.perf_counter() - started
            set_policies(fed, dp=False)
            try:  # harmonise and cache every site's data; ten cold sites on two cores may lose one here
                measure(fed, plan, n_sites, secagg=False, repeats=1, rounds=1)
            except flip_lab.errors.JobFailed as err:
                print(f"warm-up job failed ({err}); running it again", file=sys.stderr)
                measure(fed, plan, n_sites, secagg=False, repeats=1, rounds=1)
            for name, (dp, secagg) in SETTINGS.items():
                if secagg and not secagg_available:
                    rows[name] = {"available": False}
                    continue
                set_policies(fed, dp=dp)
                times, errors = measure(fed, plan, n_sites, secagg=secagg, repeats=repeats, rounds=rounds)
                rows[name] = {
                    "available": True,
                    "median_round_s": statistics.median(times),
                    "round_s": times,
                    "site_errors": errors,
                }
            set_policies(fed, dp=False)
    return {"sites": n_sites, "federation_up_s": round(up_s, 1), "rows": rows}


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | " + " | ".join(f"{r['sites']} sites: round time (vs plain)" for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for name in SETTINGS:
        cells = []
        for result in results:
            row, plain = result["rows"][name], result["rows"]["plain"]["median_round_s"]
            if not row["available"]:
                cells.append("not available in this version")
            else:
                cells.append(f"{row['median_round_s']:.2f} s (x{row['median_round_s'] / plain:.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    load_before = psutil.getloadavg()[0]
    results: list[dict[str, Any]] = []
    for n in args.sites:  # written after each federation size, so a later failure keeps what was measured
        results.append(run(n, args.repeats, args.rounds))
        summary = {
            "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB",
            "load_average_at_start": load_before,
            "load_average_at_end": psutil.getloadavg()[0],
            "repeats": args.repeats,
            "rounds": args.rounds,
            "results": results,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "privacy_cost.json").write_text(json.dumps(summary, indent=1))
        text = table(results)
        (args.out / "privacy_cost.md").write_text(
            text + f"\nMedian round wall time at the hub, tiny plan, {args.repeats} job(s) x {args.rounds} rounds; "
            f"load average {load_before:.1f} at the start, {summary['load_average_at_end']:.1f} at the end.\n"
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
