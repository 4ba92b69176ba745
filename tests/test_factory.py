"""The factory: every choice a config makes (faults, attack, wire dtype, mixing) is made once, here."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfm.config.node_config import FaultSettings, GossipSettings, Peer, node_config_from_dict
from p2pfm.config.roster import Member, Roster, save_roster
from p2pfm.core import wire
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import Identity, write_key_file
from p2pfm.learn.learner import QuadraticLearner
from p2pfm.net.memory import MemoryNetwork, MemoryTransport
from p2pfm.node.attacks import Attacker
from p2pfm.node.clock import SystemClock, VirtualClock
from p2pfm.node.factory import assemble_node, build_node
from p2pfm.node.faults import LossyTransport, SlowLearner
from p2pfm.node.loop import Node, RoundPlan
from p2pfm.node.publishing import Honest
from p2pfm.node.store import DiskStore, MemoryStore

ME, B, C = (Identity(bytes([i]) * 32) for i in (11, 12, 13))
PEERS = [Peer(B.peer_id, "memory://b", "b"), Peer(C.peer_id, "memory://c", "c")]
PLAN = RoundPlan(rounds=2, local_steps=1, samples_per_round=4)
DIM = 64


def _learner(dtype: str = "float32") -> QuadraticLearner:
    return QuadraticLearner(np.ones(DIM), np.zeros(DIM), dtype=dtype)


def _assemble(
    *,
    faults: FaultSettings | None = None,
    gossip: GossipSettings | None = None,
    learner: QuadraticLearner | None = None,
    transport: Any = None,
) -> tuple[Node, MemoryTransport]:
    network = MemoryNetwork(clock=VirtualClock().now_s)
    link = network.attach(ME.peer_id, [B.peer_id, C.peer_id])
    node = assemble_node(
        identity=ME, name="me", network="n", peers=PEERS, gossip=gossip or GossipSettings(),
        faults=faults or FaultSettings(), plan=PLAN, learner=learner or _learner(),
        transport=link if transport is None else transport, clock=VirtualClock(), store=MemoryStore(),
        seed=5,
    )  # fmt: skip
    return node, link


def test_a_healthy_node_uses_its_parts_as_given() -> None:
    learner = _learner()
    node, link = _assemble(learner=learner)
    assert node.learner is learner and node.transport is link
    assert isinstance(node.publisher, Honest) and node.publisher.wire_dtypes == {"x": "float32"}
    assert node.protocol.neighbours == {B.peer_id, C.peer_id}
    assert node.protocol.config.members is None  # no roster: proofs may accuse neighbours only
    assert node.peer_names == {B.peer_id: "b", C.peer_id: "c"}
    assert node.facts["neighbours"] == ["b", "c"] and node.facts["attack"] == ""
    assert node.facts["adapter_bytes"] == 4 * DIM and node.facts["learner"] == "quadratic"


def test_faults_become_wrappers_and_an_attack_a_publisher(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="p2pfm")
    faults = FaultSettings(
        slow_factor=2.5, drop={"b": 0.4, "c": 0.0, "stranger": 0.9}, attack="scale", attack_factor=3.0
    )
    node, link = _assemble(faults=faults)
    assert isinstance(node.learner, SlowLearner) and node.learner.factor == 2.5
    assert isinstance(node.transport, LossyTransport) and node.transport.inner is link
    assert node.transport.loss == {B.peer_id: 0.4}  # no loss and unknown names are no wrapper entries
    assert node.transport.neighbours == (B.peer_id, C.peer_id)
    assert isinstance(node.publisher, Attacker) and (node.publisher.kind, node.publisher.factor) == (
        "scale",
        3.0,
    )
    assert node.facts["attack"] == "scale" and node.facts["slow_factor"] == 2.5
    said = [(getattr(r, "node", None), r.getMessage()) for r in caplog.records if "factory" in r.name]
    assert said == [("me", "ATTACKER: sends scale updates (fault injection)")]


def test_no_loss_no_slowness_means_no_wrapper() -> None:
    node, link = _assemble(faults=FaultSettings(slow_factor=1.0, drop={"b": 0.0}))
    assert node.transport is link and not isinstance(node.learner, SlowLearner)


def test_a_node_that_never_mixes_has_no_transport_and_closes_the_one_it_was_given() -> None:
    node, link = _assemble(gossip=GossipSettings(mix=False))
    assert node.transport is None and link.closed
    built: list[Any] = []
    node, _ = _assemble(gossip=GossipSettings(mix=False), transport=built.append)
    assert node.transport is None and built == []  # a transport factory is never called


def test_the_wire_dtype_applies_to_float32_tensors() -> None:
    limits_seen: list[wire.WireLimits] = []
    network = MemoryNetwork()

    def make_transport(limits: wire.WireLimits) -> MemoryTransport:
        limits_seen.append(limits)
        return network.attach(ME.peer_id, [B.peer_id, C.peer_id])

    node, _ = _assemble(gossip=GossipSettings(wire_dtype="bfloat16"), transport=make_transport)
    assert isinstance(node.publisher, Honest) and node.publisher.wire_dtypes == {"x": "bfloat16"}
    assert node.protocol.config.schema == (wire.TensorSpec("x", "bfloat16", (DIM,)),)
    # The bound fits the float32 layout too: a neighbour with another wire dtype is
    # refused as schema_mismatch (counted), not cut off by size.
    float32_bound = wire.limits_for_schema((wire.TensorSpec("x", "float32", (DIM,)),), network="n")
    assert limits_seen == [node.protocol.config.limits]
    assert node.protocol.config.limits.max_message_bytes >= float32_bound.max_message_bytes


def test_a_float64_learner_travels_as_it_is_whatever_the_wire_dtype() -> None:
    node, _ = _assemble(gossip=GossipSettings(wire_dtype="bfloat16"), learner=_learner("float64"))
    assert isinstance(node.publisher, Honest) and node.publisher.wire_dtypes == {}
    assert node.protocol.config.schema == (wire.TensorSpec("x", "float64", (DIM,)),)


def test_the_wire_limits_admit_the_nodes_own_updates() -> None:
    node, _ = _assemble()
    node.protocol.start_round(1, 0.0)
    (message,) = node.publisher.messages(node.protocol, node.learner.get_state(), samples=4, wall_time_ms=0)
    assert len(message) <= node.protocol.config.limits.max_message_bytes
    wire.verify(message, node.protocol.config.limits)  # within every bound


def _config_doc(tmp_path: Path, **node: Any) -> dict[str, Any]:
    write_key_file(ME, tmp_path / "node.key")
    return {
        "node": {"key": "node.key", "listen": "tcp://127.0.0.1:1", "network": "n", "out": "out", **node},
        "peers": [{"id": B.peer_id.hex, "address": "tcp://127.0.0.1:2", "name": "b"}],
        "model": {"path": "minilm", "num_labels": 5},  # described, never loaded: the learner replaces it
        "data": {"shards": 4, "shard": 3},
        "train": {"local_steps": 3, "batch_size": 5},
        "gossip": {"rounds": 7, "eval_every": 2, "snapshot_every": 3},
    }


def test_build_node_takes_its_plan_keys_and_store_from_the_config(tmp_path: Path) -> None:
    config = node_config_from_dict(_config_doc(tmp_path), tmp_path / "node.toml")
    network = MemoryNetwork()
    stop = threading.Event()
    node = build_node(
        config, transport=network.attach(ME.peer_id, [B.peer_id]), learner=_learner(), stop=stop,
    )  # fmt: skip
    try:
        assert node.name == ME.peer_id.short and node.protocol.identity.peer_id == ME.peer_id
        assert node.plan == RoundPlan(
            rounds=7, local_steps=3, samples_per_round=15, eval_every=2, snapshot_every=3
        )
        assert isinstance(node.store, DiskStore) and node.store.out == tmp_path / "out"
        assert isinstance(node.clock, SystemClock) and node.clock.stop is stop and node.stop is stop
        assert node.facts["insecure"] is False and node.facts["open_files_limit"] > 0
    finally:
        node.close()


def test_build_node_refuses_a_key_the_roster_does_not_list(tmp_path: Path) -> None:
    roster = Roster(network="n", members=(Member("b", B.peer_id), Member("c", C.peer_id)))
    save_roster(roster, tmp_path / "roster.toml")
    config = node_config_from_dict(_config_doc(tmp_path, roster="roster.toml"), tmp_path / "node.toml")
    with pytest.raises(ConfigError, match="not in the roster") as info:
        build_node(config, transport=MemoryNetwork().attach(ME.peer_id, [B.peer_id]), learner=_learner())
    assert info.value.field == "node.key" and ME.peer_id.short in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written
