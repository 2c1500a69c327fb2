"""Stock Flower on the same tiny task, for the benchmarks' ratios: Flower's deployment runtime (a SuperLink and N
SuperNodes on 127.0.0.1, each ``--insecure``, Flower's default process isolation) running the App in
``bench/flower-tiny`` (the tiny plan's model, FedAvg, train + evaluate each round, like a FLIP round).

Flower's simulation runtime needs Ray, which this environment does not install (and benchmarks download nothing):
:func:`simulation_available` says so, and the results record it as not measured.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flip_common.net import free_port
from flip_lab._flower import ControlClient
from flip_lab.supervisor import flower_env, listening, stop_pids

APP = Path(__file__).resolve().parent / "flower-tiny"
BIN = Path(sys.executable).parent


def simulation_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def build_fab(folder: Path) -> bytes:
    subprocess.run([str(BIN / "flwr"), "build", "--app", str(APP)], cwd=folder, check=True, capture_output=True)
    return next(folder.glob("*.fab")).read_bytes()


def deployment(n_nodes: int, rounds: int, *, timeout: float = 1800) -> dict[str, Any]:
    """Start a stock SuperLink and ``n_nodes`` SuperNodes, run ``rounds`` rounds; times in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fab = build_fab(work)
        port = free_port()
        pids: list[int] = []
        started = time.time()
        try:
            pids.append(_spawn(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)], work))
            for _ in range(n_nodes):
                node = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1"]
                pids.append(_spawn([*node, "--port", str(free_port())], work))
            while not listening(port):
                time.sleep(0.05)
            client = ControlClient(f"127.0.0.1:{port}")
            while sum(n.status == "online" for n in _nodes(client)) < n_nodes:
                if time.time() - started > timeout:
                    raise TimeoutError("stock SuperNodes did not come online")
                time.sleep(0.05)
            online_s = time.time() - started
            timing = work / "timing.json"
            submitted = time.time()
            run_id = client.start_run(
                fab, {"num-server-rounds": rounds, "min-nodes": n_nodes, "timing-file": str(timing)}
            )
            while True:
                (run,) = client.list_runs(run_id)
                if run.status == "finished":
                    break
                if time.time() - submitted > timeout:
                    raise TimeoutError("the stock Flower run did not finish")
                time.sleep(0.2)
            if not timing.exists():  # the rounds did not all run
                text = next(work.glob("flower-superlink-*.log")).read_text(errors="replace")
                tail = "\n".join(
                    line for line in text.splitlines() if "ListRuns" not in line and "list-runs" not in line
                )[-3000:]
                import shutil

                shutil.copytree(work, Path(tempfile.gettempdir()) / "stock-flower-failed", dirs_exist_ok=True)
                raise RuntimeError(f"the stock Flower run ended {run.sub_status}: {run.details}\n{tail}")
            marks = json.loads(timing.read_text())
            ends = marks["round_ends"]
            client.close()
            return {
                "start_to_online_s": online_s,
                "submit_to_first_round_end_s": ends[0] - submitted,
                "round_s": [b - a for a, b in itertools.pairwise(ends)],
                # Under heavy load Flower may mark a run whose rounds all ran as failed ("No heartbeat received
                # from the task") while its ServerApp process exits: recorded, the rounds' times stand.
                "flower_status": f"{run.status}:{run.sub_status}",
            }
        finally:
            stop_pids(pids)


def _spawn(cmd: list[str], work: Path) -> int:
    """Start one of Flower's commands (from this environment) in a session of its own; its output in WORK."""
    with open(work / f"{cmd[0]}-{len(list(work.glob('*.log')))}.log", "ab") as log:
        return subprocess.Popen(
            [str(BIN / cmd[0]), *cmd[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=flower_env(),
            cwd=work,
        ).pid


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of :func:`deployment`, with the runs."""
    return {
        "start_to_online_s": statistics.median(r["start_to_online_s"] for r in runs),
        "median_round_s": statistics.median(x for r in runs for x in r["round_s"]),
        "runs": runs,
    }


def simulation_note() -> str:
    if simulation_available():
        return "available but not run by these benchmarks"
    return "not measured: Flower's simulation runtime needs Ray, which is not installed (benchmarks download nothing)"


def _nodes(client: ControlClient) -> list[Any]:
    try:
        return client.list_nodes()
    except Exception:  # the Control API is not answering yet
        return []
