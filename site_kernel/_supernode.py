"""Run Flower's SuperNode with the site's polling interval.

Flower 1.42's SuperNode sleeps a fixed 3 s between polls of the hub when idle and 0.5 s while it waits for a reply
to be ready (``supernode/start_client_internal.py``): with two phases per round that alone costs several seconds of
every round. The site kernel starts the unmodified SuperNode through this module, which only shortens those two
sleeps (the site's ``poll_interval``, 0.1 s by default, backing off to 1 s once the site has been idle for 30 s,
see :mod:`site_kernel._pace`; 20 ms while waiting for its own executor). Everything else is Flower's code path: ``python -m site_kernel._supernode POLL_S [flower-supernode arguments...]``.
"""

from __future__ import annotations

import sys
import time
import types

from ._pace import IdlePacer


IDLE_CAP_S = 1.0  # the longest wait between polls of the hub, once the site has been idle a while


def _patched_time(idle_s: float) -> types.SimpleNamespace:
    real_sleep = time.sleep
    pacer = IdlePacer(idle_s, IDLE_CAP_S)

    def sleep(seconds: float) -> None:
        if seconds >= 3:  # the idle poll between requests to the hub
            real_sleep(pacer.next_wait())
        elif seconds == 0.5:  # waiting for the site's executor to finish a reply: the site is in a study
            pacer.active()
            real_sleep(0.02)
        else:
            real_sleep(seconds)

    names = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    names["sleep"] = sleep
    return types.SimpleNamespace(**names)


def main() -> None:
    idle_s = float(sys.argv[1])
    sys.argv = ["flower-supernode", *sys.argv[2:]]
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from ._flower_runtime import fast_object_pulls

    sci.time = _patched_time(idle_s)  # type: ignore[assignment]
    fast_object_pulls()
    flower_supernode()


if __name__ == "__main__":
    main()
