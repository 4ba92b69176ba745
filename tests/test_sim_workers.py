"""The simulator over worker processes: lock-stepped windows give the single-process run, faults included.

The workers are forked (milliseconds each, no torch): these tests are fast.
"""

from __future__ import annotations

import dataclasses
import multiprocessing

import pytest

from p2pfm.core.errors import LocalProtocolError
from p2pfm.lab import sim
from p2pfm.lab.scenario import Attack, Crash, Drop, Faults, Slow
from p2pfm.lab.sim import SimConfig, SimResult, partition, simulate

FAULTS = Faults(
    attack=(Attack(node=3, kind="scale"),),
    crash=(Crash(node=5, round=2, restart_after_s=3.0),),  # some of its neighbours are in another part
    slow=(Slow(node=1, factor=2.0),),
    drop=(Drop(prob=0.3, link=(0, 6)),),  # an edge between two parts of exp:8 and of torus:3x3
)

pytestmark = pytest.mark.slow  # forks worker processes


def _assert_same_run(one: SimResult, many: SimResult) -> None:
    assert len(one.rounds) == len(many.rounds)
    for a, b in zip(one.rounds, many.rounds, strict=True):
        # The parts' tallies merge in another order: equal up to float rounding.
        assert b.consensus_distance == pytest.approx(a.consensus_distance, rel=1e-12, abs=0.0)
        assert (a.messages, a.bytes, a.delivered, a.nodes) == (b.messages, b.bytes, b.delivered, b.nodes)
    assert one.node_results == many.node_results
    assert one.rejected == many.rejected


@pytest.mark.parametrize(
    ("spec", "faults", "workers"),
    [("ring:8", Faults(), 2), ("exp:8", FAULTS, 2), ("torus:3x3", FAULTS, 3)],
    ids=["ring-clean", "exp-faults", "torus-3-parts"],
)
def test_workers_reproduce_the_single_process_run(spec: str, faults: Faults, workers: int) -> None:
    config = SimConfig(spec, rounds=6, dim=16, seed=2, drop_prob=0.1, rule="clip", faults=faults, workers=1)
    one = simulate(config)
    many = simulate(dataclasses.replace(config, workers=workers))
    assert (one.workers, many.workers) == (1, workers)
    assert sum(n.crashes for n in many.node_results) == (1 if faults.crash else 0)
    _assert_same_run(one, many)
    assert multiprocessing.active_children() == []  # every worker was joined


def test_workers_are_capped_at_one_per_node() -> None:
    result = simulate(SimConfig("ring:3", rounds=2, dim=4, workers=8))
    assert result.workers == 3 and len(result.node_results) == 3
    assert [r.nodes for r in result.rounds] == [3, 3, 3]


def test_small_runs_stay_in_one_process_by_default() -> None:
    assert simulate(SimConfig("ring:8", rounds=1, dim=8)).workers == 1


@pytest.mark.parametrize(("n", "parts"), [(8, 2), (9, 4), (5, 5), (64, 3)])
def test_parts_are_contiguous_and_even(n: int, parts: int) -> None:
    blocks = partition(n, parts)
    assert len(blocks) == parts and [i for block in blocks for i in block] == list(range(n))
    sizes = [len(block) for block in blocks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_a_failing_worker_is_an_error_naming_its_cause_and_no_worker_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("part could not be built")

    monkeypatch.setattr(sim, "build_part", broken)  # the forked workers inherit it
    with pytest.raises(LocalProtocolError, match="a simulator worker failed") as info:
        simulate(SimConfig("ring:4", rounds=2, dim=4, workers=2))
    assert "RuntimeError: part could not be built" in str(info.value)  # the worker's traceback
    assert multiprocessing.active_children() == []


def test_a_quick_restart_reads_the_same_with_workers() -> None:
    # node4's neighbour node3 is in the other part; node4 is back 0.6 s after
    # crashing, before node3's round-3 update (sent while it was down) arrives.
    crash = Crash(node=4, round=2, restart_after_s=0.6)
    config = SimConfig("ring:8", rounds=5, dim=8, faults=Faults(crash=(crash,)), workers=1)
    _assert_same_run(simulate(config), simulate(dataclasses.replace(config, workers=2)))
