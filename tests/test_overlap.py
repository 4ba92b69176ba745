"""gossip.overlap: a round's exchange runs beside the next round's training; its mix lands one round late.

The simulator (virtual time, deterministic) checks the arithmetic against the
synchronous loop; real ``Node`` loops in threads on the memory transport check
that the waiting is hidden, that records and checkpoints say what happened,
and that every algorithm still converges.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfm.lab.sim import SimConfig, simulate
from p2pfm.learn.algorithm import ALGORITHMS
from p2pfm.node.metrics import read_metrics
from tests.quadratic_network import network, round_records, run_all


def _distances(config: SimConfig) -> list[float]:
    return [row.consensus_distance for row in simulate(config).rounds]


def test_pure_averaging_with_overlap_is_the_synchronous_sequence_one_round_later() -> None:
    """No local steps: the late correction x += mix(x_r) - x_r is exactly the synchronous mix.

    A synchronous round r records the state after its mix; an overlapped one
    records the state it publishes (after the mix of round r - 1), except the
    last round, which lands round R - 1's mix and then waits for its own.
    """
    rounds = 8
    base = SimConfig("ring:8", rounds, dim=50, dtype="float64", seed=3)
    sync = _distances(base)
    late = _distances(SimConfig("ring:8", rounds, dim=50, dtype="float64", seed=3, overlap=True))
    assert len(sync) == len(late) == rounds + 1  # round 0, then every round
    assert late[0] == sync[0]
    assert late[1] == sync[0]  # nothing landed yet
    for r in range(1, rounds - 1):  # overlapped round r + 1 publishes what synchronous round r ends with
        assert late[r + 1] == pytest.approx(sync[r], rel=1e-9), (r, sync, late)
    # The last round lands round R - 1's mix, then waits for its own: the same R mixes in all.
    assert late[rounds] == pytest.approx(sync[rounds], rel=1e-9)
    assert sync[rounds] < 0.5 * sync[rounds - 2]  # the checks above could fail: each mix changes a lot


@pytest.mark.parametrize("algorithm", ["dpsgd", "diloco", "fedadam", "scaffold"])
def test_overlapped_nodes_converge_as_synchronous_ones_do(tmp_path: Path, algorithm: str) -> None:
    """Real node loops: every algorithm gets about as near the network's optimum with overlap.

    A local step moves a node 5% of the way to its own centre (lr 0.05; two
    steps a round): with 30% per step (lr 0.3), DiLoCo's momentum applied a
    round late oscillated (mu 0.3) or diverged (mu 0.6); docs/node.md says so.
    """
    assert set(ALGORITHMS) == {"dpsgd", "diloco", "fedadam", "scaffold"}
    rounds = 20
    gossip: dict[str, Any] = {"rounds": rounds, "algorithm": algorithm}
    if algorithm == "fedadam":
        gossip |= {"outer_lr": 0.5, "outer_momentum": 0.5}
    if algorithm == "diloco":
        gossip |= {"outer_lr": 0.7, "outer_momentum": 0.9}  # DiLoCo's own setting
    errors = {}
    for overlap in (False, True):
        nodes, learners = network(tmp_path / str(overlap), {**gossip, "overlap": overlap}, lr=0.05)
        results = run_all(nodes)
        assert all(r.rounds_completed == rounds == r.rounds_trained for r in results.values())
        states = [learners[i].get_state()["x"] for i in nodes]
        errors[overlap] = max(float(np.linalg.norm(x - learners[0].optimum)) for x in states)
        start = float(np.linalg.norm(learners[0].initial - learners[0].optimum))
        assert errors[overlap] < 0.25 * start, (overlap, errors, start)
    assert errors[True] < 2.0 * errors[False] + 0.05, errors


def test_overlapped_records_say_which_round_each_mix_came_from(tmp_path: Path) -> None:
    rounds = 5
    nodes, learners = network(tmp_path, {"rounds": rounds, "overlap": True})
    run_all(nodes)
    for i in nodes:
        records = round_records(tmp_path, i)
        assert [r["round"] for r in records] == list(range(1, rounds + 1))
        # round r lands round r - 1's exchange; the last round waits for its own
        assert [r["mixed_round"] for r in records] == [None, 1, 2, 3, 5]
        assert [len(r["heard"]) for r in records] == [0, 2, 2, 2, 2]
        assert all(r["local_steps"] == 2 for r in records)
        assert len(learners[i].seen) == rounds + 1
    nodes, _ = network(tmp_path / "sync", {"rounds": rounds})
    run_all(nodes)
    for i in nodes:
        records = round_records(tmp_path / "sync", i)
        assert [r["mixed_round"] for r in records] == list(range(1, rounds + 1))


def test_overlap_hides_the_links_latency(tmp_path: Path) -> None:
    """Links of 0.3 s, rounds of 0.6 s of training: the synchronous loop waits at least the latency
    every round; the overlapped one finds the previous round's exchange done when its training ends."""
    waits = {}
    for overlap in (False, True):
        folder = tmp_path / str(overlap)
        nodes, _ = network(folder, {"rounds": 5, "overlap": overlap}, delay_s=0.3, step_s=0.3)
        run_all(nodes, timeout_s=120)
        middle = [r["wait_s"] for i in nodes for r in round_records(folder, i) if 1 < r["round"] < 5]
        waits[overlap] = sum(middle) / len(middle)
    assert waits[False] >= 0.3, waits  # a message cannot arrive before its link's delay
    assert waits[True] < 0.5 * waits[False], waits


def test_a_stopped_overlapped_node_abandons_its_exchange_and_keeps_its_checkpoint(tmp_path: Path) -> None:
    """Stop after round 2: the node does not wait out round 2's exchange, and says it stopped."""
    nodes, learners = network(tmp_path, {"rounds": 20, "overlap": True, "round_timeout_s": 30.0})
    node = nodes[0]
    others = [nodes[i] for i in nodes if i != 0]

    def stop_later() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(learners[0].seen) < 3:  # round 0, 1, 2 evaluated
            time.sleep(0.01)
        for n in nodes.values():
            n.stop.set()

    stopper = threading.Thread(target=stop_later)
    stopper.start()
    started = time.monotonic()
    results = run_all({0: node, **dict(enumerate(others, start=1))})
    stopper.join(timeout=30)
    assert time.monotonic() - started < 20  # nobody waited out a 30 s deadline
    assert results[0].stopped and results[0].rounds_completed < 20
    done = [r for r in read_metrics(tmp_path / "n0" / "out" / "metrics.jsonl") if r["event"] == "done"]
    assert done and done[-1]["stopped"] is True
    assert not any(t.name.endswith("-exchange") and t.is_alive() for t in threading.enumerate())
