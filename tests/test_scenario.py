"""Scenario files: parsing, validation and generated node configs (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfm.config.node_config import load_node_config
from p2pfm.core.errors import ConfigError
from p2pfm.lab.scenario import QUICKSTART, load_scenario, write_baseline_configs, write_node_configs

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
        ('baselines = ["central"]', "scenario.baselines"),
        ("[[faults.crash]]\nnode = 9\nround = 1", "faults.crash.node"),
        ("[[faults.drop]]\nprob = 0.5\nlink = [0, 2]", "faults.drop.link"),
        ("[[faults.drop]]\nprob = 1.5", "faults.drop.prob"),
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


def test_quickstart_is_valid() -> None:
    scenario = load_scenario(QUICKSTART)
    assert scenario.topology.n_nodes == 4 and scenario.header.baselines == ("local", "pooled")


def test_ready_scenarios_are_valid() -> None:
    for path in sorted(QUICKSTART.parent.glob("*.toml")):
        scenario = load_scenario(path)
        assert scenario.topology.n_nodes >= 2, path
