"""The node loop with a learning algorithm: consensus rounds, per-round records, resuming the algorithm.

Real ``Node`` loops in threads, on quadratic learners and the memory transport (as in test_memory.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfm.config.node_config import load_node_config
from p2pfm.core.consensus import consensus_distance
from p2pfm.core.identity import Identity
from p2pfm.core.topology import parse_topology
from p2pfm.learn.checkpoint import ALGORITHM_FILE, load_checkpoint
from p2pfm.learn.learner import QuadraticLearner, quadratic_problem
from p2pfm.net.memory import memory_transports
from p2pfm.node.factory import build_node
from p2pfm.node.loop import Node, RoundPlan
from p2pfm.node.metrics import read_metrics
from tests.quadratic_network import write_config

Array = np.ndarray[Any, Any]


class _Recording(QuadraticLearner):
    """Local steps take a little time (as in test_memory.py: no thread races ahead of a slow one), and
    every evaluation (the node's record, after the round's mix) keeps the state it saw."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[Array] = []
        self.corrections: list[Array | None] = []

    def train_steps(self, steps: int, correction: Any = None) -> float | None:
        time.sleep(0.02)
        self.corrections.append(None if not correction else np.array(correction["x"]))
        return super().train_steps(steps, correction)

    def evaluate(self) -> dict[str, float]:
        self.seen.append(self.get_state()["x"].copy())
        return super().evaluate()


def _network(
    tmp_path: Path, gossip: dict[str, Any], *, spec: str = "ring:4", resume: bool = False
) -> tuple[dict[int, Node], dict[int, _Recording]]:
    topology = parse_topology(spec)
    n = topology.n_nodes
    ids = [Identity(bytes([60 + i]) * 32) for i in range(n)]
    centres, optimum = quadratic_problem(n, 8, seed=5, spread=3.0)
    _, transports = memory_transports(
        {ids[i].peer_id: [ids[j].peer_id for j in topology.neighbours(i)] for i in range(n)}
    )
    nodes, learners = {}, {}
    for i in range(n):
        config = write_config(
            tmp_path / f"n{i}", ids[i], {f"n{j}": ids[j] for j in topology.neighbours(i)}, gossip
        )
        learners[i] = _Recording(centres[i], optimum, lr=0.3, seed=i)
        nodes[i] = build_node(
            load_node_config(config),
            transport=transports[ids[i].peer_id],
            learner=learners[i],
            resume=resume,
        )
    return nodes, learners


def _run_all(nodes: dict[int, Node]) -> dict[int, Any]:
    results: dict[int, Any] = {}
    threads = [threading.Thread(target=lambda k=k: results.update({k: nodes[k].run()})) for k in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == len(nodes), "a node loop did not finish"
    return results


def _round_records(tmp_path: Path, i: int) -> list[dict[str, Any]]:
    records = read_metrics(tmp_path / f"n{i}" / "out" / "metrics.jsonl")
    return [r for r in records if r["event"] == "round" and r["round"] > 0]


def test_round_plan_steps_in() -> None:
    plan = RoundPlan(rounds=6, consensus_rounds=2, local_steps=3, samples_per_round=3, eval_every=1)
    assert [plan.steps_in(r) for r in range(1, 7)] == [3, 3, 3, 3, 0, 0]
    plain = RoundPlan(rounds=2, local_steps=3, samples_per_round=3, eval_every=1)
    assert [plain.steps_in(r) for r in (1, 2)] == [3, 3]


def test_the_factory_appends_the_consensus_rounds(tmp_path: Path) -> None:
    nodes, _ = _network(
        tmp_path, {"rounds": 3, "consensus_rounds": 2, "algorithm": "scaffold"}, spec="ring:3"
    )
    try:
        plan = nodes[0].plan
        assert (plan.rounds, plan.consensus_rounds, plan.local_steps) == (5, 2, 2)
        assert nodes[0].algorithm.settings.algorithm == "scaffold"
        assert nodes[0].facts["algorithm"] == "scaffold"
    finally:
        for node in nodes.values():
            node.close()


def test_consensus_rounds_only_mix_and_bring_the_nodes_together(tmp_path: Path) -> None:
    rounds, consensus = 4, 2
    nodes, learners = _network(tmp_path, {"rounds": rounds, "consensus_rounds": consensus})
    results = _run_all(nodes)
    total = rounds + consensus
    assert all(r.rounds_completed == total and r.rounds_trained == total for r in results.values())
    for i in nodes:
        records = _round_records(tmp_path, i)
        assert [r["round"] for r in records] == list(range(1, total + 1))
        assert [r["local_steps"] for r in records] == [2] * rounds + [0] * consensus
        assert [r["train_loss"] is None for r in records] == [False] * rounds + [True] * consensus
        # A quadratic learner has no LoRA pairs: nothing to measure, but the field is there every round.
        assert all("aggregation_error" in r and r["aggregation_error"] is None for r in records)
        assert all(len(r["heard"]) == 2 for r in records)
        assert len(learners[i].seen) == total + 1  # round 0, then every round
    # Consensus distance after each round (index r: after round r): the two mixing-only rounds
    # each shrink it by a lot (ring:4 mixes by 3x per round when everyone is heard).
    distance = [consensus_distance([{"x": learners[i].seen[r]} for i in nodes]) for r in range(total + 1)]
    last_trained = distance[rounds]
    assert last_trained > 1e-4, distance  # the local steps kept the nodes apart ...
    assert distance[rounds + 1] < 0.5 * last_trained, distance  # ... mixing alone brings them together
    assert distance[rounds + 2] < 0.5 * distance[rounds + 1], distance


def test_a_resumed_scaffold_node_restores_its_correction(tmp_path: Path) -> None:
    gossip = {"rounds": 3, "algorithm": "scaffold", "drift_beta": 0.5}
    nodes, learners = _network(tmp_path, gossip, spec="ring:3")
    _run_all(nodes)
    saved = {i: nodes[i].algorithm.state_dict() for i in nodes}
    for i in nodes:
        assert set(saved[i]) == {"correction/x"}
        assert np.abs(saved[i]["correction/x"]).max() > 1e-3  # heterogeneous centres: a real correction
        # The correction learned in round r is applied in round r + 1 (none in round 1).
        applied = learners[i].corrections
        assert applied[0] is None and applied[1] is not None and applied[2] is not None
        assert (tmp_path / f"n{i}" / "out" / "checkpoint" / ALGORITHM_FILE).is_file()
        checkpoint = load_checkpoint(tmp_path / f"n{i}" / "out" / "checkpoint")
        assert checkpoint is not None and checkpoint.round == 3
        np.testing.assert_array_equal(checkpoint.algorithm["correction/x"], saved[i]["correction/x"])
    # The corrections sum to ~zero over the network (mean rule, Metropolis weights, everyone heard).
    np.testing.assert_allclose(np.mean([saved[i]["correction/x"] for i in nodes], axis=0), 0.0, atol=1e-5)

    resumed, _ = _network(tmp_path, {**gossip, "rounds": 5}, spec="ring:3", resume=True)
    try:
        for i, node in resumed.items():
            assert node.algorithm.state_dict() == {}  # fresh until the checkpoint is opened
            opening = node.open()
            assert opening.resumed and opening.next_round == 4
            restored = node.algorithm.state_dict()
            assert restored.keys() == saved[i].keys()
            np.testing.assert_array_equal(restored["correction/x"], saved[i]["correction/x"])
            correction = node.algorithm.correction()
            assert correction is not None
            np.testing.assert_array_equal(correction["x"], saved[i]["correction/x"])
    finally:
        for node in resumed.values():
            node.close()


@pytest.mark.parametrize("algorithm", ["dpsgd", "diloco"])
def test_algorithms_without_a_correction_never_pass_one(tmp_path: Path, algorithm: str) -> None:
    gossip = {"rounds": 3, "algorithm": algorithm, "outer_lr": 0.7, "outer_momentum": 0.5}
    nodes, learners = _network(tmp_path, gossip, spec="ring:3")
    _run_all(nodes)
    for i in nodes:
        assert learners[i].corrections == [None, None, None]
        state = nodes[i].algorithm.state_dict()
        assert set(state) == ({"momentum/x"} if algorithm == "diloco" else set())
        has_file = (tmp_path / f"n{i}" / "out" / "checkpoint" / ALGORITHM_FILE).exists()
        assert has_file == (algorithm == "diloco")


def test_consensus_rounds_bring_diloco_nodes_together(tmp_path: Path) -> None:
    """Measured (ring:4, 10 rounds then 2 consensus rounds): dpsgd 0.0455 -> 0.0053 -> 0.00059 (x0.013);
    diloco (outer_lr 1, momentum 0.9) 0.0445 -> 0.028 -> 0.0251 (x0.56)."""
    rounds = 10
    gossip = {"rounds": rounds, "consensus_rounds": 2, "algorithm": "diloco", "outer_momentum": 0.9}
    nodes, learners = _network(tmp_path, gossip)
    _run_all(nodes)
    distance = [consensus_distance([{"x": learners[i].seen[r]} for i in nodes]) for r in range(rounds + 3)]
    assert distance[rounds] > 1e-3, distance
    assert distance[rounds + 2] < 0.1 * distance[rounds], distance


def test_a_node_that_never_mixes_still_runs_its_outer_optimizer(tmp_path: Path) -> None:
    """The local baseline is the same node without mixing: fedadam steps on its own pseudo-gradient."""
    me = Identity(bytes([90]) * 32)
    centres, optimum = quadratic_problem(2, 8, seed=5, spread=3.0)
    runs = {}
    for algorithm in ("dpsgd", "fedadam"):
        config = write_config(
            tmp_path / algorithm,
            me,
            {},
            {"rounds": 1, "mix": False, "algorithm": algorithm, "outer_lr": 0.05},
        )
        learner = _Recording(centres[0], optimum, lr=0.1, seed=0, start=optimum)
        node = build_node(load_node_config(config), learner=learner)
        assert node.transport is None
        node.run()
        runs[algorithm] = learner.get_state()["x"]
    x0, centre = optimum.astype(np.float64), centres[0].astype(np.float64)
    # dpsgd alone: 2 gradient steps at lr 0.1 on ||x - c||^2 / 2.
    np.testing.assert_allclose(runs["dpsgd"], centre + (x0 - centre) * 0.9**2, rtol=1e-5)
    # fedadam alone: Adam's first (bias-corrected) step is outer_lr x sign(x0 - x_local) = sign(x0 - c).
    np.testing.assert_allclose(runs["fedadam"], x0 - 0.05 * np.sign(x0 - centre), rtol=1e-5, atol=1e-6)
