"""Stock Flower ServerApp: FedAvg rounds of train + evaluate on every node, each round's wall time written to
``timing-file`` (JSON lines) for the benchmarks."""

from __future__ import annotations

import json
import time

from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from .task import model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    timing = str(context.run_config["timing-file"])
    need = int(context.run_config["min-nodes"])
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_available_nodes=need,
        min_train_nodes=need,
        min_evaluate_nodes=need,
    )
    marks: list[float] = []
    original = strategy.aggregate_evaluate

    def aggregate_evaluate(server_round, replies):  # type: ignore[no-untyped-def]
        marks.append(time.time())
        return original(server_round, replies)

    strategy.aggregate_evaluate = aggregate_evaluate  # type: ignore[method-assign]
    started = time.time()
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model().state_dict()), num_rounds=rounds)
    if timing:
        with open(timing, "w") as fh:
            json.dump({"started": started, "round_ends": marks}, fh)
