"""The bundle's ClientApp entry: a marker, never executed by a FLIP site.

A FLIP site kernel runs its SuperNode with ``--isolation process`` and executes every message with its own trusted
executor; bundle code is data to it. A stock Flower SuperNode that loads this app gets a clear refusal instead of
running researcher code outside any site governance.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    raise RuntimeError("FLIP plans run only under a FLIP site kernel (`flip-site run`), never in a plain SuperNode")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    raise RuntimeError("FLIP plans run only under a FLIP site kernel (`flip-site run`), never in a plain SuperNode")
