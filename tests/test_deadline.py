"""p2pfm.core.deadline: adaptive round deadlines, and how the protocol uses them."""

from __future__ import annotations

import numpy as np
import pytest

from p2pfm.core.deadline import HISTORY, MIN_SAMPLES, ArrivalTracker, RoundPace
from p2pfm.core.fingerprint import fingerprint, schema_document
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import GossipProtocol, ProtocolConfig
from p2pfm.core.wire import TensorSpec

TIMEOUT_S = 30.0


def _tracker(delays: dict[str, list[float]], margin_s: float = 1.0) -> ArrivalTracker[str]:
    tracker: ArrivalTracker[str] = ArrivalTracker(margin_s=margin_s)
    for peer, values in delays.items():
        for value in values:
            tracker.record(peer, value)
    return tracker


def test_a_neighbour_without_enough_history_gets_the_full_timeout() -> None:
    tracker = _tracker({"a": [1.0] * MIN_SAMPLES, "b": [1.0] * (MIN_SAMPLES - 1)})
    assert tracker.wait_s(["a"], TIMEOUT_S) == 2.0  # max(2 x 1.0, 1.0 + margin 1.0)
    assert tracker.wait_s(["a", "b"], TIMEOUT_S) == TIMEOUT_S
    tracker.forget("a")
    assert tracker.wait_s(["a"], TIMEOUT_S) == TIMEOUT_S


def test_the_slowest_expected_neighbour_sets_the_wait_and_outliers_do_not() -> None:
    tracker = _tracker({"fast": [0.5, 0.6, 0.5, 0.4], "slow": [5.0, 5.2, 4.8, 5.0], "odd": [1, 1, 1, 1, 50]})
    assert tracker.wait_s(["fast"], TIMEOUT_S) == pytest.approx(0.5 + 1.0 + 4 * 1.4826 * 0.05)
    slow = tracker.expected_s("slow")
    assert slow is not None and tracker.wait_s(["fast", "slow"], TIMEOUT_S) == pytest.approx(2 * slow)
    assert tracker.expected_s("odd") == 1.0  # one 50 s delay among five: the median ignores it
    assert _tracker({"a": [20.0] * 4}).wait_s(["a"], TIMEOUT_S) == TIMEOUT_S  # never past round_timeout_s


def test_the_history_is_bounded_and_negative_delays_count_as_zero() -> None:
    tracker = _tracker({"a": [100.0] * HISTORY + [1.0] * HISTORY})
    assert tracker.expected_s("a") == 1.0  # the old delays have left the window
    assert _tracker({"a": [-5.0] * 3}).expected_s("a") == 0.0
    with pytest.raises(ValueError, match="margin_s"):
        ArrivalTracker(margin_s=-1.0)


def _pair(adaptive: bool) -> tuple[GossipProtocol, GossipProtocol]:
    me, peer = Identity(b"\x01" * 32), Identity(b"\x02" * 32)
    spec = TensorSpec("x", "float32", (2,))
    config = ProtocolConfig(
        network="n", fingerprint=fingerprint({"q": schema_document([spec])}), round_timeout_s=TIMEOUT_S,
        schema=(spec,), adaptive_deadline=adaptive, max_clock_skew_s=None,
    )  # fmt: skip
    return GossipProtocol(me, [peer.peer_id], config), GossipProtocol(peer, [me.peer_id], config)


def _exchange(me: GossipProtocol, peer: GossipProtocol, round_: int, start_s: float, delay_s: float) -> None:
    me.start_round(round_, start_s)
    peer.start_round(round_, start_s)
    update = peer.make_update({"x": np.ones(2, np.float32)}, samples=1, wall_time_ms=0)
    me.receive(update, start_s + delay_s)
    assert me.poll(start_s + delay_s) is not None


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_protocol_waits_as_long_as_the_neighbour_has_been_taking(adaptive: bool) -> None:
    me, peer = _pair(adaptive)
    for r in range(1, 4):
        _exchange(me, peer, r, start_s=100.0 * r, delay_s=0.5)
    me.start_round(4, 400.0)
    assert me.deadline_s == (400.0 + 1.5 if adaptive else 400.0 + TIMEOUT_S)  # 0.5 s + margin 1 s


def _update(sender: GossipProtocol) -> bytes:
    return sender.make_update({"x": np.ones(2, np.float32)}, samples=1, wall_time_ms=0)


@pytest.mark.parametrize("behind", [True, False])
def test_after_a_missed_deadline_only_a_neighbour_that_fell_behind_loses_its_timing(behind: bool) -> None:
    """Behind (restarted, stalled): its old delays say nothing. In step (a message was lost): they hold."""
    me, peer = _pair(adaptive=True)
    for r in range(1, 4):
        _exchange(me, peer, r, start_s=100.0 * r, delay_s=0.5)
    me.start_round(4, 400.0)
    peer.start_round(4, 400.0)
    done = me.poll(401.5)  # its round 4 never came: the adaptive deadline (0.5 s + 1 s) ends the round
    assert done is not None and done.timed_out and peer.identity.peer_id in me.absent
    me.start_round(5, 500.0)
    if behind:
        me.receive(_update(peer), 500.5)  # its round 4, late: refused as stale, but it is alive
        assert me.rejections and peer.identity.peer_id not in me.absent
    else:
        peer.start_round(5, 500.0)
        me.receive(_update(peer), 500.5)  # round 5, in step
        assert peer.identity.peer_id not in me.absent
    if behind:  # this round now waits the full timeout for it to catch up
        assert me.deadline_s == 500.0 + TIMEOUT_S and me.poll(502.0) is None
        assert me.poll(500.0 + TIMEOUT_S) is not None
    else:  # heard in this round, and its timing still holds for the next
        assert me.poll(502.0) is not None
        me.start_round(6, 600.0)
        assert me.deadline_s == 600.0 + 1.5


def test_a_node_whose_own_rounds_swing_waits_at_least_that_swing() -> None:
    steady, swinging = RoundPace(), RoundPace()
    t_steady = t_swing = 0.0
    for r, extra in enumerate([0.0, 8.0, 0.0, 6.0, 0.0, 9.0, 1.0]):
        steady.started(r, t_steady)
        swinging.started(r, t_swing)
        t_steady += 15.0
        t_swing += 15.0 + extra
    assert steady.floor_s() == 0.0  # a quiet machine: nothing added to the neighbours' own timing
    assert swinging.floor_s() > 5.0  # shared cores: a wait of a second would miss neighbours running late
    gap = RoundPace()
    gap.started(1, 0.0)
    gap.started(5, 100.0)  # not consecutive (a catch-up): no duration recorded
    assert gap.floor_s() == 0.0
