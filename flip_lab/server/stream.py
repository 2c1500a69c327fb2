"""The one event stream: manager messages to every open panel, and the poller that runs while a panel watches.

The manager calls its listeners from worker threads (job followers, polls, a background start). Each message is
serialised there, once, and handed to the server's event loop with ``call_soon_threadsafe``; only the loop writes to
WebSockets. Sites and the hub's job list are polled only while at least one panel is open, so an idle JupyterLab
costs the hub nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Protocol

from .manager import FederationManager, Listener
from .messages import StreamMessage

log = logging.getLogger("flip_lab.server")
MIN_INTERVAL_S = 1.0
MAX_INTERVAL_S = 60.0


class Socket(Protocol):
    def send(self, text: str) -> None: ...


def clamp_interval(value: object, default: float) -> float:
    """A panel may ask for its own poll interval (seconds); keep it within what the hub should bear."""
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default
    if not math.isfinite(seconds):
        return default
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, seconds))


class EventStream:
    """Fan-out of ``FederationManager`` messages to sockets, plus the poll loop."""

    def __init__(self, manager: FederationManager, *, poll_interval: float = 2.0) -> None:
        self.manager = manager
        self.poll_interval = poll_interval
        self._sockets: dict[Socket, tuple[Listener, float]] = {}
        self._poller: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def add(self, socket: Socket, interval: float | None = None) -> None:
        """Send ``socket`` the snapshot now and every change after it. Call on the event loop."""
        loop = asyncio.get_running_loop()

        def listener(message: StreamMessage) -> None:
            text = json.dumps(message)
            loop.call_soon_threadsafe(self._deliver, socket, text)

        snapshot = self.manager.subscribe(listener)
        # Sent before this coroutine yields, so it precedes every message the listener schedules.
        socket.send(json.dumps(snapshot))
        self._sockets[socket] = (listener, interval or self.poll_interval)
        if self._poller is None or self._poller.done():
            self._poller = loop.create_task(self._poll_loop())
        self._wake.set()

    def remove(self, socket: Socket) -> None:
        entry = self._sockets.pop(socket, None)
        if entry is not None:
            self.manager.unsubscribe(entry[0])

    def refresh_soon(self) -> None:
        """Poll now instead of at the end of the current interval (e.g. right after a dispatch)."""
        self._wake.set()

    def close(self) -> None:
        for socket in list(self._sockets):
            self.remove(socket)
        if self._poller is not None:
            self._poller.cancel()

    def _deliver(self, socket: Socket, text: str) -> None:
        if socket in self._sockets:
            socket.send(text)

    async def _poll_loop(self) -> None:
        while self._sockets:
            try:
                await asyncio.to_thread(self.manager.poll)
            except Exception:  # a poll must never end the stream; the next one may succeed
                log.exception("polling the federation failed")
            interval = min(entry[1] for entry in self._sockets.values()) if self._sockets else 0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except TimeoutError:
                pass
