"""Clocks: the node's only source of time, real on a network and virtual in the simulator."""

from __future__ import annotations

import datetime
import threading
import time

from p2pfm.node.clock import Clock, SystemClock, VirtualClock


def test_virtual_time_moves_only_when_slept_and_never_backwards() -> None:
    clock: Clock = VirtualClock(start_s=2.0)
    assert clock.now_s() == 2.0 and clock.now_s() == 2.0  # reading does not advance it
    clock.sleep(1.5)
    assert clock.now_s() == 3.5
    clock.sleep(0.0)
    clock.sleep(-10.0)  # a deadline already past: no time passes, and none is given back
    assert clock.now_s() == 3.5


def test_virtual_wall_time_starts_at_its_epoch_in_whole_milliseconds() -> None:
    epoch = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    assert int(epoch.timestamp() * 1000) == VirtualClock.EPOCH_MS
    clock = VirtualClock()
    assert clock.wall_ms() == VirtualClock.EPOCH_MS
    clock.sleep(1.2345)
    assert clock.wall_ms() == VirtualClock.EPOCH_MS + 1234  # truncated, as int(time.time() * 1000) is


def test_system_clock_reads_the_monotonic_and_the_wall_clock() -> None:
    clock: Clock = SystemClock(threading.Event())
    before_s, before_ms = time.monotonic(), int(time.time() * 1000)
    now_s, wall_ms = clock.now_s(), clock.wall_ms()
    assert before_s <= now_s <= time.monotonic()
    assert before_ms <= wall_ms <= int(time.time() * 1000)


def test_system_clock_sleeps_for_real_until_asked_to_stop() -> None:
    stop = threading.Event()
    clock = SystemClock(stop)
    started_s = time.monotonic()
    clock.sleep(0.05)
    clock.sleep(-1.0)  # nothing to wait for
    assert 0.05 <= time.monotonic() - started_s < 1.0
    stop.set()
    started_s = time.monotonic()
    clock.sleep(60.0)  # a stopping node does not sit out an attacker's pause
    assert time.monotonic() - started_s < 1.0
