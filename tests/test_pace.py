"""Idle sites poll slowly and studies still see the fast interval: the pacing of the sites' two polling loops."""

from __future__ import annotations

import pytest

from site_kernel import _pace
from site_kernel._pace import IdlePacer
from site_kernel._supernode import IDLE_CAP_S, _patched_time


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
    monkeypatch.setattr("time.sleep", clock.sleep)  # _patched_time keeps the real sleep it finds
    patched = _patched_time(0.1)
    patched.sleep(3)  # Flower's idle poll
    assert clock.slept == [0.1]
    clock.now += 60
    for _ in range(8):
        patched.sleep(3)
    assert clock.slept[-1] == IDLE_CAP_S
    patched.sleep(0.5)  # Flower waits for the site's executor: the site is in a study
    assert clock.slept[-1] == 0.02
    patched.sleep(3)
    assert clock.slept[-1] == 0.1
    patched.sleep(0.25)  # other sleeps pass through
    assert clock.slept[-1] == 0.25
