"""Every patch of Flower's internals checks at start-up that the internal is still what it was written against, and
fails naming it (a Flower upgrade breaks loudly in one place, never as a silent no-op)."""

from __future__ import annotations

import time

import pytest

from flip_common.flower import FlowerChanged, fast_object_pulls
from site_kernel import _flower_runtime as rt


def test_the_installed_flower_passes_every_site_check(monkeypatch):
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.supercore.inflatable import inflatable_utils

    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setattr(fn, "__kwdefaults__", dict(fn.__kwdefaults__))  # Flower's own back after the test
    monkeypatch.setattr(FLOWER_LOGGER, "filters", list(FLOWER_LOGGER.filters))
    rt.check_supernode_loop()
    rt._retry_invoker()
    rt.one_line_retries("the hub at test")
    fast_object_pulls()
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 0.01


def _source_without(monkeypatch, needle: str, where: str) -> None:
    """Flower's source as if a new version no longer had ``needle`` in ``where``."""
    real = rt._source

    def source(obj):
        text = real(obj)
        return text.replace(needle, "changed") if where in getattr(obj, "__qualname__", obj.__name__) else text

    monkeypatch.setattr(rt, "_source", source)


@pytest.mark.parametrize(
    ("needle", "where", "named"),
    [
        ("time.sleep(3)", "start_client_internal", "start_client_internal.start_client_internal"),
        ("time.sleep(0.5)", "_push_messages", "start_client_internal._push_messages"),
        ("state=state,", "start_client_internal", "start_client_internal._pull_and_store_message"),
    ],
    ids=["idle sleep", "reply sleep", "pull step by keyword"],
)
def test_a_changed_supernode_loop_is_named(monkeypatch, needle, where, named):
    _source_without(monkeypatch, needle, where)
    with pytest.raises(FlowerChanged, match=named):
        rt.check_supernode_loop()
    with pytest.raises(FlowerChanged):  # and nothing is patched
        rt.patch_supernode_loop(time.sleep, lambda pull: pytest.fail("patched"), lambda push: pytest.fail("patched"))


def test_a_supernode_loop_that_no_longer_sleeps_through_its_time_module_is_named(monkeypatch):
    from flwr.supernode import start_client_internal as sci

    monkeypatch.delattr(sci, "time")
    with pytest.raises(FlowerChanged, match=r"start_client_internal\.time"):
        rt.check_supernode_loop()


def test_the_loop_patch_wraps_flowers_steps_and_its_sleeps(monkeypatch):
    from flwr.supernode import start_client_internal as sci

    for name in ("time", "_pull_and_store_message", "_push_messages"):
        monkeypatch.setattr(sci, name, getattr(sci, name))  # put back after the test
    slept: list[float] = []
    rt.patch_supernode_loop(slept.append, lambda pull: ("pull", pull), lambda push: ("push", push))
    sci.time.sleep(rt.FLOWER_IDLE_SLEEP_S)
    assert slept == [rt.FLOWER_IDLE_SLEEP_S] and sci.time.monotonic is time.monotonic
    assert sci._pull_and_store_message[0] == "pull" and sci._push_messages[0] == "push"


def test_a_retry_log_line_that_changed_is_named(monkeypatch):
    _source_without(monkeypatch, rt.FLOWER_RETRY_LOG, "http_retry")
    with pytest.raises(FlowerChanged, match="http_retry"):
        rt.one_line_retries("the hub at test")


def test_a_retry_policy_without_should_giveup_is_named(monkeypatch):
    class Invoker:
        pass

    monkeypatch.setattr(rt, "make_simple_http_retry_invoker", Invoker)
    with pytest.raises(FlowerChanged, match="should_giveup"):
        rt._retry_invoker()


def test_object_pulls_whose_backoff_arguments_changed_are_named(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils

    def pull_objects(*, first_backoff=1.0):
        pass

    monkeypatch.setattr(inflatable_utils, "pull_objects", pull_objects)
    with pytest.raises(FlowerChanged, match=r"inflatable_utils\.pull_objects"):
        fast_object_pulls()


# -- the lab's and the hub's side (flip_lab._flower) ------------------------------------------------------------------
def test_the_installed_flower_passes_every_hub_check():
    from flwr.superlink.grid import HttpGrid

    from flip_lab import _flower

    _flower.check_supernode_id_log()
    grid = HttpGrid(runtime_api_address="127.0.0.1:1", insecure=True, root_certificates=None, token="t")
    try:
        _flower.check_study(grid)
        _flower.stop_retrying(grid)
        assert grid._retry_invoker.max_tries == 1
    finally:
        grid.close()


def test_a_node_id_is_read_from_the_supernode_s_log():
    from flip_lab._flower import SUPERNODE_ID_LOG, supernode_id

    assert supernode_id("INFO :      Starting\n") is None, "not admitted yet"
    restarted = "\n".join("INFO :      " + SUPERNODE_ID_LOG % node for node in (11, 4242))
    assert supernode_id(restarted) == 4242, "the last id the log names"


def test_a_supernode_that_logs_its_id_otherwise_is_named(monkeypatch):
    from flip_lab import _flower

    real = _flower._module_source
    monkeypatch.setattr(_flower, "_module_source", lambda m: real(m).replace("SuperNode ID: %s", "Node: %s"))
    with pytest.raises(FlowerChanged, match=r"start_client_internal\.start_client_internal"):
        _flower.check_supernode_id_log()


@pytest.mark.parametrize(
    ("grid", "named"),
    [
        (object(), "HttpGrid._runtime_client"),
        (
            type("Grid", (), {"_runtime_client": type("C", (), {"PullTaskInput": 0, "PushTaskOutput": 0})()})(),
            "HttpGrid._retry_invoker",
        ),
    ],
    ids=["no runtime client", "no retry policy"],
)
def test_a_study_grid_that_changed_is_named(grid, named):
    from flip_lab import _flower

    with pytest.raises(FlowerChanged, match=named):
        _flower.check_study(grid)


def test_a_task_identity_that_is_no_longer_settable_is_named(monkeypatch):
    from flwr.supercore import task_identity

    from flip_lab import _flower

    monkeypatch.setattr(task_identity, "TaskIdentity", type("TaskIdentity", (), {"task_id": None}))
    grid = type("Grid", (), {})()
    grid._runtime_client = type("C", (), {"PullTaskInput": 0, "PushTaskOutput": 0})()
    grid._retry_invoker = type("R", (), {"max_tries": None})()
    with pytest.raises(FlowerChanged, match=r"TaskIdentity\.task_id"):
        _flower.check_study(grid)
