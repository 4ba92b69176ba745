"""Real node loops on virtual time: crashes, stragglers and attackers play out as on a network."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from p2pfm.core.consensus import consensus_distance
from p2pfm.core.evidence import evidence_file_name
from p2pfm.core.topology import parse_topology
from p2pfm.lab.scenario import Attack, Crash, Faults, Slow
from p2pfm.lab.sim import SimConfig, build_part, node_name, sim_identity, simulate
from p2pfm.lab.virtual import RoundTally, VirtualScheduler
from p2pfm.node.store import MemoryStore

TIMEOUT_S = 30.0  # SimConfig's default round_timeout_s
STEP_S, LATENCY_S = 0.5, 0.25  # SimConfig's defaults: a pure-gossip round trains one step's time


def _run(config: SimConfig) -> VirtualScheduler:
    topology = parse_topology(config.topology)
    scheduler = build_part(config, topology, list(range(topology.n_nodes)))
    scheduler.run_until()
    return scheduler


def _records(scheduler: VirtualScheduler, index: int, event: str = "round") -> list[dict[str, Any]]:
    store = scheduler.slots[index].node.store
    assert isinstance(store, MemoryStore)
    return [r for r in store.records if r["event"] == event]


# ------------------------------------------------------------- RoundTally


def _tally(states: list[np.ndarray[Any, Any]]) -> RoundTally:
    tally = RoundTally()
    for state in states:
        tally.add(state)
    return tally


@pytest.mark.parametrize("split", [0, 1, 3, 7])
def test_merged_tallies_equal_one_tally_of_every_state(split: int) -> None:
    states = list(np.random.default_rng(4).standard_normal((7, 50)) * 3 + 1)
    whole = _tally(states)
    merged = _tally(states[:split])
    merged.merge(_tally(states[split:]))
    assert merged.nodes == whole.nodes == 7 and merged.mean is not None and whole.mean is not None
    np.testing.assert_allclose(merged.mean, np.mean(states, axis=0), rtol=1e-12)
    assert merged.m2 == pytest.approx(whole.m2, rel=1e-12)
    assert merged.sum_sq == pytest.approx(sum(float(s @ s) for s in states), rel=1e-12)
    expected = consensus_distance([{"x": s} for s in states])
    assert merged.consensus_distance == pytest.approx(expected, rel=1e-12)
    assert whole.consensus_distance == pytest.approx(expected, rel=1e-12)


def test_traffic_counts_add_up_when_tallies_merge() -> None:
    first = RoundTally(messages=3, bytes=300, delivered=2)
    first.merge(RoundTally(messages=4, bytes=410, delivered=4))
    assert (first.messages, first.bytes, first.delivered, first.nodes) == (7, 710, 6, 0)
    assert first.consensus_distance == 0.0  # no state yet: not a division by zero


def test_the_tally_stays_exact_when_the_nodes_nearly_agree() -> None:
    """At consensus the spread is ~1e-20 of the states' size: a one-pass sum of squares would be noise."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal(200) * 100
    states = [base + 1e-8 * rng.standard_normal(200) for _ in range(6)]
    tally = _tally(states[:2])
    tally.merge(_tally(states[2:]))
    expected = consensus_distance([{"x": s} for s in states])
    assert 1e-22 < expected < 1e-18
    assert tally.consensus_distance == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------- faults


def test_a_crashed_node_resumes_from_its_store_and_catches_up() -> None:
    crash = Crash(node=1, round=2, restart_after_s=5.0)
    scheduler = _run(SimConfig("ring:4", rounds=6, dim=8, faults=Faults(crash=(crash,))))
    results = {o.index: o for o in scheduler.outcomes()}
    assert sorted(results) == [0, 1, 2, 3]
    assert all(results[i].result.rounds_completed == 6 for i in results)
    assert [results[i].result.rounds_trained for i in (0, 2, 3)] == [6, 6, 6]
    assert results[1].crashes == 1 and results[1].result.rounds_trained == 5  # round 3 skipped
    store = scheduler.slots[1].node.store
    assert isinstance(store, MemoryStore)
    events = [(r["event"], r.get("round", r.get("to_round"))) for r in store.records]
    assert events == [
        ("start", None), ("round", 1), ("round", 2),
        ("resume", 2), ("caught_up", 4), ("round", 4), ("round", 5), ("round", 6), ("done", None),
    ]  # fmt: skip
    # Its neighbours waited out round 3 without it, then heard it again: its
    # messages after the restart continue its sequence numbers (a restart from
    # scratch would be refused as replays).
    for neighbour in (0, 2):
        rounds = {r["round"]: r for r in _records(scheduler, neighbour)}
        assert rounds[3]["timed_out"] and rounds[3]["missing"] == ["node1"]
        assert rounds[3]["wait_s"] == pytest.approx(TIMEOUT_S)
        assert "node1" in rounds[6]["heard"]
        assert not {"replay", "equivocation"} & set(results[neighbour].rejected)
    assert [scheduler.tallies[r].nodes for r in range(7)] == [4, 4, 4, 3, 4, 4, 4]


def test_a_node_that_never_restarts_ends_where_it_crashed() -> None:
    config = SimConfig("ring:4", rounds=4, dim=8, faults=Faults(crash=(Crash(node=2, round=1),)))
    topology = parse_topology(config.topology)
    scheduler = build_part(config, topology, list(range(4)))
    scheduler.slots[2].restart_after_s = None  # a crash for good (the API allows it; the scenario does not)
    scheduler.run_until()
    results = {o.index: o.result for o in scheduler.outcomes()}
    assert (results[2].rounds_completed, results[2].rounds_trained, results[2].stopped) == (1, 1, True)
    assert all(results[i].rounds_completed == 4 for i in (0, 1, 3))
    assert [r["missing"] for r in _records(scheduler, 1)][1:] == [["node2"]] * 3


def test_a_slow_node_makes_its_neighbours_wait_and_the_run_finish_later() -> None:
    clean = _run(SimConfig("ring:4", rounds=3, dim=8))
    slow = _run(SimConfig("ring:4", rounds=3, dim=8, faults=Faults(slow=(Slow(node=2, factor=3.0),))))
    assert [r["train_s"] for r in _records(slow, 2)] == pytest.approx([3 * STEP_S] * 3)
    for neighbour in (1, 3):
        records = _records(slow, neighbour)
        # Round 1: the neighbour trained STEP_S and waits for node 2's update, (3 - 1) STEP_S
        # later, plus the link.
        assert records[0]["wait_s"] == pytest.approx(2 * STEP_S + LATENCY_S)
        assert not any(r["timed_out"] for r in records)
    assert [r["wait_s"] for r in _records(clean, 1)] == pytest.approx([LATENCY_S] * 3)
    assert clean.clock.now_s() == pytest.approx(3 * (STEP_S + LATENCY_S))
    assert slow.clock.now_s() == pytest.approx(3 * (3 * STEP_S) + LATENCY_S)


def test_a_node_slower_than_the_deadline_is_not_waited_for() -> None:
    faults = Faults(slow=(Slow(node=2, factor=5.0),))
    scheduler = _run(SimConfig("ring:4", rounds=3, dim=8, round_timeout_s=1.0, faults=faults))
    for neighbour in (1, 3):
        first = _records(scheduler, neighbour)[0]
        assert first["timed_out"] and first["missing"] == ["node2"]
        assert first["wait_s"] == pytest.approx(1.0)  # the deadline, not node 2's 2.5 s of training
    assert all(r["train_s"] == pytest.approx(5 * STEP_S) for r in _records(scheduler, 2))
    assert all(o.result.rounds_completed == 3 for o in scheduler.outcomes())


def test_a_scaling_attacker_shows_in_the_result_and_a_robust_rule_contains_it() -> None:
    base = SimConfig("ring:8", rounds=6, dim=16, local_steps=2, byzantine_weight=0.34)
    attack = Faults(attack=(Attack(node=3, kind="scale"),))
    runs = {
        (rule, attacked): simulate(
            dataclasses.replace(base, rule=rule, faults=attack if attacked else Faults())
        )
        for rule in ("mean", "clip")
        for attacked in (False, True)
    }
    attacked = runs[("mean", True)]
    assert [n.attack for n in attacked.node_results] == ["", "", "", "scale", "", "", "", ""]
    assert attacked.rejected == 0  # validly signed: only the mixing rule can tell

    def worst(rule: str, attacked: bool) -> float:
        return max(n.distance for n in runs[(rule, attacked)].node_results if not n.attack)

    assert worst("mean", True) > 10 * worst("mean", False)
    assert worst("clip", True) < 2 * worst("clip", False)


def test_an_equivocating_attacker_is_banned_by_its_neighbours() -> None:
    faults = Faults(attack=(Attack(node=2, kind="equivocate"),))
    scheduler = _run(SimConfig("ring:6", rounds=4, dim=8, faults=faults))
    banned = {node_name(o.index): o.banned for o in scheduler.outcomes()}
    assert banned == {
        "node0": [],
        "node1": ["node2"],
        "node2": [],
        "node3": ["node2"],
        "node4": [],
        "node5": [],
    }
    accused = sim_identity(0, 2).peer_id.hex
    for neighbour in (1, 3):
        store = scheduler.slots[neighbour].node.store
        assert isinstance(store, MemoryStore)
        assert list(store.evidence) == [evidence_file_name(accused, 1)]


def test_a_run_is_reproducible() -> None:
    faults = Faults(
        attack=(Attack(node=0, kind="noise"),),
        crash=(Crash(node=3, round=1, restart_after_s=2.0),),
        slow=(Slow(node=5, factor=2.0),),
    )
    config = SimConfig("exp:8", rounds=5, dim=8, drop_prob=0.2, noise=0.1, local_steps=1, faults=faults)
    assert simulate(config).as_json() == simulate(config).as_json()
