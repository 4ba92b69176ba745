"""The in-memory transport: the ZeroMQ transport's behaviour without sockets, and a node loop over it."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomli_w

from p2pfm.config.node_config import load_node_config
from p2pfm.core import wire
from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import Identity, write_key_file
from p2pfm.learn.learner import QuadraticLearner
from p2pfm.net.link import DROP_FAULT, Transport
from p2pfm.net.memory import LinkFaults, MemoryNetwork, MemoryTransport, memory_transports
from p2pfm.node.factory import build_node
from p2pfm.node.loop import Node
from p2pfm.node.metrics import read_metrics
from tests.conftest import topic_examples, write_jsonl

A, B, C = (Identity(bytes([i]) * 32) for i in (1, 2, 3))


class Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def _message(value: float, size: int = 4) -> bytes:
    body = wire.encode_update(
        network="n", round=1, seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=1,
        tensors={"x": np.full(size, value, dtype=np.float32)},
    )  # fmt: skip
    return wire.sign(body, A)


def _value(item: Any) -> float:
    return float(wire.open_update(item.message, wire.WireLimits()).tensors["x"][0])


def test_delivers_with_the_sending_link_and_keeps_the_newest_per_link() -> None:
    clock = Clock()
    _, nodes = memory_transports(
        {A.peer_id: [B.peer_id], C.peer_id: [B.peer_id], B.peer_id: [A.peer_id, C.peer_id]}, clock=clock
    )
    transport: Transport = nodes[A.peer_id]  # satisfies the interface the node is written against
    for value in (1.0, 2.0, 3.0):
        assert transport.send(_message(value)) == 1
    nodes[C.peer_id].send(_message(9.0))
    got = nodes[B.peer_id].receive(0.0)
    assert {item.link: _value(item) for item in got} == {A.peer_id: 3.0, C.peer_id: 9.0}  # conflated
    assert nodes[B.peer_id].receive(0.0) == []
    assert nodes[A.peer_id].stats.messages_sent == 3 and nodes[B.peer_id].stats.messages_received == 2
    assert nodes[A.peer_id].send(_message(1.0), [C.peer_id]) == 0  # not a neighbour: no link


def test_loss_delay_and_bandwidth_per_link() -> None:
    clock = Clock()
    network = MemoryNetwork(clock=clock, seed=1)
    a, b = network.attach(A.peer_id, [B.peer_id]), network.attach(B.peer_id, [A.peer_id])
    network.set_faults(A.peer_id, B.peer_id, LinkFaults(loss=0.5))
    taken = sum(a.send(_message(float(i))) for i in range(200))
    assert 60 < taken < 140 and a.stats.dropped[DROP_FAULT] == 200 - taken
    b.receive(0.0)
    size = len(_message(1.0))
    network.set_faults(A.peer_id, B.peer_id, LinkFaults(delay_s=0.5, bytes_per_s=size / 2.0))
    a.send(_message(5.0))  # 0.5 s of delay + 2 s on the wire
    clock.now_s = 2.4
    assert b.receive(0.0) == []
    clock.now_s = 2.5
    assert [_value(item) for item in b.receive(0.0)] == [5.0]
    with pytest.raises(LocalProtocolError):
        LinkFaults(loss=1.5)
    with pytest.raises(LocalProtocolError):
        network.attach(A.peer_id, [])


def test_receive_waits_on_the_real_clock() -> None:
    _, nodes = memory_transports({A.peer_id: [B.peer_id], B.peer_id: [A.peer_id]})
    threading.Timer(0.1, lambda: nodes[A.peer_id].send(_message(7.0))).start()
    got = nodes[B.peer_id].receive(2.0)
    assert [_value(item) for item in got] == [7.0]


def _write_config(folder: Path, me: Identity, peers: dict[str, Identity], **sections: Any) -> Path:
    """A node config (and key file) in ``folder``; the listen/peer addresses are never dialled."""
    folder.mkdir(parents=True)
    write_key_file(me, folder / "node.key")
    doc = {
        "node": {"key": "node.key", "listen": "tcp://127.0.0.1:1", "network": "n", "out": "out"},
        "peers": [
            {"id": p.peer_id.hex, "address": "tcp://127.0.0.1:1", "name": name} for name, p in peers.items()
        ],
        **sections,
    }
    (folder / "node.toml").write_text(tomli_w.dumps(doc))
    return folder / "node.toml"


def _run_all(nodes: dict[Any, Node]) -> dict[Any, Any]:
    """Run every node loop in its own thread; their results once all have finished (bounded wait)."""
    results: dict[Any, Any] = {}
    threads = [threading.Thread(target=lambda k=k: results.update({k: nodes[k].run()})) for k in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == len(nodes), "a node loop did not finish"
    return results


def _tiny_model_config(tmp_path: Path, model_dir: Path, me: Identity, peer: Identity, rounds: int) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(40, seed=0))
    return _write_config(
        tmp_path / me.peer_id.short, me, {peer.peer_id.short: peer},
        model={"path": str(model_dir), "task": "classification", "num_labels": 2},
        lora={"rank": 2, "target_modules": ["query", "value"]},
        data={"source": str(data), "partition": "iid", "shards": 2, "shard": 0 if me is A else 1},
        train={"local_steps": 1, "batch_size": 4, "max_length": 16, "threads": 1},
        gossip={"rounds": rounds, "round_timeout_s": 5.0, "eval_every": 100},
    )  # fmt: skip


def test_two_real_node_loops_gossip_over_memory(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """The node loop does not know which transport it runs on: here no socket is opened."""
    _, transports = memory_transports({A.peer_id: [B.peer_id], B.peer_id: [A.peer_id]})
    nodes = {
        me.peer_id: build_node(
            load_node_config(_tiny_model_config(tmp_path, tiny_bert_dir, me, peer, rounds=3)),
            transport=transports[me.peer_id],
        )
        for me, peer in ((A, B), (B, A))
    }
    results = _run_all(nodes)
    assert all(r.rounds_trained == 3 and not r.stopped for r in results.values())
    for me in (A, B):
        rounds = [
            r
            for r in read_metrics(tmp_path / me.peer_id.short / "out" / "metrics.jsonl")
            if r["event"] == "round"
        ]
        assert [len(r["heard"]) for r in rounds] == [1, 1, 1] and not any(r["timed_out"] for r in rounds)
    assert isinstance(transports[A.peer_id], MemoryTransport) and transports[A.peer_id].closed


class _Computing(QuadraticLearner):
    """A quadratic learner whose local steps take some time, as real training does.

    Training in microseconds, a fast neighbour could finish its next round and
    replace its previous update in a slow thread's inbox (which conflates, as the
    ZeroMQ one does) before that thread read it: the round would then mix with
    the newer state and the result would depend on thread scheduling.
    """

    def train_steps(self, steps: int, correction: object = None) -> float | None:
        time.sleep(0.05)
        return super().train_steps(steps)


def _quadratic_network(tmp_path: Path, spec: str, rounds: int, *, mix: bool = True) -> dict[int, Any]:
    """One real Node loop per vertex, in threads, on quadratic learners and the memory transport."""
    from p2pfm.core.topology import parse_topology  # noqa: PLC0415
    from p2pfm.learn.learner import quadratic_problem  # noqa: PLC0415

    topology = parse_topology(spec)
    n = topology.n_nodes
    ids = [Identity(bytes([40 + i]) * 32) for i in range(n)]
    centres, optimum = quadratic_problem(n, 16, seed=3)
    _, transports = memory_transports(
        {ids[i].peer_id: [ids[j].peer_id for j in topology.neighbours(i)] for i in range(n)}
    )
    nodes = {}
    for i in range(n):
        config = _write_config(
            tmp_path / f"n{i}", ids[i], {f"n{j}": ids[j] for j in topology.neighbours(i)},
            model={"path": "minilm", "num_labels": 5},  # described, never loaded: the learner replaces it
            train={"local_steps": 2},
            gossip={"rounds": rounds, "round_timeout_s": 10.0, "mix": mix},
        )  # fmt: skip
        learner = _Computing(centres[i], optimum, lr=0.3, seed=i)
        nodes[i] = build_node(
            load_node_config(config),
            transport=transports[ids[i].peer_id],
            learner=learner,
        )
    results = _run_all(nodes)
    assert all(r.rounds_trained == rounds for r in results.values())
    return {i: nodes[i].learner.evaluate()["distance"] for i in nodes}


def test_node_loops_on_a_model_free_learner_reach_the_network_optimum(tmp_path: Path) -> None:
    """No model, no socket: the node loop itself, on the simulator's medium."""
    gossip = _quadratic_network(tmp_path / "gossip", "ring:6", rounds=25)
    alone = _quadratic_network(tmp_path / "alone", "ring:6", rounds=25, mix=False)
    # Alone, each node converges to its own centre, far from the network's optimum;
    # gossiping, every node ends much nearer to it (not at it: with a constant step
    # and different centres, D-PSGD keeps a bias, client drift).
    assert min(alone.values()) > 0.3, alone
    assert max(gossip.values()) < 0.6 * min(alone.values()), (gossip, alone)


# ------------------------------------------------ the simulator's hooks


def test_detach_loses_the_inbox_and_what_is_sent_while_down() -> None:
    clock = Clock()
    network = MemoryNetwork(clock=clock)
    a, b = network.attach(A.peer_id, [B.peer_id]), network.attach(B.peer_id, [A.peer_id])
    a.send(_message(1.0))
    network.detach(B.peer_id)  # B's process died with the message in its socket
    network.detach(B.peer_id)  # idempotent
    assert network.next_arrival_s(B.peer_id) is None and b.receive(0.0) == []
    assert a.send(_message(2.0)) == 1  # the sender cannot tell: sent, and lost
    clock.now_s = 0.1
    restarted = network.attach(B.peer_id, [A.peer_id])
    assert restarted.receive(0.0) == []
    a.send(_message(3.0))
    assert [_value(item) for item in restarted.receive(0.0)] == [3.0]


def test_inject_delivers_at_the_given_time_and_announces_the_arrival() -> None:
    clock = Clock()
    arrivals: list[tuple[Any, float]] = []
    network = MemoryNetwork(clock=clock, on_arrival=lambda peer, at_s: arrivals.append((peer, at_s)))
    b = network.attach(B.peer_id, [A.peer_id, C.peer_id])
    network.inject(A.peer_id, B.peer_id, 2.0, _message(4.0))
    assert arrivals == [(B.peer_id, 2.0)] and network.next_arrival_s(B.peer_id) == 2.0
    clock.now_s = 1.9
    assert b.receive(0.0) == []
    clock.now_s = 2.0
    assert [(item.link, _value(item)) for item in b.receive(0.0)] == [(A.peer_id, 4.0)]
    assert network.next_arrival_s(B.peer_id) is None
    network.inject(A.peer_id, C.peer_id, 3.0, _message(5.0))  # C is not attached here: lost, unannounced
    assert arrivals == [(B.peer_id, 2.0)] and network.next_arrival_s(C.peer_id) is None


def test_forward_carries_a_message_to_a_receiver_attached_elsewhere() -> None:
    clock = Clock()
    forwarded: list[tuple[Any, Any, float, bytes]] = []
    arrivals: list[tuple[Any, float]] = []
    network = MemoryNetwork(
        clock=clock,
        forward=lambda *routed: forwarded.append(routed),
        on_arrival=lambda peer, at_s: arrivals.append((peer, at_s)),
    )
    network.set_faults(A.peer_id, C.peer_id, LinkFaults(delay_s=0.25))
    a = network.attach(A.peer_id, [B.peer_id, C.peer_id])
    network.attach(B.peer_id, [A.peer_id])
    message = _message(6.0)
    clock.now_s = 1.0
    assert a.send(message) == 2 and a.stats.messages_sent == 2
    assert forwarded == [(A.peer_id, C.peer_id, 1.25, message)]  # the link's delay is the sender's side
    assert arrivals == [(B.peer_id, 1.0)]  # only local receivers are announced here
    elsewhere = MemoryNetwork(clock=clock)  # the other process's network, where C lives
    c = elsewhere.attach(C.peer_id, [A.peer_id])
    elsewhere.inject(*forwarded[0])
    clock.now_s = 1.25
    assert [(item.link, _value(item)) for item in c.receive(0.0)] == [(A.peer_id, 6.0)]


def test_next_arrival_is_the_earliest_message_on_its_way() -> None:
    clock = Clock()
    network = MemoryNetwork(clock=clock)
    a, c = network.attach(A.peer_id, [B.peer_id]), network.attach(C.peer_id, [B.peer_id])
    b = network.attach(B.peer_id, [A.peer_id, C.peer_id])
    network.set_faults(A.peer_id, B.peer_id, LinkFaults(delay_s=0.5))
    network.set_faults(C.peer_id, B.peer_id, LinkFaults(delay_s=0.2))
    assert network.next_arrival_s(B.peer_id) is None
    a.send(_message(1.0))
    c.send(_message(2.0))
    assert network.next_arrival_s(B.peer_id) == 0.2
    clock.now_s = 0.2
    assert [_value(item) for item in b.receive(0.0)] == [2.0]
    assert network.next_arrival_s(B.peer_id) == 0.5


def test_a_message_in_flight_is_not_replaced_by_a_later_one() -> None:
    """Two updates on a slow link, the receiver reading between their arrivals, gets both."""
    clock = Clock()
    network = MemoryNetwork(clock=clock)
    a, b = network.attach(A.peer_id, [B.peer_id]), network.attach(B.peer_id, [A.peer_id])
    network.set_faults(A.peer_id, B.peer_id, LinkFaults(delay_s=1.0))
    a.send(_message(1.0))  # arrives at 1.0
    clock.now_s = 0.5
    a.send(_message(2.0))  # arrives at 1.5
    assert network.next_arrival_s(B.peer_id) == 1.0
    clock.now_s = 1.0
    assert [_value(item) for item in b.receive(0.0)] == [1.0]
    clock.now_s = 1.5
    assert [_value(item) for item in b.receive(0.0)] == [2.0]


def test_a_message_sent_while_the_receiver_is_down_arrives_if_it_is_back_by_then() -> None:
    clock = Clock()
    network = MemoryNetwork(clock=clock)
    a = network.attach(A.peer_id, [B.peer_id])
    network.attach(B.peer_id, [A.peer_id])
    network.set_faults(A.peer_id, B.peer_id, LinkFaults(delay_s=1.0))
    network.detach(B.peer_id)
    a.send(_message(7.0))  # on its way until 1.0
    clock.now_s = 0.5
    restarted = network.attach(B.peer_id, [A.peer_id])
    clock.now_s = 1.0
    assert [_value(item) for item in restarted.receive(0.0)] == [7.0]


def test_a_long_wait_says_whom_it_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator watching a node whose neighbour is not up sees why it waits, before the deadline."""
    from p2pfm.node import loop  # noqa: PLC0415

    monkeypatch.setattr(loop, "WAIT_NOTICE_S", 0.3)
    caplog.set_level(logging.INFO, logger="p2pfm.node.loop")
    _, transports = memory_transports({A.peer_id: [B.peer_id], B.peer_id: [A.peer_id]})
    config = _write_config(
        tmp_path / "a", A, {"bob": B}, model={"path": "minilm", "num_labels": 5},
        train={"local_steps": 1}, gossip={"rounds": 1, "round_timeout_s": 1.5},
    )  # fmt: skip
    node = build_node(
        load_node_config(config),
        transport=transports[A.peer_id],
        learner=QuadraticLearner(np.ones(4), np.zeros(4)),
    )
    result = node.run()  # bob never runs: the round ends at its deadline
    assert result.rounds_completed == 1
    said = [r for r in caplog.records if "waiting for" in r.getMessage()]
    assert len(said) == 1 and getattr(said[0], "node", None) == node.name
    assert said[0].getMessage().startswith("round 1: waiting for bob (at most ")
