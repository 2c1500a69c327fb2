"""Idle sites poll slowly and studies still see the fast interval: the pacing of the sites' two polling loops."""

from __future__ import annotations

import pytest

from site_kernel import _pace
from site_kernel._flower_runtime import FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_SLEEP_S
from site_kernel._pace import IdlePacer
from site_kernel._supernode import IDLE_CAP_S, _Loop


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(_pace.time, "monotonic", c.monotonic)
    return c


def test_fast_within_the_hot_window_then_doubling_to_the_cap(clock):
    pacer = IdlePacer(0.1, 1.0, hot_s=30)
    waits = []
    while clock.now < 1000 + 30:
        waits.append(pacer.next_wait())
        clock.now += waits[-1]
    assert set(waits) == {0.1}, "a study's rounds see the fast interval"
    after = [pacer.next_wait() for _ in range(6)]
    assert after == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_work_brings_the_fast_interval_back_at_once(clock):
    pacer = IdlePacer(0.02, 0.5, hot_s=30)
    clock.now += 120
    assert [pacer.next_wait() for _ in range(6)][-1] == 0.5
    pacer.active()
    assert pacer.next_wait() == 0.02
    clock.now += 29
    assert pacer.next_wait() == 0.02


def test_the_supernode_sleeps_fast_in_a_study_and_slowly_when_long_idle(clock, monkeypatch):
    monkeypatch.setattr("time.sleep", clock.sleep)  # the loop's own sleeps are the real ones
    patched = _Loop(0.1)  # its sleep is what Flower's loop calls (patch_supernode_loop)
    patched.sleep(FLOWER_IDLE_SLEEP_S)  # Flower's idle poll
    assert clock.slept == [0.1]
    clock.now += 60
    for _ in range(8):
        patched.sleep(FLOWER_IDLE_SLEEP_S)
    assert clock.slept[-1] == IDLE_CAP_S
    patched.sleep(FLOWER_REPLY_SLEEP_S)  # Flower waits for the site's executor: the site is in a study
    assert clock.slept[-1] == 0.02
    patched.sleep(FLOWER_IDLE_SLEEP_S)
    assert clock.slept[-1] == 0.1
    patched.sleep(0.25)  # other sleeps pass through
    assert clock.slept[-1] == 0.25


def _no_run(run_id: int):
    raise AssertionError("no open task: no run to check")


def _hub_message(run_id: int):
    import time

    from flwr.app import ConfigRecord, Metadata, RecordDict
    from flwr.app.message.message import make_message

    md = Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=60,
        message_type="query",
    )
    msg = make_message(metadata=md, content=RecordDict({"config": ConfigRecord({"op": "hello"})}))
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _node():
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    store = ObjectStoreFactory().store()
    return InMemoryNodeState(store), store


def _reply_to(message, state, store):
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supernode.start_client_internal import _insert_message

    reply = Message(RecordDict({"config": ConfigRecord({"approval": "approved"})}), reply_to=message)
    _insert_message(reply, state, store)
    return reply


def _push(state, store) -> list[str]:
    """Flower's own push step, sending to a list (it waits for as long as it finds no reply: 5 s here)."""
    import threading

    from flwr.supernode.start_client_internal import _push_messages

    sent: list[str] = []

    def send(message, tree, runtime):
        sent.append(message.metadata.reply_to_message_id)
        return set(), "session"

    push = threading.Thread(
        target=_push_messages,
        daemon=True,
        kwargs={"state": state, "object_store": store, "send": send, "push_object": lambda *a: None},
    )
    push.start()
    push.join(5)
    return sent


def test_a_reply_ready_with_nothing_new_pulled_is_pushed_now():
    """Flower's loop pushes only after it pulls; one stray reply would delay every later answer by a message."""
    from site_kernel._supernode import _Loop, _pull_or_flush

    state, store = _node()
    pulled: list[int | None] = [None, 42, None]
    step = _pull_or_flush(lambda **kw: pulled.pop(0), _Loop(0.1))
    node = {"state": state, "object_store": store, "get_run": _no_run}

    assert step(**node) is None, "nothing pulled and nothing to send: the loop idles"
    assert step(**node) == 42, "a pulled message is passed on as it is"

    message = _hub_message(7)
    state.store_message(message)
    _reply_to(message, state, store)
    assert step(**node) == 7, "nothing pulled but a reply is ready: the loop pushes"
    assert _push(state, store) == [message.metadata.message_id], "and Flower's push step still finds the reply"


def test_a_message_half_received_when_its_run_stopped_is_dropped_with_its_task():
    from flwr.common.constant import Status
    from flwr.supercore.constant import TaskType

    from site_kernel._supernode import _Loop, _pull_or_flush

    state, store = _node()
    message = _hub_message(7)
    created: list[int] = []

    def receive_until_the_run_stops(*, state, **kw):  # what Flower's receive step does when the hub says "stopped"
        created.append(state.create_task(task_type=TaskType.CLIENT_APP, run_id=7, fab_hash="f"))
        state.store_message(message)
        return

    assert (
        _pull_or_flush(receive_until_the_run_stops, _Loop(0.1))(state=state, object_store=store, get_run=_no_run)
        is None
    )
    assert not state.get_messages_legacy(is_reply=False), "no message is left for the executor to answer"
    (task,) = state.get_tasks(task_ids=created)
    assert task.status.status == Status.FINISHED


def test_the_push_step_sends_only_what_is_ready_and_never_waits_for_a_reply():
    """Flower's push step waits until some reply is ready: one endless train() held every other
    message back."""
    import time

    from site_kernel._supernode import _Loop

    state, store = _node()
    message = _hub_message(7)
    state.store_message(message)
    sent: list[str] = []

    def push(*, state, **kw):  # stands for Flower's push step, which would block here
        ready = state.get_messages_legacy(is_reply=True)
        sent.extend(m.metadata.reply_to_message_id for m in ready)

    push_ready = _Loop(0.1).push_ready(push)
    started = time.monotonic()
    push_ready(state=state, object_store=store)
    assert time.monotonic() - started < 0.5 and sent == [], "no reply yet: the loop goes on pulling"
    _reply_to(message, state, store)
    push_ready(state=state, object_store=store)
    assert sent == [message.metadata.message_id]


def test_the_open_tasks_of_a_run_stopped_at_the_hub_end_and_others_stay():
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.constant import TaskType
    from flwr.supercore.run import RunNotRunningException

    from site_kernel._supernode import _Loop

    state, _store = _node()
    tasks = {}
    for run_id in (7, 8):
        tasks[run_id] = state.create_task(task_type=TaskType.CLIENT_APP, run_id=run_id, fab_hash="f")
        state.store_message(_hub_message(run_id))

    def get_run(run_id):  # the hub's answer once run 7 was cancelled
        if run_id == 7:
            raise RunNotRunningException
        return object()

    _Loop(0.1).check_runs(state, get_run)
    (stopped,) = state.get_tasks(task_ids=[tasks[7]])
    (running,) = state.get_tasks(task_ids=[tasks[8]])
    assert stopped.status.status == Status.FINISHED
    assert stopped.status.sub_status == SubStatus.STOPPED
    assert running.status.status != Status.FINISHED
    assert [m.metadata.run_id for m in state.get_messages_legacy(is_reply=False)] == [8]
