"""Publishing strategies: what an honest node and each attacker put on the wire, as a receiver judges it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from p2pfm.core import wire
from p2pfm.core.errors import RejectReason
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import Accepted, EquivocationFound, GossipProtocol, ProtocolConfig, Rejected
from p2pfm.node.attacks import ATTACKS, DEFAULT_FACTOR, Attacker
from p2pfm.node.publishing import Honest, Publisher

ALICE, BOB = Identity(bytes([1]) * 32), Identity(bytes([2]) * 32)
FP = bytes(range(32))
DIM = 4096
STATE = {"x": np.random.default_rng(0).standard_normal(DIM).astype(np.float32)}


def _pair(wire_dtype: str = "float32") -> tuple[GossipProtocol, GossipProtocol]:
    """Alice (who publishes) and Bob (who judges), neighbours, both in round 1."""
    config = ProtocolConfig(
        network="net", fingerprint=FP, round_timeout_s=5.0,
        schema=(wire.TensorSpec("x", wire_dtype, (DIM,)),), max_clock_skew_s=None,
    )  # fmt: skip
    alice = GossipProtocol(ALICE, [BOB.peer_id], config)
    bob = GossipProtocol(BOB, [ALICE.peer_id], config)
    for proto in (alice, bob):
        proto.start_round(1, 0.0)
    return alice, bob


def _publish(publisher: Publisher, alice: GossipProtocol) -> list[bytes]:
    return publisher.messages(alice, STATE, samples=32, wall_time_ms=1_000)


def _opened(message: bytes) -> wire.Update:
    return wire.open_update(message, wire.WireLimits())


def _x(message: bytes) -> np.ndarray[Any, Any]:
    return np.asarray(_opened(message).tensors["x"], np.float64)


def test_honest_sends_one_update_its_neighbour_accepts() -> None:
    alice, bob = _pair()
    honest: Publisher = Honest()
    assert honest.gap_s == 0.0
    (message,) = _publish(honest, alice)
    event = bob.receive(message, 0.1, link=ALICE.peer_id)
    assert isinstance(event, Accepted) and (event.sender, event.round) == (ALICE.peer_id, 1)
    update = _opened(message)
    assert (update.seq, update.samples, update.ts_ms, update.degree) == (alice.seq, 32, 1_000, 1)
    np.testing.assert_array_equal(update.tensors["x"], STATE["x"])


def test_honest_sends_in_the_configured_wire_dtype() -> None:
    alice, bob = _pair("bfloat16")
    (message,) = _publish(Honest({"x": "bfloat16"}), alice)
    assert isinstance(bob.receive(message, 0.1, link=ALICE.peer_id), Accepted)
    assert _opened(message).specs == (wire.TensorSpec("x", "bfloat16", (DIM,)),)
    np.testing.assert_allclose(_x(message), STATE["x"], rtol=2**-8)  # 8 significant bits
    _, float32_bob = _pair("float32")  # a neighbour expecting float32 refuses it, by reason
    event = float32_bob.receive(message, 0.1, link=ALICE.peer_id)
    assert isinstance(event, Rejected) and event.reason is RejectReason.SCHEMA_MISMATCH


def test_the_attack_kinds_are_the_documented_ones_and_an_unknown_one_is_refused() -> None:
    assert set(ATTACKS) == {
        "scale", "noise", "signflip", "replay", "forge", "wrong-model", "equivocate", "far-future",
    }  # fmt: skip
    assert Attacker.gap_s > 0.0  # the second version of an equivocation comes a moment later
    with pytest.raises(ValueError, match="unknown attack 'krum'"):
        Attacker("krum", None, seed=0)


@pytest.mark.parametrize(
    ("kind", "factor", "expected"),
    [("scale", None, 10.0), ("scale", 2.5, 2.5), ("signflip", None, -1.0), ("signflip", 3.0, -3.0)],
)
def test_scale_and_signflip_multiply_the_state(kind: str, factor: float | None, expected: float) -> None:
    alice, bob = _pair()
    (message,) = _publish(Attacker(kind, factor, seed=0), alice)
    assert isinstance(bob.receive(message, 0.1, link=ALICE.peer_id), Accepted)  # validly signed: let in
    np.testing.assert_allclose(_x(message), expected * STATE["x"], rtol=1e-6)


def test_noise_has_factor_times_the_states_rms_and_its_own_seed() -> None:
    rms = float(np.sqrt(np.mean(np.square(STATE["x"], dtype=np.float64))))
    noises = {}
    for name, factor, seed in (("default", None, 1), ("again", None, 1), ("other", None, 2), ("x3", 3.0, 1)):
        alice, _ = _pair()
        (message,) = _publish(Attacker("noise", factor, seed=seed), alice)
        noises[name] = _x(message) - STATE["x"]
    assert DEFAULT_FACTOR["noise"] == 1.0
    assert float(np.std(noises["default"])) == pytest.approx(rms, rel=0.05)
    assert float(np.std(noises["x3"])) == pytest.approx(3 * rms, rel=0.05)
    np.testing.assert_array_equal(noises["default"], noises["again"])  # reproducible
    assert not np.allclose(noises["default"], noises["other"])


def test_replay_resends_its_first_update_which_is_then_refused() -> None:
    alice, bob = _pair()
    attacker = Attacker("replay", None, seed=0)
    (first,) = _publish(attacker, alice)
    assert isinstance(bob.receive(first, 0.1, link=ALICE.peer_id), Accepted)  # genuine
    for proto in (alice, bob):
        proto.start_round(2, 1.0)
    (again,) = attacker.messages(alice, {"x": STATE["x"] * 0}, samples=32, wall_time_ms=2_000)
    assert again == first  # the same bytes, whatever the state now is
    event = bob.receive(again, 1.1, link=ALICE.peer_id)
    assert isinstance(event, Rejected) and event.reason is RejectReason.REPLAY


def test_forge_signs_with_a_key_outside_the_roster_derived_from_the_seed() -> None:
    signers = set()
    for seed in (5, 5, 6):
        alice, bob = _pair()
        (message,) = _publish(Attacker("forge", None, seed=seed), alice)
        verified = wire.verify(message, wire.WireLimits())
        assert verified.sender not in (ALICE.peer_id, BOB.peer_id)
        signers.add((seed, verified.sender))
        np.testing.assert_array_equal(_opened(message).tensors["x"], STATE["x"])  # honest content
        event = bob.receive(message, 0.1)  # no authenticated link: the signer is judged
        assert isinstance(event, Rejected) and event.reason is RejectReason.UNKNOWN_SENDER
    assert len(signers) == 2  # one forger key per seed: runs are reproducible


def test_wrong_model_claims_another_fingerprint() -> None:
    alice, bob = _pair()
    (message,) = _publish(Attacker("wrong-model", None, seed=0), alice)
    update = _opened(message)
    assert update.sender == ALICE.peer_id and update.fingerprint != FP and len(update.fingerprint) == 32
    event = bob.receive(message, 0.1, link=ALICE.peer_id)
    assert isinstance(event, Rejected) and event.reason is RejectReason.FINGERPRINT_MISMATCH


def test_equivocate_signs_two_different_updates_for_one_round_and_is_caught() -> None:
    alice, bob = _pair()
    first, second = _publish(Attacker("equivocate", None, seed=0), alice)
    a, b = _opened(first), _opened(second)
    assert (a.sender, a.round) == (b.sender, b.round) == (ALICE.peer_id, 1) and b.seq == a.seq + 1
    np.testing.assert_allclose(_x(second), DEFAULT_FACTOR["equivocate"] * _x(first), rtol=1e-6)
    assert isinstance(bob.receive(first, 0.1, link=ALICE.peer_id), Accepted)
    found = bob.receive(second, 0.4, link=ALICE.peer_id)
    assert isinstance(found, EquivocationFound) and found.accused == ALICE.peer_id and found.new
    assert wire.check_evidence(*found.evidence, wire.WireLimits()).accused == ALICE.peer_id
    assert ALICE.peer_id in bob.banned


@pytest.mark.parametrize(
    ("factor", "ahead"),
    [
        (None, 2**62 - 1),
        (5.0, 5),
        (1.0, 1),
    ],
)  # fmt: skip
def test_far_future_claims_a_round_far_ahead(factor: float | None, ahead: int) -> None:
    alice, bob = _pair()
    seq_before = alice.seq
    (message,) = _publish(Attacker("far-future", factor, seed=0), alice)
    update = _opened(message)
    assert update.round == alice.round + ahead and update.seq == seq_before + 1
    event = bob.receive(message, 0.1, link=ALICE.peer_id)
    if ahead > bob.config.max_rounds_ahead:
        assert isinstance(event, Rejected) and event.reason is RejectReason.FUTURE_ROUND
    else:  # a round just ahead is what an honest neighbour may send
        assert isinstance(event, Accepted)
