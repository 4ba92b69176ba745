"""p2pfm.simulate: the simulator's Python API (docs/testing.md), its errors, and the pytest plugin."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import networkx as nx
import numpy as np
import pytest

import p2pfm
from p2pfm import ArrayLearner, Attack, Crash, Drop, SimulationResult, simulate
from p2pfm.core.errors import ArgumentError, LocalProtocolError
from p2pfm.learn.learner import Array
from p2pfm.testing.pytest_plugin import GossipNetwork, seed_for


class Pull(ArrayLearner):
    """Node i descends ||w - t_i||^2 / 2 with steps 1/(1 + k): the network's optimum is the mean of the t_i.

    Decreasing steps, as decentralised SGD needs: with a fixed one, nodes
    pulled towards different targets would keep disagreeing.
    """

    def __init__(self, node: int, *, size: int = 3, kind: str = "pull") -> None:
        self.target = np.random.default_rng(node).standard_normal(size)
        self.steps = 0
        super().__init__({"w": np.zeros(size, np.float32), "b": np.ones((2, 2), np.float32)}, kind=kind)

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        losses = []
        for _ in range(steps):
            self.steps += 1
            gap = self.state["w"] - self.target
            losses.append(float(gap @ gap))
            self.state["w"] = (self.state["w"] - gap / (1 + self.steps)).astype(np.float32)
        return float(np.mean(losses)) if losses else None

    def evaluate(self) -> dict[str, float]:
        return {"norm": float(np.linalg.norm(self.state["w"]))}


OPTIMUM = np.mean([Pull(i).target for i in range(8)], axis=0)  # of ring:8's eight nodes


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"topology": "ring:x"}, "topology"),
        ({"topology": 8}, "topology"),
        ({"topology": nx.Graph([(0, 1), (2, 3)])}, "topology"),
        ({"rounds": -1}, "rounds"),
        ({"rounds": 2.5}, "rounds"),
        ({"rule": "average"}, "rule"),
        ({"drop": 1.5}, "drop"),
        ({"byzantine_weight": 1.0}, "byzantine_weight"),
        ({"compression": "zip"}, "compression"),
        ({"compression": "q8", "dtype": "float64"}, "compression"),
        ({"attacks": {1: "shout"}}, "attacks"),
        ({"attacks": {7: "scale"}}, "attacks"),
        ({"faults": [Crash(node=9, round=1)]}, "faults"),
        ({"faults": [Crash(node=1, round=-1)]}, "faults"),
        ({"faults": [Drop(prob=0.5, link=(0, 2))]}, "faults"),  # not an edge of ring:4
        ({"faults": ["crash"]}, "faults"),
        ({"faults": [Attack(node=1, kind="scale")], "attacks": {1: "noise"}}, "attacks"),
        ({"learner": "mine"}, "learner"),
        ({"learner": Pull, "dim": 8}, "dim"),
        ({"learner": Pull, "lr": 0.5}, "lr"),
        ({"workers": 0}, "workers"),
        ({"step_s": -1.0}, "step_s"),
        ({"step_s": float("nan")}, "step_s"),
        ({"latency_s": 0.0}, "latency_s"),
        ({"seed": -1}, "seed"),
        ({"trim": -1}, "trim"),
        ({"max_rounds_ahead": 0}, "max_rounds_ahead"),
        ({"keyframe_every": 0}, "keyframe_every"),
        ({"compression_step": 0.0}, "compression_step"),
        ({"deadline": "late"}, "deadline"),
        ({"dtype": "int8"}, "dtype"),
        ({"lr": 0.0}, "lr"),
        ({"noise": -0.1}, "noise"),
        ({"dim": 0}, "dim"),
        ({"drop": "0.1"}, "drop"),
        ({"rule": 3}, "rule"),
    ],
)
def test_a_bad_argument_raises_an_argument_error_naming_it(kwargs: dict[str, Any], argument: str) -> None:
    topology = kwargs.pop("topology", "ring:4")
    with pytest.raises(ArgumentError) as caught:
        simulate(topology, rounds=kwargs.pop("rounds", 2), **kwargs)
    assert caught.value.argument == argument
    assert str(caught.value).startswith(f"argument {argument!r}: ")
    assert isinstance(caught.value, LocalProtocolError) and isinstance(caught.value, ValueError)


def test_learners_that_differ_between_nodes_are_refused_before_the_first_round() -> None:
    with pytest.raises(ArgumentError, match="fingerprint") as caught:
        simulate("ring:4", rounds=2, learner=lambda i: Pull(i, size=3 if i < 2 else 4))
    assert caught.value.argument == "learner"

    class Broken:
        schema = ()

    with pytest.raises(ArgumentError, match="fingerprint"):
        simulate("ring:4", rounds=2, learner=lambda i: Broken())  # type: ignore[arg-type,return-value]


def test_a_numpy_learner_trains_to_consensus_on_a_ring() -> None:
    result = simulate("ring:8", rounds=60, learner=Pull, local_steps=1)
    assert isinstance(result, SimulationResult) and len(result) == 61
    assert [r.round for r in result] == list(range(61))
    assert result.rounds[0].train_loss is None and result.rounds[1].train_loss is not None
    assert result.final.train_loss is not None and result.final.train_loss < result.rounds[1].train_loss
    assert result.rejected == 0 and all(r.delivered == r.messages == 16 for r in result.rounds[1:])
    # The nodes come to agree, on the optimum (the mean target).
    assert result.disagreement() == pytest.approx(result.consensus_distance)  # every node is honest
    assert result.consensus_distance < min(2e-3, 0.05 * result.rounds[1].consensus_distance)
    np.testing.assert_allclose(result.mean_state()["w"], OPTIMUM, atol=0.02)
    np.testing.assert_allclose(result.mean_state()["b"], np.ones((2, 2)))  # never trained, mixed unchanged
    for node in result.nodes:
        assert node.distance is None  # no known optimum for a caller's learner
        assert set(node.metrics) == {"norm"} and node.rounds_trained == 60
        assert set(node.final_state) == {"w", "b"} and node.initial_state["w"].tolist() == [0.0, 0.0, 0.0]
    assert result.node("node3") is result.node(3)
    doc = result.as_json()
    assert len(doc["rounds"]) == 61 and "final_state" not in doc["nodes"][0]


def test_the_built_in_learner_reports_its_distance_and_pure_gossip_has_no_loss() -> None:
    result = simulate("complete:4", rounds=2, dim=8, keep_states=False)
    assert result.rounds[1].consensus_distance < 1e-12  # a complete graph averages in one round
    assert all(r.train_loss is None for r in result)
    assert all(node.distance is not None and node.distance < 1e-6 for node in result.nodes)
    assert all(node.final_state == {} for node in result.nodes)
    with pytest.raises(LocalProtocolError, match="keep_states"):
        result.disagreement()


def test_a_networkx_graph_runs_as_its_spec_does() -> None:
    graph = nx.relabel_nodes(nx.cycle_graph(6), {i: f"n{i}" for i in range(6)})  # sorted: n0..n5, a ring
    from_graph = simulate(graph, rounds=5, dim=16, seed=4)
    from_spec = simulate("ring:6", rounds=5, dim=16, seed=4)
    assert from_graph.topology == "graph:6" and from_graph.lambda2 == pytest.approx(from_spec.lambda2)
    assert [r.consensus_distance for r in from_graph] == [r.consensus_distance for r in from_spec]


def test_a_robust_rule_contains_an_attacker_the_mean_lets_through() -> None:
    def worst(rule: str, attacked: bool) -> float:
        """The honest nodes' largest distance to the optimum."""
        faults = [Attack(node=3, kind="scale")] if attacked else []
        result = simulate("ring:8", rounds=12, learner=Pull, rule=rule, faults=faults)
        assert [n.attack for n in result.nodes] == ["", "", "", "scale" if attacked else "", "", "", "", ""]
        assert result.rejected == 0  # validly signed: only the rule can tell
        return max(float(np.linalg.norm(n.final_state["w"] - OPTIMUM)) for n in result.honest)

    assert worst("mean", True) > 100 * worst("mean", False)
    assert worst("median", True) < 3 * worst("median", False)


def test_an_equivocating_attacker_is_banned_by_its_neighbours() -> None:
    result = simulate("ring:6", rounds=4, dim=8, attacks={2: "equivocate"})
    assert {n.name: n.banned for n in result.nodes if n.banned} == {"node1": ("node2",), "node3": ("node2",)}
    assert result.rejected > 0


def test_the_same_seed_gives_the_same_run_and_another_seed_another() -> None:
    def run(seed: int) -> SimulationResult:
        return simulate(
            "ring:6", rounds=8, learner=Pull, drop=0.3, seed=seed,
            faults=[Crash(node=1, round=3, restart_after_s=2.0)],
        )  # fmt: skip

    first, again, other = run(11), run(11), run(12)
    assert first.as_json() == again.as_json()
    for a, b in zip(first.nodes, again.nodes, strict=True):
        np.testing.assert_array_equal(a.final_state["w"], b.final_state["w"])
    assert first.node(1).crashes == 1
    assert [r.delivered for r in first] != [r.delivered for r in other]  # other losses


def test_worker_processes_give_the_one_process_result_with_a_callers_learner() -> None:
    one = simulate("ring:8", rounds=5, learner=Pull, seed=2)
    two = simulate("ring:8", rounds=5, learner=Pull, seed=2, workers=2)
    assert two.workers == 2 and one.workers == 1
    # the parts' tallies merge in another order: equal up to float rounding
    assert [r.consensus_distance for r in two] == pytest.approx([r.consensus_distance for r in one], rel=1e-9)
    assert [n.metrics for n in one.nodes] == [n.metrics for n in two.nodes]


def test_the_plugin_fixture_seeds_each_test_and_keeps_its_runs(
    gossip_network: GossipNetwork, p2pfm_seed: int, request: pytest.FixtureRequest
) -> None:
    assert p2pfm_seed == seed_for(request.node.nodeid) == gossip_network.seed
    gossip_network.defaults.update(dim=8, rounds=2)
    first = gossip_network()
    assert first.seed == p2pfm_seed and first.topology == "ring:4" and len(first) == 3
    second = gossip_network("ring:6", rounds=3, seed=5)
    assert gossip_network.runs == [first, second] and gossip_network.last is second and second.seed == 5
    assert seed_for("a.py::test_x") != seed_for("a.py::test_y")


@pytest.mark.slow  # starts a process
def test_import_p2pfm_and_the_plugin_stay_light() -> None:
    code = (
        "import sys, p2pfm, p2pfm.testing.pytest_plugin\n"
        "heavy = ('numpy', 'torch', 'p2pfm.simulation', 'p2pfm.lab')\n"
        "loaded = sorted(m for m in heavy if m in sys.modules)\n"
        "assert not loaded, loaded\n"
        "assert p2pfm.simulate.__module__ == 'p2pfm.simulation' and 'torch' not in sys.modules\n"
        "assert 'simulate' in dir(p2pfm)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    with pytest.raises(AttributeError):
        _ = p2pfm.no_such_name  # type: ignore[attr-defined]


@pytest.mark.slow  # loads torch and trains LoRA adapters on four nodes
def test_a_tiny_model_trains_lora_adapters_in_the_simulator(
    gossip_network: GossipNetwork, tiny_model: Any
) -> None:
    result = gossip_network("ring:4", rounds=4, learner=tiny_model.learners(4, lr=0.02), local_steps=5)
    assert result.rejected == 0 and all(r.delivered == r.messages == 8 for r in result.rounds[1:])
    assert result.final.consensus_distance < result.rounds[1].consensus_distance
    assert result.final.train_loss is not None and result.rounds[1].train_loss is not None
    assert result.final.train_loss < result.rounds[1].train_loss
    assert min(node.metrics["accuracy"] for node in result.nodes) > 0.6
    assert all(
        node.distance is None and any("lora" in name for name in node.final_state) for node in result.nodes
    )
