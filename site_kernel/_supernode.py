"""Run Flower's SuperNode with the site's polling interval.

Flower 1.42's SuperNode sleeps a fixed 3 s between polls of the hub when idle and 0.5 s while it
waits for a reply to be ready (``supernode/start_client_internal.py``): with two phases per round
that alone costs several seconds of every round; and it handles one message at a time, waiting for
each reply before it pulls the next message. The site kernel starts the unmodified SuperNode through
this module, which shortens those sleeps (the site's ``poll_interval``, 0.1 s by default, backing
off to 1 s once the site has been idle for 30 s, see :mod:`site_kernel._pace`; 20 ms while waiting
for its own executor), pushes only the replies that are ready so that the next message is pulled
while a plan still runs (:class:`_Loop`), ends the tasks of runs stopped at the hub, and sends a
reply that is ready even when no new message came in (:func:`_pull_or_flush`). The patches that put
this into Flower's loop, and the checks that it is still the loop they were written for, are
:func:`site_kernel._flower_runtime.patch_supernode_loop`'s. Everything else is Flower's code path:
``python -m site_kernel._supernode POLL_S [flower-supernode arguments...]``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from flwr.common.constant import Status, SubStatus
from flwr.supercore.run import RunNotRunningException

from ._flower_runtime import FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_SLEEP_S
from ._pace import IdlePacer

log = logging.getLogger("flip.site")

IDLE_CAP_S = 1.0  # the longest wait between polls of the hub, once the site has been idle a while
REPLY_POLL_S = 0.02  # how often a SuperNode with open tasks looks for its executor's replies
RUN_CHECK_S = 1.0  # how often it asks the hub whether the runs of its open tasks still run
_OPEN = (Status.PENDING, Status.STARTING, Status.RUNNING)


class _Loop:
    """What this module's patches of Flower's loop share: node state, pacing, run checks.

    Flower's loop pulls one message, then blocks until a reply to it is ready: one endless ``train()``
    stalled every other study and every approval query at the site. Here the push step sends only
    the replies that are ready (:meth:`push_ready`) and the loop goes on pulling, so the executor
    receives the next message while it works on the first; between polls of the hub the loop wakes
    as soon as a reply is ready (:meth:`sleep`).
    """

    def __init__(self, idle_s: float) -> None:
        self.pacer = IdlePacer(idle_s, IDLE_CAP_S)
        self.state: Any = None
        self._next_run_check = 0.0

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_SLEEP_S:  # the idle poll between requests to the hub
            self._idle(self.pacer.next_wait())
        elif seconds == FLOWER_REPLY_SLEEP_S:  # a reply is not ready yet: the site is in a study
            self.pacer.active()
            _real_sleep(REPLY_POLL_S)
        else:
            _real_sleep(seconds)

    def _idle(self, wait: float) -> None:
        if self.state is None or not _open_tasks(self.state):
            _real_sleep(wait)
            return
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0 and not _ready_replies(self.state):
            _real_sleep(min(REPLY_POLL_S, left))

    def push_ready(self, push: Callable[..., None]) -> Callable[..., None]:
        def push_ready(**kwargs: Any) -> None:
            if _ready_replies(kwargs["state"]):
                push(**kwargs)

        return push_ready

    def check_runs(self, state: Any, get_run: Callable[[int], Any]) -> None:
        """End the open tasks of runs the hub no longer runs (a study cancelled or stopped).

        Flower's SuperNode learns that a run stopped only when it next talks to the hub about that run,
        which for a plan in an endless loop is never; the executor learns that its task ended from
        the task's heartbeat and stops the run's worker
        (:meth:`site_kernel._flower_runtime.RuntimeConnection.task`).
        """
        if time.monotonic() < self._next_run_check:
            return
        self._next_run_check = time.monotonic() + RUN_CHECK_S
        for run_id in sorted({task.run_id for task in _open_tasks(state)}):
            try:
                get_run(run_id)
            except RunNotRunningException:
                _end_run(state, run_id)
            except Exception as err:  # the hub is unreachable: its own loop reports that
                log.debug("could not check run %s: %s", run_id, err)


def _open_tasks(state: Any) -> Sequence[Any]:
    return state.get_tasks(statuses=_OPEN)


def _ready_replies(state: Any) -> Sequence[Any]:
    """The replies waiting to be pushed. Looking marks them taken in Flower's state, and its push
    step takes only untaken ones: so they are put back."""
    ready = state.get_messages_legacy(is_reply=True)
    if ready:
        state.delete_messages(message_ids=[m.metadata.message_id for m in ready])
        for message in ready:
            state.store_message(message)
    return ready


def _end_run(state: Any, run_id: int) -> None:
    for task in state.get_tasks(run_ids=[run_id], statuses=_OPEN):
        state.finish_task(task.task_id, sub_status=SubStatus.STOPPED, details="the run was stopped")
    stale = state.get_messages_legacy(run_ids=[run_id])
    state.delete_messages(message_ids=[m.metadata.message_id for m in stale])
    log.info("run %s was stopped at the hub: its open tasks at this site ended", run_id)


def _real_sleep(seconds: float) -> None:
    time.sleep(seconds)


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


def _pull_or_flush(pull: Callable[..., int | None], loop: _Loop) -> Callable[..., int | None]:
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
        state = loop.state = kwargs["state"]
        loop.check_runs(state, kwargs["get_run"])
        receipt = _Receipt(state)
        run_id = pull(**{**kwargs, "state": receipt})
        if run_id is not None:
            loop.pacer.active()
        if run_id is None and receipt.message_id and receipt.message_id not in receipt.deleted:
            state.delete_messages(message_ids=[receipt.message_id])
            kwargs["object_store"].delete(receipt.message_id)
            if receipt.task_id is not None:
                state.finish_task(
                    receipt.task_id,
                    sub_status=SubStatus.FAILED,
                    details="the run stopped while its message was being received",
                )
        if run_id is None and (ready := _ready_replies(state)):
            return int(ready[0].metadata.run_id)
        return run_id

    return pull_or_flush


def main() -> None:
    idle_s = float(sys.argv[1])
    sys.argv = ["flower-supernode", *sys.argv[2:]]
    from flwr.supernode.cli.flower_supernode import flower_supernode

    from flip_common.flower import fast_object_pulls

    from ._flower_runtime import one_line_retries, patch_supernode_loop

    loop = _Loop(idle_s)
    patch_supernode_loop(loop.sleep, lambda pull: _pull_or_flush(pull, loop), loop.push_ready)
    fast_object_pulls()
    hub = sys.argv[sys.argv.index("--superlink") + 1] if "--superlink" in sys.argv else "the hub"
    one_line_retries(f"the hub at {hub}")
    flower_supernode()


if __name__ == "__main__":
    main()
