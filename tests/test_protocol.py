"""Protocol instances wired back to back: no sockets, no clocks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from p2pfm.core import wire
from p2pfm.core.consensus import metropolis_weights, mix
from p2pfm.core.errors import LocalProtocolError, RejectReason
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import (
    Accepted,
    EquivocationFound,
    GossipProtocol,
    MixSettings,
    Phase,
    ProtocolConfig,
    Rejected,
    RoundComplete,
)

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


def _send(proto: GossipProtocol, value: float) -> bytes:
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


def test_a_second_different_update_for_a_round_is_equivocation() -> None:
    a, b, c = _line(3)
    for proto in (a, b, c):
        proto.start_round(1, 0.0)
    first, second = _send(a, 1.0), _send(a, 2.0)  # both validly signed, round 1
    assert isinstance(b.receive(first, 0.0), Accepted)
    found = b.receive(second, 0.1)
    assert isinstance(found, EquivocationFound) and found.new and found.reporter is None
    assert found.accused == IDS[0].peer_id and found.round == 1
    assert b.banned == {IDS[0].peer_id} and b.rejections[RejectReason.EQUIVOCATION] == 1
    assert wire.check_evidence(*found.evidence, CONFIG.limits).accused == IDS[0].peer_id
    # The banned sender's first update is forgotten (not mixed) and it is not waited for.
    assert isinstance(b.receive(_send(c, 0.0), 0.1), Accepted)
    done = b.poll(0.2)
    assert isinstance(done, RoundComplete) and IDS[0].peer_id in done.missing
    assert IDS[0].peer_id not in done.updates
    a.start_round(2, 1.0)
    later = b.receive(_send(a, 3.0), 1.0)
    assert isinstance(later, Rejected) and later.reason is RejectReason.BANNED
    # The same message twice is a replay, not equivocation.
    c.start_round(2, 1.0)
    again = _send(c, 1.0)
    b.start_round(2, 1.0)
    assert isinstance(b.receive(again, 1.0), Accepted)
    replay = b.receive(again, 1.1)
    assert isinstance(replay, Rejected) and replay.reason is RejectReason.REPLAY


def test_equivocation_proof_convinces_a_node_that_saw_one_version() -> None:
    members = frozenset(ident.peer_id for ident in IDS[:3])  # the roster: c may hear of a, not its neighbour
    a, b, c = _line(
        3, ProtocolConfig(network="net", fingerprint=FP, round_timeout_s=5.0, schema=SPEC, members=members)
    )
    for proto in (a, b, c):
        proto.start_round(1, 0.0)
    first, second = _send(a, 1.0), _send(a, 2.0)
    b.receive(first, 0.0)
    found = b.receive(second, 0.0)
    assert isinstance(found, EquivocationFound)
    proof = b.make_proof(found.evidence)
    relayed = c.receive(proof, 0.1, link=IDS[1].peer_id)
    assert isinstance(relayed, EquivocationFound) and relayed.new and relayed.reporter == IDS[1].peer_id
    assert relayed.accused == IDS[0].peer_id and c.banned == {IDS[0].peer_id}
    again = c.receive(b.make_proof(found.evidence), 0.2)
    assert isinstance(again, EquivocationFound) and not again.new


def _head(message: bytes) -> bytes:
    return bytes(wire.verify(message, CONFIG.limits).head)


def test_invalid_equivocation_proofs_are_refused_and_ban_nobody() -> None:
    a, b, c = _line(3)
    for proto in (a, b, c):
        proto.start_round(1, 0.0)
    m1 = _send(a, 1.0)
    a.start_round(2, 0.0)
    m2 = _send(a, 2.0)  # a different round: honest
    m3 = _send(c, 2.0)  # another sender
    for evidence in ((_head(m1), _head(m2)), (_head(m1), _head(m1)), (_head(m2), _head(m3)), (m1, _head(m2))):
        event = c.receive(b.make_proof(evidence), 0.1)
        assert isinstance(event, Rejected) and event.reason is RejectReason.MALFORMED, evidence
    assert not c.banned


def test_a_proof_about_a_non_member_is_refused() -> None:
    """A neighbour must not grow our ban list (and evidence files) with keys it made up."""
    _, b, c = _line(3)
    stranger = GossipProtocol(MALLORY, [IDS[1].peer_id], CONFIG)
    stranger.start_round(1, 0.0)
    heads = (_head(_send(stranger, 1.0)), _head(_send(stranger, 2.0)))  # a valid proof, about an outsider
    event = c.receive(b.make_proof(heads), 0.0, link=IDS[1].peer_id)
    assert isinstance(event, Rejected) and event.reason is RejectReason.UNKNOWN_SENDER and not c.banned
    roster = ProtocolConfig(
        network="net", fingerprint=FP, round_timeout_s=5.0, schema=SPEC,
        members=frozenset({IDS[0].peer_id, IDS[1].peer_id, IDS[2].peer_id, MALLORY.peer_id}),
    )  # fmt: skip
    member_aware = GossipProtocol(IDS[2], [IDS[1].peer_id], roster)
    found = member_aware.receive(b.make_proof(heads), 0.0, link=IDS[1].peer_id)
    assert isinstance(found, EquivocationFound) and found.accused == MALLORY.peer_id  # a roster member


def test_round_state_is_preferred_over_a_newer_one() -> None:
    a, b = _line(2)
    a.start_round(1, 0.0)
    b.start_round(1, 0.0)
    assert isinstance(b.receive(_send(a, 1.0), 0.0), Accepted)
    a.start_round(2, 0.1)
    assert isinstance(b.receive(_send(a, 2.0), 0.1), Accepted)  # a is already a round ahead
    assert b.heard_claims(0.1) == {IDS[0].peer_id: 2}
    done = b.poll(0.2)
    assert isinstance(done, RoundComplete)
    assert float(done.updates[IDS[0].peer_id].tensors["x"][0]) == 1.0  # round 1's state, exactly
    b.start_round(2, 0.3)
    done = b.poll(0.3)  # a's round-2 state was kept for this round
    assert isinstance(done, RoundComplete) and float(done.updates[IDS[0].peer_id].tensors["x"][0]) == 2.0


def test_neighbour_ahead_counts_and_sets_catch_up_target() -> None:
    a, b = _line(2)
    a.start_round(4, 0.0)
    b.start_round(2, 0.0)
    assert isinstance(b.receive(_send(a, 1.0), 0.0), Accepted)  # 2 rounds ahead: within the window
    assert b.heard_claims(0.0) == {IDS[0].peer_id: 4}
    done = b.poll(0.0)
    assert isinstance(done, RoundComplete) and not done.missing
    assert b.catch_up_target(3, 0.0) == 4


def test_far_future_round_is_refused_and_moves_a_lone_node_by_the_window_only() -> None:
    """Issue 9 item 1: one signed update with round 2^62 must not end anyone's training."""
    a, b = _line(2)
    a.start_round(2**62, 0.0)
    b.start_round(1, 0.0)
    event = b.receive(_send(a, 1.0), 0.0)
    assert isinstance(event, Rejected) and event.reason is RejectReason.FUTURE_ROUND
    assert b.heard_claims(0.0) == {IDS[0].peer_id: 2**62}  # remembered as a claim, not believed
    window = CONFIG.max_rounds_ahead
    assert b.catch_up_target(2, 0.0) == 2 + window  # one neighbour: followed by at most the window
    assert b.poll(0.0) is None  # the refused update does not count for the round ...
    done = b.poll(CONFIG.round_timeout_s)
    assert isinstance(done, RoundComplete) and done.missing == {IDS[0].peer_id}  # ... its weight stays here


def test_catch_up_needs_a_strict_majority_of_the_neighbours_heard() -> None:
    a, b, c = _line(3)  # b has neighbours a and c
    b.start_round(1, 0.0)
    a.start_round(2**40, 0.0)
    b.receive(_send(a, 1.0), 0.0)  # a liar, far ahead
    assert b.catch_up_target(2, 0.0) == 2 + CONFIG.max_rounds_ahead  # only a heard so far
    c.start_round(2, 0.0)
    b.receive(_send(c, 1.0), 0.0)  # an honest neighbour one round ahead
    assert b.catch_up_target(2, 0.0) == 2  # no majority for the liar's round
    c.start_round(9, 0.1)
    b.receive(_send(c, 1.0), 0.1)
    assert b.catch_up_target(2, 0.1) == 9  # both a and c claim >= 9: a majority
    # Claims older than two deadlines are not "heard recently".
    assert b.catch_up_target(2, 0.1 + 2 * CONFIG.round_timeout_s + 1) == 2


def test_message_signed_by_another_key_than_its_link_is_refused() -> None:
    a, b, c = _line(3)
    for proto in (a, b, c):
        proto.start_round(1, 0.0)
    message = _send(a, 1.0)
    event = b.receive(message, 0.0, link=IDS[2].peer_id)  # came on c's connection
    assert isinstance(event, Rejected) and event.reason is RejectReason.SENDER_MISMATCH
    assert event.sender == IDS[2].peer_id
    assert isinstance(b.receive(message, 0.0, link=IDS[0].peer_id), Accepted)


def test_replays_of_a_neighbours_message_cost_it_no_tokens() -> None:
    """Issue 9 item 6: re-sent copies of H's old message must not silence H."""
    a, b, c = _line(3)
    for proto in (a, b, c):
        proto.start_round(1, 0.0)
    old = _send(a, 1.0)
    assert isinstance(b.receive(old, 0.0, link=IDS[0].peer_id), Accepted)
    for i in range(777):  # replayed by c on its own link, and with no link known (insecure)
        event = b.receive(old, 0.001 * i, link=IDS[2].peer_id if i % 2 else None)
        assert isinstance(event, Rejected)
        assert event.reason in (RejectReason.SENDER_MISMATCH, RejectReason.REPLAY)
    assert b.rejections[RejectReason.RATE_LIMITED] == 0
    a.start_round(2, 0.8)
    b.poll(1.0)
    b.start_round(2, 1.0)
    assert isinstance(b.receive(_send(a, 2.0), 1.0, link=IDS[0].peer_id), Accepted)


def test_message_before_first_round_is_kept() -> None:
    a, b = _line(2)
    a.start_round(0, 0.0)
    assert isinstance(b.receive(_send(a, 1.0), 0.0), Accepted)
    b.start_round(0, 0.1)
    assert isinstance(b.poll(0.1), RoundComplete)


def _rejected_reason(receiver: GossipProtocol, message: bytes) -> RejectReason:
    event = receiver.receive(message, 0.0)
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
    assert _rejected_reason(b, b"garbage") is RejectReason.MALFORMED
    genuine = _send(sender(CONFIG), 1.0)
    forged = genuine[:-16] + np.full(4, 1e9, dtype=np.float32).tobytes()  # payload swapped
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
        for i, message in enumerate(outgoing):
            for j in (i - 1, i + 1):
                if 0 <= j < 4:
                    assert isinstance(protos[j].receive(message, float(round_)), Accepted)
        new_states = []
        for proto, state in zip(protos, states, strict=True):
            done = proto.poll(float(round_))
            assert isinstance(done, RoundComplete) and not done.missing
            # The round carries this node's Metropolis row; mixing it is the plain mean.
            weights = metropolis_weights(
                len(proto.neighbours), {p: u.degree for p, u in done.updates.items()}
            )
            assert done.weights == weights
            mixed = done.mix(state, MixSettings())
            np.testing.assert_array_equal(
                mixed["x"], mix(state, {p: u.tensors for p, u in done.updates.items()}, weights)["x"]
            )
            new_states.append(mixed)
        states = new_states
    for state in states:
        np.testing.assert_allclose(state["x"], 6.0, rtol=1e-5)


def test_clock_skew_non_finite_and_rate_gates() -> None:
    wide = ProtocolConfig(
        network="net", fingerprint=FP, round_timeout_s=5.0, schema=SPEC, max_rounds_ahead=10_000
    )
    a, b = _line(2, wide)
    b.start_round(1, 0.0)
    rounds = iter(range(1, 10_000))

    def update(state: dict[str, np.ndarray[Any, Any]], wall_time_ms: int = 0) -> bytes:
        a.start_round(next(rounds), 0.0)  # one update per round: a second one would be equivocation
        return a.make_update(state, samples=1, wall_time_ms=wall_time_ms)

    now_ms = 1_800_000_000_000
    event = b.receive(update(_state(1.0), now_ms - 301_000), 0.0, wall_time_ms=now_ms)
    assert isinstance(event, Rejected) and event.reason is RejectReason.CLOCK_SKEW
    assert isinstance(b.receive(update(_state(1.0), now_ms - 299_000), 0.0, wall_time_ms=now_ms), Accepted)
    for bad in (np.nan, np.inf, -np.inf):
        event = b.receive(update({"x": np.array([1.0, bad, 0.0, 0.0], np.float32)}), 0.0)
        assert isinstance(event, Rejected) and event.reason is RejectReason.NON_FINITE
    # A flood from one (authenticated) neighbour: the burst passes, the rest is refused ...
    burst = wide.message_burst
    results = [b.receive(update(_state(2.0)), 1.0) for _ in range(burst + 10)]
    limited = [r for r in results if isinstance(r, Rejected) and r.reason is RejectReason.RATE_LIMITED]
    assert len(limited) >= 10
    # ... and the bucket refills with time.
    assert isinstance(b.receive(update(_state(3.0)), 1.0 + 10.0), Accepted)
    assert b.rejections[RejectReason.RATE_LIMITED] == len(limited)


def test_round_mix_follows_the_rule_and_bad_rules_are_refused() -> None:
    a, b, c = _line(3)
    for proto in (a, b, c):
        proto.start_round(1, 0.0)
    b.receive(_send(a, 0.0), 0.0)
    b.receive(_send(c, 9.0), 0.0)
    done = b.poll(0.0)
    assert isinstance(done, RoundComplete)
    assert done.weights == {IDS[0].peer_id: pytest.approx(1 / 3), IDS[2].peer_id: pytest.approx(1 / 3)}
    np.testing.assert_allclose(done.mix(_state(3.0), MixSettings())["x"], 4.0)  # (0 + 3 + 9) / 3
    np.testing.assert_allclose(done.mix(_state(3.0), MixSettings("median"))["x"], 3.0)
    with pytest.raises(LocalProtocolError, match="unknown mixing rule"):
        MixSettings("krum")  # type: ignore[arg-type]


def test_a_new_neighbour_is_not_waited_for_until_heard_and_a_removed_one_is_forgotten() -> None:
    a, b, c = _line(3)
    d = IDS[3].peer_id
    b.set_neighbours([IDS[0].peer_id, IDS[2].peer_id, d])  # d joins b's active view
    for proto in (a, b, c):
        proto.start_round(1, now_s=0.0)
    old = _send(a, 1.0)
    b.receive(old, 0.1)
    b.receive(_send(c, 2.0), 0.1)
    done = b.poll(0.2)  # d, never heard, is absent: the round does not wait for it
    assert isinstance(done, RoundComplete) and not done.timed_out and done.missing == {d}
    b.set_neighbours([IDS[2].peer_id])  # a is dropped: its messages are refused from now on
    b.start_round(2, now_s=1.0)
    assert _rejected_reason(b, old) is RejectReason.UNKNOWN_SENDER
    b.set_neighbours([IDS[0].peer_id, IDS[2].peer_id])  # back again: its old message is still a replay
    assert _rejected_reason(b, old) is RejectReason.REPLAY
    with pytest.raises(LocalProtocolError):
        b.set_neighbours([IDS[1].peer_id])
