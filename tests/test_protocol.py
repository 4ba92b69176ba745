"""Protocol instances wired back to back: no sockets, no clocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from p2pfm import wire
from p2pfm.consensus import metropolis_weights, mix
from p2pfm.errors import LocalProtocolError, RejectReason
from p2pfm.identity import Identity
from p2pfm.protocol import Accepted, GossipProtocol, Phase, ProtocolConfig, Rejected, RoundComplete

FP = bytes(32)
SPEC = (wire.TensorSpec("x", "float32", (4,)),)
CONFIG = ProtocolConfig(network="net", fingerprint=FP, round_timeout_s=5.0, schema=SPEC)
IDS = [Identity(bytes([i + 1]) * 32) for i in range(4)]
MALLORY = Identity(bytes([99]) * 32)


def _line(n: int, config: ProtocolConfig = CONFIG) -> list[GossipProtocol]:
    """Nodes 0 - 1 - ... - n-1 on a path."""
    peers = [ident.peer_id for ident in IDS[:n]]
    return [
        GossipProtocol(IDS[i], [peers[j] for j in (i - 1, i + 1) if 0 <= j < n], config) for i in range(n)
    ]


def _state(value: float) -> dict[str, np.ndarray[Any, Any]]:
    return {"x": np.full(4, value, dtype=np.float32)}


def _send(proto: GossipProtocol, value: float) -> list[wire.Buffer]:
    return proto.make_update(_state(value), samples=10, wall_time_ms=0)


def test_round_completes_when_all_neighbours_are_heard() -> None:
    a, b, c = _line(3)
    for proto in (a, b, c):
        proto.start_round(1, now_s=0.0)
    msgs = {name: _send(p, v) for name, p, v in (("a", a, 0.0), ("b", b, 3.0), ("c", c, 6.0))}
    assert isinstance(b.receive(msgs["a"], 0.1), Accepted)
    assert b.poll(0.2) is None  # still waiting for c
    event = b.receive(msgs["c"], 0.3)
    assert isinstance(event, Accepted) and event.sender == IDS[2].peer_id and event.round == 1
    done = b.poll(0.4)
    assert isinstance(done, RoundComplete) and not done.timed_out and not done.missing
    assert set(done.updates) == {IDS[0].peer_id, IDS[2].peer_id}
    assert b.phase is Phase.COMPLETE and b.poll(0.5) is None  # reported once
    # Metropolis on a path: b has degree 2, a and c degree 1 -> weight 1/3 each.
    weights = metropolis_weights(2, {p: u.degree for p, u in done.updates.items()})
    mixed = mix(_state(3.0), {p: u.tensors for p, u in done.updates.items()}, weights)
    np.testing.assert_allclose(mixed["x"], 3.0)
    assert isinstance(a.receive(msgs["b"], 0.1), Accepted)
    done_a = a.poll(0.1)
    assert isinstance(done_a, RoundComplete)
    weights_a = metropolis_weights(1, {p: u.degree for p, u in done_a.updates.items()})
    assert weights_a == {IDS[1].peer_id: pytest.approx(1 / 3)}


def test_deadline_completes_with_missing_neighbour() -> None:
    a, b, _ = _line(3)
    a.start_round(1, 0.0)
    b.start_round(1, 0.0)
    b.receive(_send(a, 1.0), 1.0)
    assert b.poll(4.9) is None
    done = b.poll(5.0)
    assert isinstance(done, RoundComplete) and done.timed_out
    assert done.missing == {IDS[2].peer_id}
    weights = metropolis_weights(2, {p: u.degree for p, u in done.updates.items()})
    mixed = mix(_state(4.0), {p: u.tensors for p, u in done.updates.items()}, weights)
    np.testing.assert_allclose(mixed["x"], (2 / 3) * 4.0 + (1 / 3) * 1.0, rtol=1e-6)


def test_absent_neighbour_is_not_waited_for_until_heard_again() -> None:
    a, b, c = _line(3)
    b.start_round(1, 0.0)
    a.start_round(1, 0.0)
    b.receive(_send(a, 1.0), 0.0)
    first = b.poll(5.0)  # c is silent: round 1 needs the full deadline
    assert isinstance(first, RoundComplete) and first.timed_out and first.missing == {IDS[2].peer_id}
    assert b.absent == {IDS[2].peer_id}
    a.start_round(2, 5.0)
    b.start_round(2, 5.0)
    b.receive(_send(a, 2.0), 5.1)
    second = b.poll(5.1)  # c is absent: complete as soon as a is heard
    assert isinstance(second, RoundComplete) and not second.timed_out
    assert second.missing == {IDS[2].peer_id}
    c.start_round(3, 6.0)
    b.receive(_send(c, 3.0), 6.0)  # c is back: present again
    assert b.absent == set()
    b.start_round(3, 6.0)
    assert b.poll(6.1) is None  # waits for a, whose round-3 update has not come
    a.start_round(3, 6.0)
    assert isinstance(b.receive(_send(a, 3.0), 6.2), Accepted)
    done = b.poll(6.2)
    assert isinstance(done, RoundComplete) and not done.missing


def test_replay_is_rejected_and_counted() -> None:
    a, b = _line(2)
    a.start_round(1, 0.0)
    b.start_round(1, 0.0)
    msg = _send(a, 1.0)
    assert isinstance(b.receive(msg, 0.0), Accepted)
    again = b.receive(msg, 0.1)
    assert isinstance(again, Rejected) and again.reason is RejectReason.REPLAY
    assert b.rejections[RejectReason.REPLAY] == 1 and b.accepted == 1


def test_stale_round_is_rejected() -> None:
    a, b = _line(2)
    a.start_round(1, 0.0)
    old = _send(a, 1.0)
    b.start_round(1, 0.0)
    b.poll(10.0)
    b.start_round(2, 10.0)
    event = b.receive(old, 10.0)
    assert isinstance(event, Rejected) and event.reason is RejectReason.STALE_ROUND


def test_newer_message_in_same_round_replaces_older() -> None:
    a, b = _line(2)
    a.start_round(1, 0.0)
    b.start_round(1, 0.0)
    first, second = _send(a, 1.0), _send(a, 2.0)
    assert isinstance(b.receive(second, 0.0), Accepted)
    late_first = b.receive(first, 0.0)  # older seq arriving late: a replay
    assert isinstance(late_first, Rejected) and late_first.reason is RejectReason.REPLAY
    done = b.poll(0.0)
    assert isinstance(done, RoundComplete)
    assert float(done.updates[IDS[0].peer_id].tensors["x"][0]) == 2.0


def test_round_state_is_preferred_over_a_newer_one() -> None:
    a, b = _line(2)
    a.start_round(1, 0.0)
    b.start_round(1, 0.0)
    assert isinstance(b.receive(_send(a, 1.0), 0.0), Accepted)
    a.start_round(2, 0.1)
    assert isinstance(b.receive(_send(a, 2.0), 0.1), Accepted)  # a is already a round ahead
    assert b.highest_peer_round == 2
    done = b.poll(0.2)
    assert isinstance(done, RoundComplete)
    assert float(done.updates[IDS[0].peer_id].tensors["x"][0]) == 1.0  # round 1's state, exactly
    b.start_round(2, 0.3)
    done = b.poll(0.3)  # a's round-2 state was kept for this round
    assert isinstance(done, RoundComplete) and float(done.updates[IDS[0].peer_id].tensors["x"][0]) == 2.0


def test_neighbour_ahead_counts_and_sets_catch_up_target() -> None:
    a, b = _line(2)
    a.start_round(7, 0.0)
    b.start_round(2, 0.0)
    assert isinstance(b.receive(_send(a, 1.0), 0.0), Accepted)
    assert b.highest_peer_round == 7
    done = b.poll(0.0)
    assert isinstance(done, RoundComplete) and not done.missing


def test_message_before_first_round_is_kept() -> None:
    a, b = _line(2)
    a.start_round(0, 0.0)
    assert isinstance(b.receive(_send(a, 1.0), 0.0), Accepted)
    b.start_round(0, 0.1)
    assert isinstance(b.poll(0.1), RoundComplete)


def _rejected_reason(receiver: GossipProtocol, frames: list[wire.Buffer]) -> RejectReason:
    event = receiver.receive(frames, 0.0)
    assert isinstance(event, Rejected)
    assert receiver.rejections[event.reason] >= 1
    return event.reason


def test_gates_reject_and_count_by_reason() -> None:
    (b,) = [GossipProtocol(IDS[1], [IDS[0].peer_id], CONFIG)]
    b.start_round(1, 0.0)

    def sender(config: ProtocolConfig, identity: Identity = IDS[0]) -> GossipProtocol:
        proto = GossipProtocol(identity, [IDS[1].peer_id], config)
        proto.start_round(1, 0.0)
        return proto

    other_net = ProtocolConfig(network="other", fingerprint=FP, round_timeout_s=1.0)
    other_fp = ProtocolConfig(network="net", fingerprint=b"\1" * 32, round_timeout_s=1.0)
    assert _rejected_reason(b, _send(sender(other_net), 1.0)) is RejectReason.WRONG_NETWORK
    assert _rejected_reason(b, _send(sender(other_fp), 1.0)) is RejectReason.FINGERPRINT_MISMATCH
    assert _rejected_reason(b, _send(sender(CONFIG, MALLORY), 1.0)) is RejectReason.UNKNOWN_SENDER
    wrong_shape = sender(CONFIG).make_update({"x": np.zeros(5, np.float32)}, samples=1, wall_time_ms=0)
    assert _rejected_reason(b, wrong_shape) is RejectReason.SCHEMA_MISMATCH
    assert _rejected_reason(b, [b"garbage"]) is RejectReason.MALFORMED
    forged = list(_send(sender(CONFIG), 1.0))
    forged[2] = np.full(4, 1e9, dtype=np.float32).tobytes()
    assert _rejected_reason(b, forged) is RejectReason.BAD_SIGNATURE
    assert b.accepted == 0 and sum(b.rejections.values()) == 6
    assert b.poll(0.5) is None  # nothing accepted: still waiting


def test_misuse_raises_local_errors() -> None:
    (a,) = [GossipProtocol(IDS[0], [IDS[1].peer_id], CONFIG)]
    with pytest.raises(LocalProtocolError):
        _send(a, 1.0)  # before start_round
    a.start_round(3, 0.0)
    with pytest.raises(LocalProtocolError):
        a.start_round(3, 0.0)
    with pytest.raises(LocalProtocolError):
        a.restore(1, 1)
    with pytest.raises(LocalProtocolError):
        GossipProtocol(IDS[0], [IDS[0].peer_id], CONFIG)
    with pytest.raises(LocalProtocolError):
        ProtocolConfig(network="n", fingerprint=FP, round_timeout_s=0)


def test_restore_continues_sequence_so_peers_accept_after_restart() -> None:
    a, b = _line(2)
    a.start_round(1, 0.0)
    b.start_round(1, 0.0)
    assert isinstance(b.receive(_send(a, 1.0), 0.0), Accepted)
    restarted = GossipProtocol(IDS[0], [IDS[1].peer_id], CONFIG)
    restarted.restore(round=1, seq=a.seq)
    restarted.start_round(2, 0.0)
    assert isinstance(b.receive(_send(restarted, 2.0), 0.0), Accepted)


def test_four_nodes_average_to_the_mean_over_rounds() -> None:
    protos = _line(4)
    states = [_state(v) for v in (0.0, 4.0, 8.0, 12.0)]
    for round_ in range(1, 60):
        outgoing = []
        for proto, state in zip(protos, states, strict=True):
            proto.start_round(round_, float(round_))
            outgoing.append(proto.make_update(state, samples=1, wall_time_ms=0))
        for i, frames in enumerate(outgoing):
            for j in (i - 1, i + 1):
                if 0 <= j < 4:
                    assert isinstance(protos[j].receive(frames, float(round_)), Accepted)
        new_states = []
        for proto, state in zip(protos, states, strict=True):
            done = proto.poll(float(round_))
            assert isinstance(done, RoundComplete) and not done.missing
            weights = metropolis_weights(
                len(proto.neighbours), {p: u.degree for p, u in done.updates.items()}
            )
            new_states.append(mix(state, {p: u.tensors for p, u in done.updates.items()}, weights))
        states = new_states
    for state in states:
        np.testing.assert_allclose(state["x"], 6.0, rtol=1e-5)


def test_clock_skew_non_finite_and_rate_gates() -> None:
    a, b = _line(2)
    a.start_round(1, 0.0)
    b.start_round(1, 0.0)
    now_ms = 1_800_000_000_000
    late = a.make_update(_state(1.0), samples=1, wall_time_ms=now_ms - 301_000)
    event = b.receive(late, 0.0, wall_time_ms=now_ms)
    assert isinstance(event, Rejected) and event.reason is RejectReason.CLOCK_SKEW
    ok = a.make_update(_state(1.0), samples=1, wall_time_ms=now_ms - 299_000)
    assert isinstance(b.receive(ok, 0.0, wall_time_ms=now_ms), Accepted)
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = a.make_update({"x": np.array([1.0, bad, 0.0, 0.0], np.float32)}, samples=1, wall_time_ms=0)
        event = b.receive(poisoned, 0.0)
        assert isinstance(event, Rejected) and event.reason is RejectReason.NON_FINITE
    # A flood from one (authenticated) neighbour: the burst passes, the rest is refused ...
    burst = CONFIG.message_burst
    results = [b.receive(_send(a, 2.0), 1.0) for _ in range(burst + 10)]
    limited = [r for r in results if isinstance(r, Rejected) and r.reason is RejectReason.RATE_LIMITED]
    assert len(limited) >= 10
    # ... and the bucket refills with time.
    assert isinstance(b.receive(_send(a, 3.0), 1.0 + 10.0), Accepted)
    assert b.rejections[RejectReason.RATE_LIMITED] == len(limited)
