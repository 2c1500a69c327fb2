"""How long an idle site waits between polls: briefly while it is in a study, longer once it has been idle a while.

A site polls twice over: its SuperNode asks the hub for messages, and its executor asks the SuperNode for tasks.
Polling every 0.1 s and 20 ms keeps round latency low, but on a machine that runs a hub and three idle sites it cost
more than one CPU core (104%, measured on an idle local federation; 15% with this pacing), most of it the hub
answering the polls. So each poller polls fast for ``hot_s`` after its last piece of work and then doubles its wait up
to ``cap_s``: a study's rounds see the fast interval, and the first message after a long pause waits ``cap_s`` at most.
No library paces a polling loop like this; Flower's own SuperNode sleeps a fixed 3 s.
"""

from __future__ import annotations

import time

HOT_S = 30.0  # seconds after its last work during which a poller keeps its fast interval


class IdlePacer:
    """The wait before the next poll: ``fast_s`` within ``hot_s`` of the last :meth:`active`, then doubling to
    ``cap_s``."""

    def __init__(self, fast_s: float, cap_s: float, hot_s: float = HOT_S) -> None:
        self.fast_s = fast_s
        self.cap_s = max(cap_s, fast_s)
        self.hot_s = hot_s
        self._last_active = time.monotonic()
        self._wait = fast_s

    def active(self) -> None:
        """Work arrived: poll fast again."""
        self._last_active = time.monotonic()
        self._wait = self.fast_s

    def next_wait(self) -> float:
        if time.monotonic() - self._last_active < self.hot_s:
            self._wait = self.fast_s
        else:
            self._wait = min(self.cap_s, self._wait * 2)
        return self._wait
