"""A ring of real ``Node`` loops on quadratic learners and the memory transport, in threads.

Shared by the tests of the node loop's modes (overlap, compression): node i
minimises ``||x - c_i||^2 / 2``; the network's optimum is the centres' mean.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from p2pfm.config.node_config import load_node_config
from p2pfm.core.identity import Identity, write_key_file
from p2pfm.core.topology import parse_topology
from p2pfm.learn.learner import QuadraticLearner, quadratic_problem
from p2pfm.net.memory import LinkFaults, memory_transports
from p2pfm.node.factory import build_node
from p2pfm.node.loop import Node
from p2pfm.node.metrics import read_metrics

Array = np.ndarray[Any, Any]


class Recording(QuadraticLearner):
    """Local steps take ``step_s`` of real time (per two steps); every evaluation keeps the state it saw."""

    def __init__(self, *args: Any, step_s: float = 0.02, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_s = step_s
        self.seen: list[Array] = []
        self.initial = self.get_state()["x"].copy()

    def train_steps(self, steps: int, correction: Any = None) -> float | None:
        time.sleep(self.step_s * max(steps, 1) / 2)
        return super().train_steps(steps, correction)

    def evaluate(self) -> dict[str, float]:
        self.seen.append(self.get_state()["x"].copy())
        return super().evaluate()


def write_config(
    folder: Path,
    me: Identity,
    peers: dict[str, Identity],
    gossip: dict[str, Any],
    faults: dict[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "node.key").exists():
        write_key_file(me, folder / "node.key")
    doc = {
        "node": {"key": "node.key", "listen": "tcp://127.0.0.1:1", "network": "n", "out": "out"},
        "peers": [
            {"id": p.peer_id.hex, "address": "tcp://127.0.0.1:1", "name": name} for name, p in peers.items()
        ],
        "model": {"path": "minilm", "num_labels": 5},  # described, never loaded: the learner replaces it
        "train": {"local_steps": 2},
        "gossip": {"round_timeout_s": 10.0, **gossip},
        "faults": faults or {},
    }
    (folder / "node.toml").write_text(tomli_w.dumps(doc))
    return folder / "node.toml"


def network(
    tmp_path: Path,
    gossip: dict[str, Any],
    *,
    delay_s: float = 0.0,
    step_s: float = 0.02,
    lr: float = 0.3,
    dim: int = 8,
    faults: dict[int, dict[str, Any]] | None = None,
) -> tuple[dict[int, Node], dict[int, Recording]]:
    topology = parse_topology("ring:4")
    n = topology.n_nodes
    ids = [Identity(bytes([80 + i]) * 32) for i in range(n)]
    centres, optimum = quadratic_problem(n, dim, seed=7, spread=3.0)
    links, transports = memory_transports(
        {ids[i].peer_id: [ids[j].peer_id for j in topology.neighbours(i)] for i in range(n)}
    )
    if delay_s:
        for i in range(n):
            for j in topology.neighbours(i):
                links.set_faults(ids[i].peer_id, ids[j].peer_id, LinkFaults(delay_s=delay_s))
    nodes, learners = {}, {}
    for i in range(n):
        peers = {f"n{j}": ids[j] for j in topology.neighbours(i)}
        path = write_config(tmp_path / f"n{i}", ids[i], peers, gossip, (faults or {}).get(i))
        learners[i] = Recording(centres[i], optimum, lr=lr, seed=i, step_s=step_s)
        nodes[i] = build_node(
            load_node_config(path),
            transport=transports[ids[i].peer_id],
            learner=learners[i],
        )
    return nodes, learners


def run_all(nodes: dict[int, Node], timeout_s: float = 60) -> dict[int, Any]:
    results: dict[int, Any] = {}
    threads = [threading.Thread(target=lambda k=k: results.update({k: nodes[k].run()})) for k in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    assert len(results) == len(nodes), "a node loop did not finish"
    return results


def round_records(folder: Path, i: int) -> list[dict[str, Any]]:
    records = read_metrics(folder / f"n{i}" / "out" / "metrics.jsonl")
    return [r for r in records if r["event"] == "round" and r["round"] > 0]
