"""Compressed gossip with error feedback: public estimates stay equal on both ends of a chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import p2pfm
from p2pfm.config.node_config import load_node_config
from p2pfm.core import codec, wire
from p2pfm.core.compression import (
    COMPRESSIONS,
    NeighbourEstimates,
    OwnEstimate,
    choco_mix,
    delta_encoding,
    keyframe_encoding,
    received,
)
from p2pfm.core.consensus import robust_mix
from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import Identity
from p2pfm.net.memory import memory_transports
from p2pfm.node.factory import build_node
from p2pfm.node.faults import SlowLearner
from p2pfm.node.metrics import read_metrics
from tests.quadratic_network import Recording, network, run_all, write_config

Array = np.ndarray[Any, Any]
A, B, C = (Identity(bytes([i]) * 32).peer_id for i in (1, 2, 3))
LOSSY = [c for c in COMPRESSIONS if c != "none"]


def _state(rng: np.random.Generator, scale: float = 1.0) -> dict[str, Array]:
    return {
        "lora_A": (rng.standard_normal((8, 300)) * scale).astype(np.float32),
        "lora_B": (rng.standard_normal((300, 8)) * scale).astype(np.float32),
    }


def _drift(state: dict[str, Array], rng: np.random.Generator) -> dict[str, Array]:
    """A training round's small change."""
    return {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in state.items()}


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_the_receivers_estimate_is_the_senders_bit_for_bit(compression: Any) -> None:
    rng = np.random.default_rng(0)
    sender, receiver = OwnEstimate(compression, keyframe_every=4), NeighbourEstimates()
    state = _state(rng)
    for round_ in range(1, 11):
        state = _drift(state, rng)
        out = sender.outgoing(state, round_, frozenset({B}))
        # What travels is decoded by the receiver as the wire's encodings decode it.
        decoded = {name: received(out.wire_dtypes.get(name, "float32"), v) for name, v in out.tensors.items()}
        assert receiver.apply(A, round_, out.base, decoded)
        mine, theirs = sender.estimate, receiver.get(A)
        assert mine is not None and theirs is not None
        for name in state:
            np.testing.assert_array_equal(mine[name], theirs[name])
    assert receiver.broken == {}


@pytest.mark.parametrize("compression", LOSSY)
def test_error_feedback_brings_the_estimate_to_a_resting_state(compression: Any) -> None:
    """What one round drops travels later: with the state held still the estimate closes in on it."""
    rng = np.random.default_rng(1)
    sender = OwnEstimate(compression, keyframe_every=1000)
    state = _state(rng)
    errors = []
    for round_ in range(1, 81):
        sender.outgoing(state, round_, frozenset({B}))
        assert sender.estimate is not None
        errors.append(max(float(np.abs(sender.estimate[k] - state[k]).max()) for k in state))
    scale = max(float(np.abs(v).max()) for v in state.values())
    assert errors[-1] < 1e-3 * scale, (errors[0], errors[-1])
    assert errors[-1] < 0.05 * errors[0]


def test_messages_are_differences_between_keyframes() -> None:
    rng = np.random.default_rng(2)
    sender = OwnEstimate("topk8_d16", keyframe_every=3)
    bases, encodings = [], []
    state = _state(rng)
    for round_ in range(1, 8):
        state = _drift(state, rng)
        out = sender.outgoing(state, round_, frozenset({B}))
        bases.append(out.base)
        encodings.append(set(out.wire_dtypes.values()))
    assert bases == [None, 1, 2, None, 4, 5, None]
    assert encodings == [{"q8"}, *[{"topk8_d16"}] * 2, {"q8"}, *[{"topk8_d16"}] * 2, {"q8"}]
    # A new neighbour gets a keyframe at once; a neighbour leaving needs none.
    assert sender.outgoing(state, 8, frozenset({B, C})).base is None
    assert sender.outgoing(state, 9, frozenset({C})).base == 8
    sender.restart()
    assert sender.outgoing(state, 10, frozenset({C})).base is None


def test_chains_from_a_shared_start_need_no_first_keyframe() -> None:
    """Every node starts from the same adapter: round 1 is already a difference on top of it (base 0)."""
    rng = np.random.default_rng(5)
    start = _state(rng)
    sender = OwnEstimate("topk8_d16", keyframe_every=50, start=start, audience=frozenset({B}))
    receiver = NeighbourEstimates()
    receiver.start(start, frozenset({A, C}))
    state = start
    for round_ in (1, 2, 3):
        state = _drift(state, rng)
        out = sender.outgoing(state, round_, frozenset({B}))
        assert out.base == round_ - 1 and set(out.wire_dtypes.values()) == {"topk8_d16"}
        decoded = {name: received(out.wire_dtypes[name], v) for name, v in out.tensors.items()}
        assert receiver.apply(A, round_, out.base, decoded)
        assert sender.estimate is not None and receiver.get(A) is not None
        for name in state:
            np.testing.assert_array_equal(sender.estimate[name], receiver.get(A)[name])  # type: ignore[index]
    assert sender.keyframes == 0
    assert receiver.get(C) is not None  # C is still at the start, untouched by A's chain
    for name in start:
        np.testing.assert_array_equal(receiver.get(C)[name], start[name])  # type: ignore[index]
    assert sender.outgoing(state, 4, frozenset({B, C})).base is None  # C joined: it needs a keyframe


def test_a_missed_link_breaks_the_chain_until_the_next_keyframe() -> None:
    rng = np.random.default_rng(3)
    sender, receiver = OwnEstimate("q8", keyframe_every=4), NeighbourEstimates()
    state = _state(rng)
    applied = []
    for round_ in range(1, 10):
        state = _drift(state, rng)
        out = sender.outgoing(state, round_, frozenset({B}))
        if round_ == 2:  # lost on the way
            continue
        decoded = {name: received(out.wire_dtypes[name], v) for name, v in out.tensors.items()}
        applied.append(receiver.apply(A, round_, out.base, decoded))
    # round 1 keyframe; 3 builds on the lost 2; 4 on 3 (no estimate); 5 is the next keyframe.
    assert applied == [True, False, False, True, True, True, True, True]
    assert receiver.broken == {"missed_base": 2}


def test_a_receiver_that_lost_a_link_asks_for_a_keyframe_and_gets_it_next_round() -> None:
    """docs/protocol.md 8.3: the receiver names the sender in ``resync``; its next update is a keyframe."""
    rng = np.random.default_rng(3)
    sender, receiver = OwnEstimate("q8", keyframe_every=100), NeighbourEstimates()
    state = _state(rng)
    applied, bases = [], []
    for round_ in range(1, 8):
        state = _drift(state, rng)
        out = sender.outgoing(state, round_, frozenset({B}))
        bases.append(out.base)
        if round_ == 2:  # lost on the way
            continue
        decoded = {name: received(out.wire_dtypes[name], v) for name, v in out.tensors.items()}
        applied.append(receiver.apply(A, round_, out.base, decoded))
        if A in receiver.lost(8):  # the receiver's own update of this round asks A
            assert sender.keyframe_asked(round_)
    # round 3 builds on the lost 2 and breaks the chain; round 3's request makes round 4 a keyframe.
    assert applied == [True, False, True, True, True, True]
    assert bases == [None, 1, 2, None, 4, 5, 6]
    assert sender.keyframes == 2 and sender.keyframes_requested == 1
    assert receiver.lost(8) == () and receiver.broken == {"missed_base": 1}
    np.testing.assert_array_equal(receiver.get(A)["lora_A"], sender.estimate["lora_A"])  # type: ignore[index]


def test_a_neighbour_asking_every_round_gets_a_keyframe_every_other_round() -> None:
    """A request made before the last keyframe could have arrived is stale: the bound on what asking costs."""
    rng = np.random.default_rng(4)
    sender = OwnEstimate("sign1", keyframe_every=100)
    state = _state(rng)
    keyframes = []
    for round_ in range(1, 12):
        out = sender.outgoing(state, round_, frozenset({B}))
        keyframes.append(out.base is None)
        sender.keyframe_asked(round_)  # B asks in every update it sends
    assert keyframes == [True, False, True, False, True, False, True, False, True, False, True]
    assert not OwnEstimate("q8", keyframe_every=4).keyframe_asked(3)  # no chain yet: nothing to grant
    assert not OwnEstimate("none", keyframe_every=4).keyframe_asked(3)


def test_lost_lists_the_oldest_losses_and_forgets_former_neighbours() -> None:
    receiver = NeighbourEstimates()
    for peer in (C, A, B):
        assert not receiver.apply(peer, 3, 2, {"w": np.ones(2, np.float32)})  # no chain to build on
    assert receiver.lost(2) == (C, A)
    receiver.apply(A, 4, None, {"w": np.ones(2, np.float32)})  # A's keyframe restores it
    assert receiver.lost(8) == (C, B)
    receiver.keep_only(frozenset({A, B}))
    assert receiver.lost(8) == (B,)


def test_a_non_finite_estimate_is_dropped_not_mixed() -> None:
    receiver = NeighbourEstimates()
    big = {"w": np.full(4, 3e38, np.float32)}
    assert receiver.apply(A, 1, None, big)
    with np.errstate(over="ignore"):
        assert not receiver.apply(A, 2, 1, big)  # 6e38 overflows float32
    assert receiver.get(A) is None and receiver.broken == {"non_finite": 1}


def test_a_difference_with_other_tensors_is_refused() -> None:
    receiver = NeighbourEstimates()
    assert receiver.apply(A, 1, None, {"w": np.zeros(3, np.float32)})
    assert not receiver.apply(A, 2, 1, {"v": np.zeros(3, np.float32)})
    assert receiver.broken == {"schema": 1}


def test_estimates_of_former_neighbours_are_dropped() -> None:
    receiver = NeighbourEstimates()
    for peer in (A, B, C):
        receiver.apply(peer, 1, None, {"w": np.zeros(2, np.float32)})
    receiver.keep_only(frozenset({B}))
    assert [receiver.get(p) is not None for p in (A, B, C)] == [False, True, False]


@pytest.mark.parametrize("rule", ["mean", "trimmed-mean", "median", "clip"])
def test_without_compression_and_a_full_step_the_mix_is_the_plain_mix(rule: Any) -> None:
    rng = np.random.default_rng(4)
    own = _state(rng)
    others = {A: _state(rng), B: _state(rng), C: _state(rng)}
    weights = {A: 0.25, B: 0.25, C: 0.25}
    plain = robust_mix(rule, own, others, weights)
    choco = choco_mix(rule, own, own, others, weights, step=1.0)
    for name in own:
        np.testing.assert_allclose(choco[name], plain[name], rtol=1e-5, atol=1e-6)


def test_the_step_scales_the_move_towards_the_estimates_mix() -> None:
    local = {"w": np.array([10.0, 0.0], np.float32)}
    own_estimate = {"w": np.array([8.0, 0.0], np.float32)}  # what the neighbours hold of us
    estimates = {A: {"w": np.array([0.0, 4.0], np.float32)}}
    mixed = choco_mix("mean", local, own_estimate, estimates, {A: 0.5}, step=0.5)
    # mix of estimates = (4, 2); minus own estimate = (-4, 2); half of it added to the local state
    np.testing.assert_array_equal(mixed["w"], np.array([8.0, 1.0], np.float32))
    # A neighbour without an estimate keeps its weight with us: the mix is our own estimate.
    alone = choco_mix("mean", local, own_estimate, {}, {A: 0.5}, step=0.5)
    np.testing.assert_array_equal(alone["w"], local["w"])


def test_encodings_and_misuse() -> None:
    topks = [c for c in LOSSY if c.startswith("topk")]
    assert [delta_encoding(c) for c in LOSSY] == ["bfloat16", "q8", *topks, "sign1"]
    assert keyframe_encoding("none") == "float32" and keyframe_encoding("bf16") == "bfloat16"
    assert all(keyframe_encoding(c) == "q8" for c in LOSSY if c != "bf16")
    with pytest.raises(LocalProtocolError):
        delta_encoding("none")
    with pytest.raises(LocalProtocolError, match="unknown compression"):
        OwnEstimate("zip", keyframe_every=1)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="keyframe_every"):
        OwnEstimate("q8", keyframe_every=0)


# ------------------------------------------------------------ in the node loop


def _finish(folder: Path, i: int) -> dict[str, Any]:
    return [r for r in read_metrics(folder / f"n{i}" / "out" / "metrics.jsonl") if r["event"] == "done"][-1]


def _start_error(folder: Path) -> float:
    """The nodes' mean distance to the optimum before training (round 0 is not evaluated: recompute)."""
    _, learners = network(folder / "probe", {"rounds": 1}, dim=2000)
    return float(np.mean([np.linalg.norm(x.initial - x.optimum) for x in learners.values()]))


def _run(folder: Path, gossip: dict[str, Any], **kwargs: Any) -> tuple[list[float], list[dict[str, Any]]]:
    """A ring of 4 quadratic nodes (2000 coordinates): final distances to the optimum, and done records."""
    nodes, learners = network(folder, {"rounds": 20, **gossip}, lr=0.1, step_s=0.1, dim=2000, **kwargs)
    results = run_all(nodes)
    assert all(r.rounds_completed == 20 for r in results.values())
    optimum = learners[0].optimum
    errors = [float(np.linalg.norm(learners[i].get_state()["x"] - optimum)) for i in nodes]
    return errors, [_finish(folder, i) for i in nodes]


def test_compressed_nodes_reach_the_optimum_with_fewer_bytes(tmp_path: Path) -> None:
    plain, plain_ends = _run(tmp_path / "none", {})
    sent = sum(end["bytes_sent"] for end in plain_ends)
    for compression, step, bytes_share, quality in (("bf16", 1.0, 0.55, 1.05), ("q8", 1.0, 0.3, 1.05)):
        errors, ends = _run(tmp_path / compression, {"compression": compression, "compression_step": step})
        assert max(errors) <= quality * max(plain) + 1e-3, (compression, errors, plain)
        assert sum(end["bytes_sent"] for end in ends) < bytes_share * sent, compression
        assert all(end["keyframes_sent"] == 1 and end["estimates_broken"] == {} for end in ends)
        assert all(end["rejected"] == {} for end in ends), [end["rejected"] for end in ends]
    errors, ends = _run(tmp_path / "topk", {"compression": "topk8_d16", "compression_step": 0.5})
    assert sum(end["bytes_sent"] for end in ends) < 0.1 * sent
    assert max(errors) < 0.5 * _start_error(tmp_path / "topk"), errors  # coarser, but it converges


def test_a_lost_difference_costs_the_link_until_the_keyframe_it_asks_for(tmp_path: Path) -> None:
    """No periodic keyframe in 20 rounds: only node1's requests (resync) restore node0's chain."""
    gossip = {"compression": "q8", "keyframe_every": 100}
    errors, ends = _run(tmp_path, gossip, faults={0: {"drop": {"n1": 0.3}}})
    broken, asked = ends[1]["estimates_broken"].get("missed_base", 0), ends[0]["keyframes_requested"]
    print("node1 broken", ends[1]["estimates_broken"], "node0 keyframes", ends[0]["keyframes_sent"])
    assert broken >= 1 and asked >= 1
    assert ends[0]["keyframes_sent"] == 1 + asked  # the first, and one per granted request
    # Each loss breaks the chain for about one difference: without the requests every difference after the
    # first loss would break (17 or so of 20 rounds).
    assert broken <= 2 * asked + 1, (broken, asked)
    assert ends[3]["estimates_broken"] == {} and ends[3]["keyframes_requested"] == 0  # lost nothing
    plain, _ = _run(tmp_path / "plain", {}, faults={0: {"drop": {"n1": 0.3}}})
    assert max(errors) < 2.0 * max(plain) + 1e-3, (errors, plain)


def test_an_attack_reaches_the_robust_rule_in_a_compressing_network(tmp_path: Path) -> None:
    """The attacker's scaled states travel as keyframes: accepted and clipped, no worse than uncompressed."""
    attack = {0: {"attack": "scale", "attack_factor": 10.0}}
    gossip = {"compression": "q8", "rule": "clip", "byzantine_weight": 0.5}
    errors, ends = _run(tmp_path / "attacked", gossip, faults=attack)
    for i in (1, 3):  # the attacker's neighbours heard it every round and refused nothing
        assert ends[i]["rejected"] == {} and ends[i]["messages_received"] >= 2 * 20
    naive, _ = _run(tmp_path / "mean", {"compression": "q8"}, faults=attack)
    assert max(errors[1:]) < 0.5 * max(naive[1:]), (errors, naive)  # the rule mattered
    plain, _ = _run(tmp_path / "plain", {"rule": "clip", "byzantine_weight": 0.5}, faults=attack)
    assert max(errors[1:]) < 1.2 * max(plain[1:]), (errors, plain)


class _SharedStart(Recording):
    """A learner whose initial state every node with the same settings shares (as AdapterLearner's)."""

    shared_start = True


def test_a_resumed_node_keeps_the_networks_fingerprint(tmp_path: Path) -> None:
    """The chain fingerprint is the network's agreement, not the node's state: a node that resumes
    (and restarts its chain with a keyframe) must still be heard by its fresh neighbours."""
    centre, optimum = np.ones(4), np.zeros(4)
    me, peer = Identity(b"\x31" * 32), Identity(b"\x32" * 32)
    fingerprints = {}
    for compression in ("none", "q8"):
        for resume in (False, True):
            folder = tmp_path / f"{compression}-{resume}"
            config = load_node_config(write_config(folder, me, {"p": peer}, {"compression": compression}))
            learner = _SharedStart(centre, optimum)
            node = build_node(config, transport=_transport(me, peer), learner=learner, resume=resume)
            fingerprints[compression, resume] = node.protocol.config.fingerprint
            assert (node.compressed is None) == (compression == "none")
            node.close()
    assert fingerprints["none", False] == fingerprints["none", True] == learner.fingerprint
    assert fingerprints["q8", False] == fingerprints["q8", True] != learner.fingerprint


def test_a_slow_node_keeps_the_learners_shared_start(tmp_path: Path) -> None:
    """The slow fault wraps the learner; the wrapper must not hide ``shared_start`` (or ``snapshot``):
    a slow node of a compressing network would sign with another fingerprint and be refused."""
    centre, optimum = np.ones(4), np.zeros(4)
    me, peer = Identity(b"\x31" * 32), Identity(b"\x32" * 32)
    nodes = {}
    for slow in (1.0, 3.0):
        folder = tmp_path / f"slow-{slow}"
        config = load_node_config(
            write_config(folder, me, {"p": peer}, {"compression": "q8"}, faults={"slow_factor": slow})
        )
        learner = _SharedStart(centre, optimum)
        learner.snapshot = learner.get_state  # type: ignore[attr-defined]
        nodes[slow] = build_node(config, transport=_transport(me, peer), learner=learner)
    fast, slow_node = nodes[1.0], nodes[3.0]
    assert isinstance(slow_node.learner, SlowLearner) and slow_node.learner.shared_start
    assert slow_node.learner.snapshot == slow_node.learner.inner.snapshot  # type: ignore[attr-defined]
    assert slow_node.protocol.config.fingerprint == fast.protocol.config.fingerprint
    assert slow_node.compressed is not None and fast.compressed is not None
    assert slow_node.compressed.own.estimate is not None  # the chain starts at the shared start
    for node in nodes.values():
        node.close()


def _transport(me: Identity, peer: Identity) -> Any:
    _, transports = memory_transports({me.peer_id: [peer.peer_id], peer.peer_id: [me.peer_id]})
    return transports[me.peer_id]


@pytest.mark.parametrize("compression", [c for c in COMPRESSIONS if c in codec.ENCODINGS])
def test_a_difference_is_encoded_once_and_travels_as_encoded(compression: Any) -> None:
    """The bytes the sender decoded for its own estimate are the bytes on the wire, not a second encoding."""
    rng = np.random.default_rng(6)
    sender = OwnEstimate(compression, keyframe_every=50)
    state = _drift(_state(rng), rng)
    sender.outgoing(state, 1, frozenset({B}))  # the keyframe
    assert sender.estimate is not None
    before = {name: value.copy() for name, value in sender.estimate.items()}
    state = _drift(state, rng)
    out = sender.outgoing(state, 2, frozenset({B}))
    assert out.base == 1 and all(isinstance(v, codec.Encoded) for v in out.tensors.values())
    header = {"network": "n", "round": 2, "seq": 1, "ts_ms": 0, "fingerprint": b"f" * 32, "degree": 1}
    sent = wire.encode_update(**header, samples=1, tensors=out.tensors, wire_dtypes=out.wire_dtypes, base=1)
    # What the wire used to encode a second time: the difference itself, as the same wire dtypes.
    difference = {name: np.subtract(state[name], before[name], dtype=np.float32) for name in state}
    old = wire.encode_update(**header, samples=1, tensors=difference, wire_dtypes=out.wire_dtypes, base=1)
    assert sent.header == old.header and b"".join(sent.payload) == b"".join(old.payload)
    wrong = {name: "float32" for name in out.tensors}
    with pytest.raises(LocalProtocolError, match="encoded as"):
        wire.encode_update(**header, samples=1, tensors=out.tensors, wire_dtypes=wrong, base=1)


def test_in_a_lossy_network_asking_for_keyframes_keeps_the_chains_mixing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ring:16, 10% of messages lost, no periodic keyframe in 40 rounds: without the requests a lost
    difference drops that estimate for good and the network stops converging (the simulator runs the
    real node loops)."""

    def final_distances() -> list[float]:
        return [
            p2pfm.simulate(
                "ring:16", rounds=40, compression="q8", keyframe_every=100, drop=0.1, seed=seed, dim=2000
            )
            .rounds[-1]
            .consensus_distance
            for seed in (1, 2, 3)
        ]

    asking = final_distances()
    monkeypatch.setattr(OwnEstimate, "keyframe_asked", lambda self, in_round: False)  # requests ignored
    deaf = final_distances()
    print("final consensus distance: asking", asking, "requests ignored", deaf)
    assert np.mean(asking) < 0.5 * np.mean(deaf), (asking, deaf)


def test_a_neighbour_claiming_rounds_ahead_still_gets_a_keyframe_at_most_every_other_round(
    tmp_path: Path,
) -> None:
    """The grant compares with the node's own round: node1 asks in every update and dates each one
    max_rounds_ahead (3) rounds ahead of node0, which the protocol accepts."""
    nodes, _ = network(tmp_path, {"rounds": 20, "compression": "q8", "keyframe_every": 100}, dim=2000)
    node0, node1 = nodes[0], nodes[1]
    node0.open()
    asker = node1.protocol
    keyframe = {"x": np.zeros(2000, np.float32)}
    for round_ in range(1, 9):
        node0.publish(round_)
        asker.start_round(round_ + 3, 0.0)
        request = asker.make_update(
            keyframe,
            samples=1,
            wall_time_ms=node1.clock.wall_ms(),
            wire_dtypes={"x": "q8"},
            resync=[node0.protocol.identity.peer_id],
        )
        node1.transport.send(request, [node0.protocol.identity.peer_id])  # type: ignore[union-attr]
        node0.judge(0.5)  # in node0's round round_
    own = node0.compressed.own  # type: ignore[union-attr]
    assert node0.protocol.accepted == 8 and not node0.protocol.rejections  # every request was taken
    assert own.keyframes == 4 and own.keyframes_requested == 3  # rounds 1 (the first), 3, 5, 7
    for node in nodes.values():
        node.close()
