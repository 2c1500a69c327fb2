"""The site kernel's adapter over Flower's Runtime API: a task the SuperNode no longer knows ends that task, never
the site (Flower's own policy sends SIGINT to the process, which is the site kernel)."""

from __future__ import annotations

import httpx
import pytest

from site_kernel import _flower_runtime as rt


def _status(code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/runtime/pull-object")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(code, request=request))


def test_a_refused_task_token_ends_the_call_not_the_process():
    calls = []

    def pull():
        calls.append(1)
        raise _status(401)

    with pytest.raises(rt.TaskLost):  # Flower's own policy would SIGINT this process: pytest would stop here
        rt._retry_invoker().invoke(pull)
    assert calls == [1], "a refused token is not retried"


def test_a_busy_supernode_is_still_retried():
    answers = [_status(503), "content"]

    def pull():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    invoker = rt._retry_invoker()
    invoker.wait_gen_factory = lambda: iter([0.0] * 5)
    assert invoker.invoke(pull) == "content"


class _Client:
    def __init__(self, answer):
        self.answer = answer

    def SendTaskHeartbeat(self, request):  # Flower's name
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


@pytest.mark.parametrize(
    "answer", [type("Reply", (), {"success": False})(), rt.TaskLost("gone")], ids=["task unknown", "token refused"]
)
def test_the_heartbeat_of_a_lost_task_stops_by_itself(answer):
    with pytest.raises(SystemExit):  # ends the heartbeat's thread only; Flower's raises SIGINT in the process
        rt._task_heartbeat(_Client(answer))()


def test_a_heartbeat_that_cannot_reach_the_supernode_is_retried():
    beat = rt._task_heartbeat(_Client(httpx.ConnectError("refused")))
    assert beat() is False
    assert rt._task_heartbeat(_Client(type("Reply", (), {"success": True})()))() is True


class _Runtime:
    """The SuperNode's Runtime API as one task's client sees it; ``known`` is whether it knows the task."""

    def __init__(self):
        self.known = True

    def SendTaskHeartbeat(self, request):  # Flower's name
        return type("Reply", (), {"success": self.known})()

    def close(self):
        pass


@pytest.fixture
def runtime(monkeypatch):
    client = _Runtime()
    monkeypatch.setattr(rt.RuntimeHttpClient, "from_server_address", lambda **kw: client)
    run = type("Run", (), {"run_id": 7})()
    monkeypatch.setattr(rt, "pull_task_input", lambda c: ("message", "context", run, "fab"))
    monkeypatch.setattr(rt, "push_message", lambda *a: None)
    monkeypatch.setattr(rt, "push_task_output", lambda **kw: None)
    return client


def _wait(condition, timeout=2.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_task_ended_by_the_supernode_reports_its_run_at_once(runtime):
    """A cancelled study's task ends at the SuperNode; the site must stop that run's worker within
    a beat, not after Flower's ~24 s heartbeat."""
    lost: list[int] = []
    with rt.RuntimeConnection("127.0.0.1:1").task("token", on_lost=lost.append, beat_s=0.01):
        runtime.known = False
        assert _wait(lambda: lost == [7])


def test_a_task_the_site_finished_itself_reports_nothing(runtime):
    lost: list[int] = []
    with rt.RuntimeConnection("127.0.0.1:1").task("token", on_lost=lost.append, beat_s=0.01) as task:
        task.reply("reply")
        runtime.known = False  # the SuperNode revokes the token of a finished task
        assert not _wait(lambda: bool(lost), timeout=0.2)
