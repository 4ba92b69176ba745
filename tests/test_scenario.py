"""Scenario files: parsing, validation and generated node configs (no processes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from p2pfm.config.node_config import load_node_config
from p2pfm.core.errors import ConfigError
from p2pfm.lab.scenario import (
    QUICKSTART,
    Attack,
    Crash,
    Drop,
    Faults,
    Slow,
    describe_faults,
    load_scenario,
    report_setup,
    run_scenario,
    write_baseline_configs,
    write_node_configs,
)
from p2pfm.learn.algorithm import ALGORITHMS
from p2pfm.learn.data import node_shards

BASE = """
name = "t"
topology = "ring:4"
[model]
path = "minilm"
num_labels = 5
"""


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("bogus = 1", "bogus"),
        ('baselines = ["central"]', "scenario.baselines[0]"),
        ("[[faults.crash]]\nnode = 9\nround = 1", "faults.crash.node"),
        ("[[faults.drop]]\nprob = 0.5\nlink = [0, 2]", "faults.drop.link"),
        ("[[faults.drop]]\nprob = 1.5", "faults.drop[0].prob"),
        ("[[faults.slow]]\nnode = 1", "faults.slow[0].factor"),
        ("[data]\nshard = 1", "data.shard"),
    ],
)
def test_bad_scenarios_name_the_field(tmp_path: Path, extra: str, field: str) -> None:
    path = tmp_path / "s.toml"
    # Tables go at the end; top-level keys right after the name.
    top_level = BASE.replace('name = "t"', f'name = "t"\n{extra}')
    path.write_text(BASE + extra if extra.startswith("[") else top_level)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert info.value.field == field, str(info.value)


def test_generated_configs_wire_the_topology_and_faults(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        BASE.replace('name = "t"', 'name = "t"\nbaselines = ["local", "pooled"]')
        + "[[faults.drop]]\nprob = 0.25\nlink = [0, 1]\n[[faults.slow]]\nnode = 2\nfactor = 3.0\n"
    )
    scenario = load_scenario(path)
    procs = write_node_configs(scenario, tmp_path / "out")
    configs = [load_node_config(p.config) for p in procs]
    assert [sorted(peer.name for peer in c.peers) for c in configs] == [
        ["node1", "node3"], ["node0", "node2"], ["node1", "node3"], ["node0", "node2"],
    ]  # fmt: skip
    listens = {c.node.listen for c in configs}
    assert len(listens) == 4 and all(a.startswith("tcp://127.0.0.1:") for a in listens)
    for c in configs:  # every peer address is that peer's own listen address
        for peer in c.peers:
            assert peer.address == configs[int(peer.name[4:])].node.listen
    assert configs[0].faults.drop == {"node1": 0.25} and configs[1].faults.drop == {"node0": 0.25}
    assert configs[3].faults.drop == {} and configs[2].faults.slow_factor == 3.0
    assert [c.shard.shard for c in configs] == [0, 1, 2, 3] and configs[0].shard.shards == 4
    assert configs[0].node.key.stat().st_mode & 0o077 == 0
    assert configs[0].roster is not None and len(configs[0].roster.members) == 4
    baselines = write_baseline_configs(scenario, tmp_path / "out", procs)
    assert [b.name for b in baselines] == [f"local-node{i}" for i in range(4)] + ["pooled-pooled"]
    pooled = load_node_config(baselines[-1].config)
    assert (
        not pooled.gossip.mix
        and pooled.shard.shards == 1
        and pooled.gossip.eval_every == pooled.gossip.rounds
    )


def _with_baselines(tmp_path: Path, baselines: str, tables: str) -> tuple[Any, list[Any], list[Any]]:
    """BASE with ``baselines`` and TOML ``tables``: the scenario, its node and its baseline processes."""
    path = tmp_path / "s.toml"
    path.write_text(BASE.replace('name = "t"', f'name = "t"\nbaselines = {baselines}') + tables)
    scenario = load_scenario(path)
    procs = write_node_configs(scenario, tmp_path / "out")
    return scenario, procs, write_baseline_configs(scenario, tmp_path / "out", procs)


def test_pooled_keeps_adamw_when_the_nodes_train_with_sgd(tmp_path: Path) -> None:
    """fedadam's nodes step with plain SGD; the pooled reference keeps AdamW (the stronger one)."""
    scenario, _, baselines = _with_baselines(
        tmp_path,
        '["local", "pooled"]',
        '[train]\noptimizer = "sgd"\nlr = 0.5\nlogit_adjustment = 1.0\n'
        '[gossip]\nrounds = 3\nalgorithm = "fedadam"\nouter_lr = 0.01\nconsensus_rounds = 2\n',
    )
    local = load_node_config(baselines[0].config)
    pooled = load_node_config(baselines[-1].config)
    # local-only is the same node without mixing: its optimizer and algorithm are the nodes'
    assert (local.train.optimizer, local.train.lr, local.gossip.algorithm) == ("sgd", 0.5, "fedadam")
    assert (pooled.train.optimizer, pooled.train.lr, pooled.gossip.algorithm) == ("adamw", 2e-3, "dpsgd")
    assert pooled.train.logit_adjustment == 1.0 and pooled.gossip.consensus_rounds == 2
    facts = report_setup(scenario).algorithm
    assert facts["algorithm"] == "fedadam" and facts["outer_lr"] == 0.01 and facts["consensus_rounds"] == 2


def test_pooled_holds_every_nodes_topics_under_a_labels_partition(tmp_path: Path) -> None:
    _, procs, (pooled,) = _with_baselines(
        tmp_path,
        '["pooled"]',
        '[data]\npartition = "labels"\n'
        'labels = [["business"], ["sports", "tech"], ["politics", "business"], ["entertainment"]]\n',
    )
    config = load_node_config(pooled.config)
    assert config.data.labels == (("business", "sports", "tech", "politics", "entertainment"),)
    _, (shard,) = node_shards(config.data, 1)
    _, shards = node_shards(load_node_config(procs[0].config).data, 4)
    assert len(shard) == sum(len(s) for s in shards)  # the union of the nodes' shards


def test_quickstart_is_valid() -> None:
    scenario = load_scenario(QUICKSTART)
    assert scenario.topology.n_nodes == 4 and scenario.header.baselines == ("local", "pooled")


def test_ready_scenarios_are_valid() -> None:
    for path in sorted(QUICKSTART.parent.glob("*.toml")):
        scenario = load_scenario(path)
        assert scenario.topology.n_nodes >= 2, path


def test_ready_scenarios_split_their_data(tmp_path: Path) -> None:
    """Every ready scenario's data settings resolve (a misspelt topic in data.labels fails here, not
    minutes into a run when every node stops on it)."""
    for path in sorted(QUICKSTART.parent.glob("*.toml")):
        scenario = load_scenario(path)
        if scenario.header.topology.startswith("open:"):
            continue  # its nodes' configs need the open-network wiring; the data section is the same
        procs = write_node_configs(scenario, tmp_path / path.stem)
        config = load_node_config(procs[0].config)
        test, shards = node_shards(config.data, config.shard.shards)
        assert len(shards) == scenario.topology.n_nodes and all(len(s) > 0 for s in shards), path
        assert len(test) > 0, path
        assert report_setup(scenario).algorithm["algorithm"] in ALGORITHMS, path


def test_faults_are_described_one_sentence_each_for_the_report() -> None:
    faults = Faults(
        attack=(Attack(node=3, kind="scale", factor=10.0), Attack(node=0, kind="replay")),
        crash=(Crash(node=1, round=2, restart_after_s=2.5),),
        slow=(Slow(node=2, factor=3.0),),
        drop=(Drop(prob=0.1, link=(0, 1)), Drop(prob=0.05)),
    )
    assert describe_faults(faults) == (
        "crash node1 after round 2, restart after 2.5 s",
        "node2 trains 3x slower",
        "drop p=0.1 on [0, 1]",
        "drop p=0.05 on every link",
        "node3 attacks: scale x10",
        "node0 attacks: replay",
    )
    assert describe_faults(Faults()) == ()


def test_the_report_setup_says_what_ran(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        BASE.replace('name = "t"', 'name = "t"\nbaselines = ["pooled"]')
        + 'task = "causal-lm"\n[[faults.slow]]\nnode = 2\nfactor = 3.0\n'
    )
    setup = report_setup(load_scenario(path))
    assert (setup.scenario, setup.topology, setup.model, setup.task) == ("t", "ring:4", "minilm", "causal-lm")
    assert setup.baselines == ("pooled",) and setup.faults == ("node2 trains 3x slower",)
    assert report_setup(load_scenario(QUICKSTART)).task == "classification"  # the node's default


def test_an_unknown_task_fails_before_any_node_starts(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(BASE + 'task = "regression"\n')
    with pytest.raises(ConfigError) as info:
        run_scenario(path, tmp_path / "out")
    assert info.value.field == "model.task" and "causal-lm" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_time_varying_topology_reaches_the_nodes_as_a_topology_section(tmp_path: Path) -> None:
    """With [[peers]] a node could not know each round's partner: it gets the spec and the members."""
    path = tmp_path / "s.toml"
    path.write_text(
        BASE.replace('topology = "ring:4"', 'topology = "one-peer-exp:4"')
        + "[[faults.drop]]\nprob = 0.25\nlink = [0, 1]\n"
    )
    procs = write_node_configs(load_scenario(path), tmp_path / "out")
    configs = [load_node_config(p.config) for p in procs]
    assert [sorted(peer.name for peer in c.peers) for c in configs] == [
        ["1", "2"],
        ["0", "3"],
        ["0", "3"],
        ["1", "2"],
    ]
    partners = configs[0].partners
    assert partners is not None
    ids = {peer.name: peer.id for peer in configs[0].peers}
    assert [partners(r) for r in (1, 2)] == [(ids["1"],), (ids["2"],)]
    assert configs[0].faults.drop == {"1": 0.25}  # the drop fault follows the members' names
