"""The site's one Flower compatibility module: every use and every patch of Flower's internals on the site's side.

With ``--isolation process`` a SuperNode executes nothing itself: it queues each message as a task on its Runtime
API and waits for an executor to acquire it. Flower's own executor (``flower-superexec``) would install the bundle
and run its ClientApp in a fresh process per message; the site kernel is that executor instead, so bundle code is
never run and the process stays warm between rounds (:class:`RuntimeConnection`).

The SuperNode itself is Flower's, started unmodified by :mod:`site_kernel._supernode`, which decides how the site
paces and orders its loop; the three places where that reaches into Flower's loop are patched here
(:func:`patch_supernode_loop`). Each patch first checks that the Flower internal it relies on is still what it was
written against and otherwise stops the process with :class:`~flip_common.flower.FlowerChanged`, naming that
internal: a Flower upgrade fails loudly here, at start-up, never as a silent no-op. ``pyproject.toml`` pins Flower's
minor version; ``tests/test_flower_compat.py`` runs every check against the installed Flower.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context, Message
from flwr.common.constant import SubStatus
from flwr.common.logger import FLOWER_LOGGER
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import RetryInvoker, make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from flip_common.flower import expect

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# Flower's SuperNode loop (flwr.supernode.start_client_internal) sleeps these fixed times; _supernode tells them apart
FLOWER_IDLE_SLEEP_S = 3  # start_client_internal: between polls of the hub when no message came in
FLOWER_REPLY_SLEEP_S = 0.5  # _push_messages: while no reply is ready, or a reply's content is still being written
# the lines Flower's HTTP retry policy (flwr.supercore.retry.http_retry) logs around a retry, which one_line_retries
# folds into one line per outage
FLOWER_RETRY_LOG = "Connection attempt failed, retrying"
FLOWER_RETRIED_LOG = "Connection successful after"

COMPLETED = SubStatus.COMPLETED
FAILED = SubStatus.FAILED
TASK_BEAT_S = 1.0  # how soon a site notices that a task's run was stopped


@dataclass
class Task:
    message: Message
    context: Context
    run: Run
    fab: Fab
    client: RuntimeHttpClient
    finishing: threading.Event = field(default_factory=threading.Event)

    def reply(self, message: Message, *, status: str = COMPLETED, details: str = "") -> None:
        self.finishing.set()  # the token is revoked from here on because the site finished the task
        push_message(self.client, message, self.context)
        push_task_output(client=self.client, context=self.context, sub_status=status, details=details)


class TaskLost(RuntimeError):
    """The SuperNode no longer knows a task's token (the task ended or expired): that task is over, the site is not."""


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


def _retry_invoker() -> RetryInvoker:
    """Flower's HTTP retry policy, except that a refused token ends the call, not the process.

    Flower's policy sends SIGINT to its own process on HTTP 401: right for a ``flwr-clientapp`` that lives for one
    message, wrong for the site kernel, which serves every study and would go down with one stale task.
    """
    import httpx

    invoker = make_simple_http_retry_invoker()
    flowers = getattr(invoker, "should_giveup", None)
    expect(
        callable(flowers),
        "flwr.supercore.retry.RetryInvoker.should_giveup",
        "a retry policy asked through its should_giveup(exception)",
    )

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            raise TaskLost("the SuperNode no longer knows this task (it ended or expired)") from exc
        return flowers(exc)  # type: ignore[misc]

    invoker.should_giveup = should_giveup
    return invoker


def _task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat (``make_task_heartbeat_fn_http``) without its SIGINT to the process when the SuperNode
    says the task is gone: the task's own calls then fail with ``TaskLost``, and the heartbeat stops."""
    import httpx

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            known = client.SendTaskHeartbeat(request).success
        except TaskLost:
            known = False
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise
        if not known:
            raise SystemExit  # ends only the heartbeat's thread
        return True

    return beat


class RuntimeConnection:
    """Acquires the SuperNode's queued client-app tasks; each task is then served on its own."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = RuntimeHttpClient.from_server_address(
            server_address=address,
            insecure=True,
            root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=_retry_invoker(),
        )

    def close(self) -> None:
        self._client.close()

    def acquire_token(self) -> str | None:
        response = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        if response.HasField("task") and response.token:
            return str(response.token)
        return None

    @contextmanager
    def task(
        self, token: str, on_lost: Callable[[int], None] = lambda run_id: None, beat_s: float = TASK_BEAT_S
    ) -> Iterator[Task]:
        """Pull one task's inputs; beat its heartbeat every ``beat_s`` while the site works on it.

        When the SuperNode ends the task first (its run was stopped, see :mod:`site_kernel._supernode`), the
        heartbeat is refused and ``on_lost(run_id)`` is called from the heartbeat's thread, while
        the task's own thread may still be waiting for the plan: that is how a cancelled study frees
        the site at once.
        """
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=_retry_invoker(),
        )
        beat = _task_heartbeat(client)
        done = threading.Event()
        pulled: list[Task] = []

        def keep_beating() -> None:
            # Flower's HeartbeatSender beats every ~24 s: a stopped run would hold its worker as long.
            while not done.wait(beat_s):
                try:
                    alive = beat()
                except SystemExit:
                    alive = None
                except Exception:  # the SuperNode is restarting: the task's own calls will say so
                    alive = True
                if alive is None:
                    if pulled and not pulled[0].finishing.is_set():
                        on_lost(pulled[0].run.run_id)
                    return

        heartbeat = threading.Thread(target=keep_beating, name="task-heartbeat", daemon=True)
        heartbeat.start()
        try:
            message, context, run, fab = pull_task_input(client)
            pulled.append(Task(message, context, run, fab, client))
            yield pulled[0]
        finally:
            done.set()
            heartbeat.join()
            client.close()


class _OneLineRetries(logging.Filter):
    """Flower logs "Connection attempt failed, retrying in N seconds" before every retry of a call, several a
    minute for as long as its peer is away: this shows the first of a streak as one line naming whom it waits for,
    drops the rest, and says when the peer answers again."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer, self.waiting = peer, False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(FLOWER_RETRY_LOG):
            if self.waiting:
                return False
            self.waiting = True
            record.msg, record.args = "waiting for %s: it does not answer; retrying until it does", (self.peer,)
        elif message.startswith(FLOWER_RETRIED_LOG) and isinstance(record.args, tuple) and record.args:
            self.waiting = False
            record.msg, record.args = "reached %s after %.0f s of retries", (self.peer, record.args[0])
        return True


def one_line_retries(peer: str) -> None:
    """Log Flower's connection retries in this process as one line per outage of ``peer`` (e.g. "the hub at
    HOST:PORT"); the retries themselves are unchanged."""
    from flwr.supercore.retry import grpc_retry, http_retry

    for module in (http_retry, grpc_retry):  # the SuperNode's transport is either
        source = _source(module)
        for line in (FLOWER_RETRY_LOG, FLOWER_RETRIED_LOG):
            expect(f'"{line}' in source, module.__name__, f"its retry log line {line!r}...")
    FLOWER_LOGGER.addFilter(_OneLineRetries(peer))


# -- the SuperNode's loop, patched in the SuperNode's process by site_kernel._supernode -------------------------------
def check_supernode_loop() -> None:
    """Raise :class:`~flip_common.flower.FlowerChanged` unless Flower's SuperNode loop is still the one
    :func:`patch_supernode_loop` patches: it sleeps through its module's global ``time``,
    :data:`FLOWER_IDLE_SLEEP_S` between idle polls and :data:`FLOWER_REPLY_SLEEP_S` while waiting for a reply, and
    calls its pull and push steps by keyword with the node's state."""
    from flwr.supernode import start_client_internal as sci

    where = "flwr.supernode.start_client_internal"
    expect(getattr(sci, "time", None) is time, f"{where}.time", "the loop's sleeps going through its module's `time`")
    for name in ("start_client_internal", "_pull_and_store_message", "_push_messages"):
        expect(callable(getattr(sci, name, None)), f"{where}.{name}", f"a function {name}")
    loop, push = _source(sci.start_client_internal), _source(sci._push_messages)
    expect(
        f"time.sleep({FLOWER_IDLE_SLEEP_S})" in loop,
        f"{where}.start_client_internal",
        f"time.sleep({FLOWER_IDLE_SLEEP_S}) between polls when no message came in",
    )
    expect(
        f"time.sleep({FLOWER_REPLY_SLEEP_S})" in push,
        f"{where}._push_messages",
        f"time.sleep({FLOWER_REPLY_SLEEP_S}) while no reply is ready",
    )
    pull_params = inspect.signature(sci._pull_and_store_message).parameters
    expect(
        {"state", "object_store", "get_run"} <= pull_params.keys() and "state=state," in loop,
        f"{where}._pull_and_store_message",
        "a pull step called by keyword with state, object_store and get_run",
    )
    expect(
        "state" in inspect.signature(sci._push_messages).parameters,
        f"{where}._push_messages",
        "a push step called by keyword with state",
    )


def patch_supernode_loop(
    sleep: Callable[[float], None],
    wrap_pull: Callable[[Callable[..., int | None]], Callable[..., int | None]],
    wrap_push: Callable[[Callable[..., None]], Callable[..., None]],
) -> None:
    """In this process, Flower's SuperNode loop sleeps through ``sleep`` and runs its pull and push steps wrapped by
    ``wrap_pull`` and ``wrap_push``; :func:`check_supernode_loop` first."""
    from flwr.supernode import start_client_internal as sci

    check_supernode_loop()
    names = {k: getattr(time, k) for k in dir(time) if not k.startswith("_")}
    sci.time = types.SimpleNamespace(**{**names, "sleep": sleep})  # type: ignore[assignment]
    sci._pull_and_store_message = wrap_pull(sci._pull_and_store_message)  # type: ignore[assignment]
    sci._push_messages = wrap_push(sci._push_messages)  # type: ignore[assignment]
