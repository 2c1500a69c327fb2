"""Run Flower's SuperNode with the site's polling interval.

Flower 1.42's SuperNode sleeps a fixed 3 s between polls of the hub when idle and 0.5 s while it waits for a reply
to be ready (``supernode/start_client_internal.py``): with two phases per round that alone costs several seconds of
every round. The site kernel starts the unmodified SuperNode through this module, which only shortens those two
sleeps (the site's ``poll_interval``, 0.1 s by default, backing off to 1 s once the site has been idle for 30 s,
see :mod:`site_kernel._pace`; 20 ms while waiting for its own executor), and sends a reply that is ready even when no
new message came in (:func:`_pull_or_flush`). Everything else is Flower's code path:
``python -m site_kernel._supernode POLL_S [flower-supernode arguments...]``.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable
from typing import Any

from flwr.common.constant import SubStatus

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


class _Receipt:
    """The node state as Flower's receive step sees it, noting the message it stores and the task it creates."""

    def __init__(self, state: Any) -> None:
        self._state = state
        self.message_id: str | None = None
        self.task_id: int | None = None
        self.deleted: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)

    def create_task(self, *args: Any, **kwargs: Any) -> Any:
        self.task_id = self._state.create_task(*args, **kwargs)
        return self.task_id

    def store_message(self, message: Any) -> Any:
        self.message_id = message.metadata.message_id
        return self._state.store_message(message)

    def delete_messages(self, *, message_ids: Any = None) -> None:
        self.deleted.update(message_ids or ())
        self._state.delete_messages(message_ids=message_ids)


def _pull_or_flush(pull: Callable[..., int | None]) -> Callable[..., int | None]:
    """Wrap Flower's receive step so that one message in always makes one reply out.

    Flower's loop pulls one message, then pushes the replies that are ready once one is; with nothing pulled it
    pushes nothing. One reply too many therefore shifts every later answer by one message, for good: each answer
    leaves only when the next message comes in, a whole hub timeout later, as the answer to a message the hub no
    longer waits for. A crash made that extra reply: when a run is stopped while its message is half-received (the
    hub died, the study was resumed), Flower keeps the message queued with its task (it cleans up every other
    failed receive, not that one); the executor then waits for the message's content until its pull gives up, and
    the task's expiry answers it. So (a) a half-received message is dropped and its task ended, as Flower does for
    other failed receives, and (b) when nothing new came in but a reply is ready, the loop is told to push it now
    (the hub refuses one for a stopped run; it is dropped)."""

    def pull_or_flush(**kwargs: Any) -> int | None:
        state = kwargs["state"]
        receipt = _Receipt(state)
        run_id = pull(**{**kwargs, "state": receipt})
        if run_id is None and receipt.message_id and receipt.message_id not in receipt.deleted:
            state.delete_messages(message_ids=[receipt.message_id])
            kwargs["object_store"].delete(receipt.message_id)
            if receipt.task_id is not None:
                state.finish_task(receipt.task_id, sub_status=SubStatus.FAILED,
                                  details="the run stopped while its message was being received")
        if run_id is None and (ready := state.get_messages_legacy(is_reply=True)):
            # Taking them marks them taken, and Flower's push step takes only untaken ones: put them back.
            state.delete_messages(message_ids=[m.metadata.message_id for m in ready])
            for message in ready:
                state.store_message(message)
            return int(ready[0].metadata.run_id)
        return run_id

    return pull_or_flush


def main() -> None:
    idle_s = float(sys.argv[1])
    sys.argv = ["flower-supernode", *sys.argv[2:]]
    from flwr.supernode import start_client_internal as sci
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from ._flower_runtime import fast_object_pulls

    sci.time = _patched_time(idle_s)  # type: ignore[assignment]
    sci._pull_and_store_message = _pull_or_flush(sci._pull_and_store_message)  # type: ignore[assignment]
    fast_object_pulls()
    flower_supernode()


if __name__ == "__main__":
    main()
