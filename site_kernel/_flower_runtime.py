"""The site's one adapter over Flower's internal Runtime API modules.

With ``--isolation process`` a SuperNode executes nothing itself: it queues each message as a task on its Runtime
API and waits for an executor to acquire it. Flower's own executor (``flower-superexec``) would install the bundle
and run its ClientApp in a fresh process per message; the site kernel is that executor instead, so bundle code is
never run and the process stays warm between rounds. This module is the only place that touches the internal
``flwr.supercore``/``flwr.supernode`` APIs for that; ``pyproject.toml`` pins Flower's minor version.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

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


def _retry_invoker() -> RetryInvoker:
    """Flower's HTTP retry policy, except that a refused token ends the call, not the process.

    Flower's policy sends SIGINT to its own process on HTTP 401: right for a ``flwr-clientapp`` that lives for one
    message, wrong for the site kernel, which serves every study and would go down with one stale task.
    """
    import httpx

    invoker = make_simple_http_retry_invoker()
    flowers = invoker.should_giveup

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
        if message.startswith("Connection attempt failed, retrying"):
            if self.waiting:
                return False
            self.waiting = True
            record.msg, record.args = "waiting for %s: it does not answer; retrying until it does", (self.peer,)
        elif message.startswith("Connection successful after") and isinstance(record.args, tuple) and record.args:
            self.waiting = False
            record.msg, record.args = "reached %s after %.0f s of retries", (self.peer, record.args[0])
        return True


def one_line_retries(peer: str) -> None:
    """Log Flower's connection retries in this process as one line per outage of ``peer`` (e.g. "the hub at
    HOST:PORT"); the retries themselves are unchanged."""
    FLOWER_LOGGER.addFilter(_OneLineRetries(peer))
