"""Node config files: what an operator writes, and the errors they get back."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import msgspec
import pytest
import tomli_w

from p2pfm.config.node_config import DataConfig, NodeDocument, Peer, load_node_config
from p2pfm.config.schema import decode
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import Identity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PEER = Identity(b"\7" * 32).peer_id.hex
ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, doc: dict[str, object]) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def _base() -> dict[str, object]:
    return {
        "node": {"key": "node.key", "listen": "tcp://127.0.0.1:5550", "network": "net", "out": "out"},
        "peers": [{"id": PEER, "address": "tcp://127.0.0.1:5551", "name": "b"}],
        "model": {"path": "minilm", "task": "classification", "num_labels": 5},
        "train": {"local_steps": 4, "lr": 0.001},
        "gossip": {"rounds": 3},
    }


def test_valid_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_node_config(_write(tmp_path, _base()))
    assert config.node.key == (tmp_path / "node.key").resolve()
    assert config.node.out == (tmp_path / "out").resolve()
    assert config.peers[0].name == "b" and config.peers[0].id.hex == PEER
    assert config.train.local_steps == 4 and config.gossip.rounds == 3
    assert config.data.task == "classification" and config.shard.shards == 1


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["train"].update(lr="fast"), "train.lr"),
        (lambda d: d["train"].update(lrr=0.1), "train.lrr"),
        (lambda d: d["gossip"].update(rounds=0), "gossip.rounds"),
        (lambda d: d["node"].update(listen="localhost"), "node.listen"),
        (lambda d: d["node"].pop("network"), "node.network"),
        (lambda d: d.update(extra={}), "extra"),
        (lambda d: d["peers"][0].update(id="abc"), "peers[0].id"),
        (lambda d: d["peers"][0].pop("address"), "peers[0].address"),
        (lambda d: d.pop("peers"), "peers"),
        (lambda d: d.update(data={"shard": 3, "shards": 2}), "data.shard"),
        (lambda d: d.update(data={"task": "causal-lm"}), "data.task"),
        (lambda d: d.update(faults={"slow_factor": 0.5}), "faults.slow_factor"),
        (lambda d: d.update(gossip={"wire_dtype": "int8"}), "gossip.wire_dtype"),
        (lambda d: d.update(gossip={"mix": "yes"}), "gossip.mix"),
        (lambda d: d.update(gossip={"rule": "krum"}), "gossip.rule"),
        (lambda d: d.update(gossip={"byzantine_weight": 1.0}), "gossip.byzantine_weight"),
        (lambda d: d.update(transport={"insecure": "no"}), "transport.insecure"),
        (lambda d: d["node"].update(roster="missing.toml"), "roster"),
    ],
)
def test_each_mistake_names_its_field(tmp_path: Path, mutate: object, field: str) -> None:
    doc = _base()
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:
        load_node_config(_write(tmp_path, doc))
    assert info.value.field == field, str(info.value)
    assert "\n" not in str(info.value)


def test_topology_section_picks_neighbours(tmp_path: Path) -> None:
    ids = {str(i): Identity(bytes([i + 1]) * 32).peer_id.hex for i in range(4)}
    doc = _base()
    doc.pop("peers")
    doc["topology"] = {
        "spec": "ring:4",
        "self": "0",
        "members": {n: {"id": ids[n], "address": f"tcp://127.0.0.1:{6000 + int(n)}"} for n in ids},
    }
    config = load_node_config(_write(tmp_path, doc))
    assert sorted(p.name for p in config.peers) == ["1", "3"]
    doc["topology"]["members"].pop("3")  # type: ignore[index, union-attr]
    with pytest.raises(ConfigError, match="neighbour '3'"):
        load_node_config(_write(tmp_path, doc))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_node_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nkey = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_node_config(bad)


def test_the_documented_config_is_valid() -> None:
    """docs/node.md's example file: every section decodes as written (its peer id is elided)."""
    text = (ROOT / "docs" / "node.md").read_text()
    example = tomllib.loads(text.split("## Config file", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0])
    sections = {f.name: f.type for f in msgspec.structs.fields(NodeDocument)}
    assert set(example) <= set(sections)
    for name, table in example.items():
        if name == "peers":
            assert all(set(peer) <= {f.name for f in msgspec.structs.fields(Peer)} for peer in table)
        else:
            decode(sections[name], table, name)


def test_the_data_reference_lists_every_data_field() -> None:
    text = (ROOT / "docs" / "data.md").read_text()
    documented = set(re.findall(r"^\| `data\.(\w+)` \|", text, flags=re.M))
    assert documented == {f.name for f in msgspec.structs.fields(DataConfig)}
