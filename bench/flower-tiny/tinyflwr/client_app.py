"""Stock Flower ClientApp: train and evaluate the tiny model."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import evaluate, model, train

app = ClientApp()


@app.train()
def fit(msg: Message, context: Context) -> Message:
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = train(net, int(context.node_id) % 1000)
    content = RecordDict(
        {"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"loss": loss, "num-examples": 32})}
    )
    return Message(content=content, reply_to=msg)


@app.evaluate()
def check(msg: Message, context: Context) -> Message:
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = evaluate(net, int(context.node_id) % 1000)
    return Message(content=RecordDict({"metrics": MetricRecord({"loss": loss, "num-examples": 32})}), reply_to=msg)
