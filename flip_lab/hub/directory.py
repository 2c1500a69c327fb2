"""A directory request at the hub: ask every online site for its name and public catalogue, once.

A real hub knows its sites only as Flower node ids; their names and catalogues live at the sites. The researcher's
``Federation`` starts a run whose bundle is a directory request (:func:`flip_lab._bundle.directory_bundle`); the
hub's study process, seeing that kind, calls :func:`answer_directory` instead of the ServerApp. It sends one
``query`` message (op ``directory``) to each online node, waits at most ``DIRECTORY_TIMEOUT_S`` for the replies and
prints one event per site, so the researcher reads them from the run's log like any job's events. Nothing here
needs a plan or an approval: a site answers with what its data owner publishes anyway.
"""

from __future__ import annotations

import json
import time

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from .._directory import MAX_CATALOGUE_CHARS, clean_catalogue, clean_name
from .events import EventSink
from .grid import Exchange, parse_site_error, site_info

DIRECTORY_TIMEOUT_S = 10.0  # a site that has not answered by then is listed without its name


def answer_directory(grid: Grid, sink: EventSink, timeout: float = DIRECTORY_TIMEOUT_S) -> None:
    """Ask every online node; emit ``directory_site`` or ``directory_error`` per node, then ``directory_finished``."""
    from flip_common.flower import fast_object_pulls

    fast_object_pulls()
    started = time.monotonic()
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({"config": ConfigRecord({"op": "directory"})})
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    exchange = Exchange(grid, messages)
    answered = 0
    for node, reply in exchange.replies(started + timeout):
        if reply.has_error():
            kind, message = parse_site_error(reply.error.reason, int(reply.error.code))
            sink.emit("directory_error", node_id=node, kind=kind, message=message)
            continue
        try:
            info = site_info(reply)
            catalogue = clean_catalogue(json.loads(str(info.get("catalogue", ""))[:MAX_CATALOGUE_CHARS]))
        except (TypeError, ValueError):  # ProtocolError too: a ValueError
            sink.emit(
                "directory_error", node_id=node, kind="bad_reply", message="the site's catalogue was not readable"
            )
            continue
        sink.emit("directory_site", node_id=node, site=clean_name(info.get("site", "")), catalogue=catalogue)
        answered += 1
    for node in exchange.waiting.values():
        sink.emit("directory_error", node_id=node, kind="no_answer", message=f"no answer within {timeout:g} s")
    sink.emit("directory_finished", asked=len(nodes), answered=answered, wall_s=round(time.monotonic() - started, 3))
