"""A node's configuration: one TOML file, validated into frozen schema types.

Layout (docs/node.md has the full reference)::

    [node]       key, listen, network, out, name, roster
    [[peers]]    id, address, name          (or a [topology] section instead)
    [topology]   spec, self, members = { name = { id, address } }
    [model] [lora] [data] [train] [gossip] [faults] [transport]

The whole file is decoded in one pass against :class:`NodeDocument`
(p2pfm.config.schema). Relative paths are resolved against the config
file's folder before that, so a config and its key can travel together.
Every mistake raises a ConfigError naming the field, e.g.
``config field 'train.lr': must be > 0, got 0.0``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from p2pfm.config.roster import Roster, load_roster
from p2pfm.config.schema import check_address, decode
from p2pfm.config.settings import (
    BBC_NEWS,
    MINILM,
    SMOLLM2,
    DataConfig,
    DataSection,
    FaultSettings,
    GossipSettings,
    LoraSettings,
    MembershipSettings,
    ModelSettings,
    NodeSection,
    Peer,
    ShardSettings,
    TopologySection,
    TrainSettings,
    TransportSettings,
)
from p2pfm.config.toml import read_toml
from p2pfm.core.errors import ConfigError, TopologyError
from p2pfm.core.schedule import PeerSchedule
from p2pfm.core.topology import parse_topology


class NodeDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A node config file as written: every section, checked; neighbours not yet derived."""

    node: NodeSection
    peers: tuple[Peer, ...] | None = None
    topology: TopologySection | None = None
    model: ModelSettings
    lora: LoraSettings = msgspec.field(default_factory=LoraSettings)
    data: DataSection = msgspec.field(default_factory=DataSection)
    train: TrainSettings = msgspec.field(default_factory=TrainSettings)
    gossip: GossipSettings = msgspec.field(default_factory=GossipSettings)
    faults: FaultSettings = msgspec.field(default_factory=FaultSettings)
    transport: TransportSettings = msgspec.field(default_factory=TransportSettings)
    membership: MembershipSettings | None = None

    def __post_init__(self) -> None:
        if self.peers is not None and self.topology is not None:
            raise ConfigError("peers", "give [[peers]] entries or a [topology] section, not both")
        if self.peers is None and self.topology is None and self.membership is None:
            raise ConfigError(
                "peers",
                "give [[peers]] entries, a [topology] section, or a [membership] section (an open network)",
            )
        if self.data.task != self.model.task:
            raise ConfigError("data.task", f"must match model.task ({self.model.task!r})")


@dataclass(frozen=True)
class NodeConfig:
    """What a node runs with: the checked sections, its neighbours, and the roster it admits."""

    node: NodeSection
    peers: tuple[Peer, ...]  # the neighbours, each with a name
    model: ModelSettings
    lora: LoraSettings
    data: DataConfig
    shard: ShardSettings
    train: TrainSettings
    gossip: GossipSettings
    faults: FaultSettings
    transport: TransportSettings
    path: Path  # the config file itself
    roster: Roster | None = None
    partners: PeerSchedule | None = None  # a time-varying topology: this node's partner(s) per round
    membership: MembershipSettings | None = None  # an open network: the neighbours come from membership

    @property
    def checkpoint_dir(self) -> Path:
        return self.node.out / "checkpoint"


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate a node config file."""
    return node_config_from_dict(read_toml(path, "config"), path)


def node_config_from_dict(doc: Mapping[str, Any], path: Path) -> NodeConfig:
    """Validate a parsed config file (``path`` locates it: relative paths are resolved against its folder)."""
    checked = decode(NodeDocument, _with_defaults(_resolved(doc, path.parent)), "")
    peers, partners = (checked.peers, None) if checked.topology is None else _topology_peers(checked.topology)
    peers = tuple(Peer(p.id, p.address, p.name or p.id.short) for p in peers or ())
    ids = [p.id for p in peers]
    if len(set(ids)) != len(ids):
        raise ConfigError("peers", "the same peer id is listed twice")
    node = checked.node
    roster = None if node.roster is None else load_roster(node.roster)
    if roster is not None:
        if roster.network != node.network:
            raise ConfigError("node.network", f"is {node.network!r} but the roster is for {roster.network!r}")
        for i, peer in enumerate(peers):
            if peer.id not in roster.ids:
                raise ConfigError(
                    f"peers[{i}].id", f"{peer.name} ({peer.id.short}) is not a member of the roster"
                )
    if checked.membership is not None and checked.membership.roster is None and node.roster is None:
        raise ConfigError(
            "membership.roster",
            "an open network needs a roster: a signed one (p2pfm roster sign) or node.roster",
        )
    data = checked.data
    return NodeConfig(
        node=node,
        peers=peers,
        model=checked.model,
        lora=checked.lora,
        data=data,
        shard=ShardSettings(data.shard, data.shards),
        train=checked.train,
        gossip=checked.gossip,
        faults=checked.faults,
        transport=checked.transport,
        path=path,
        roster=roster,
        partners=partners,
        membership=checked.membership,
    )


def with_bootstrap(config: NodeConfig, addresses: Sequence[str]) -> NodeConfig:
    """``config`` with more bootstrap addresses (``p2pfm node --bootstrap``), each checked."""
    if not addresses:
        return config
    if config.membership is None:
        raise ConfigError("--bootstrap", "joins an open network: the config needs a [membership] section")
    checked = tuple(check_address("--bootstrap", address) for address in addresses)
    membership = msgspec.structs.replace(
        config.membership, bootstrap=(*config.membership.bootstrap, *checked)
    )
    return dataclasses.replace(config, membership=membership)


# (section, key, aliases): a relative path there is relative to the config file; an alias is not a path.
_PATHS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("node", "key", ()),
    ("node", "out", ()),
    ("node", "roster", ()),
    ("model", "path", (MINILM, SMOLLM2)),
    ("data", "source", (BBC_NEWS,)),
    ("topology", "spec", ()),
    ("membership", "roster", ()),
)


def _resolved(doc: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The document with relative path strings made absolute (anything else is left to the schema)."""
    out = dict(doc)
    for section, key, aliases in _PATHS:
        table = out.get(section)
        if not isinstance(table, Mapping) or not isinstance(table.get(key), str):
            continue
        value: str = table[key]
        if (
            not value
            or value in aliases
            or Path(value).is_absolute()
            or (section == "topology" and ":" in value)
        ):
            continue  # empty: refused by the schema; "ring:8": a generated topology, not a file
        out[section] = {**table, key: str((base / value).resolve())}
    return out


def _with_defaults(doc: dict[str, Any]) -> dict[str, Any]:
    """``data.task`` defaults to ``model.task`` (the one setting whose default is another one)."""
    model, data = doc.get("model"), doc.get("data", {})
    if isinstance(model, Mapping) and "task" in model and isinstance(data, Mapping) and "task" not in data:
        return {**doc, "data": {**data, "task": model["task"]}}
    return doc


def _topology_peers(section: TopologySection) -> tuple[tuple[Peer, ...], PeerSchedule | None]:
    """This node's neighbours in the topology, named by it, from the members' address book.

    For a time-varying topology the neighbours are every round's partners,
    and the schedule says which of them each round mixes with.
    """
    try:
        topology = parse_topology(section.spec)
        index = topology.index_of(section.me)
    except TopologyError as exc:
        raise ConfigError("topology", str(exc)) from None
    peers = []
    for j in topology.neighbours(index):
        name = topology.names[j]
        if name not in section.members:
            raise ConfigError("topology.members", f"neighbour {name!r} of {section.me!r} has no entry")
        member = section.members[name]
        peers.append(Peer(member.id, member.address, name))
    if topology.schedule is None:
        return tuple(peers), None
    ids = {j: peer.id for j, peer in zip(topology.neighbours(index), peers, strict=True)}
    return tuple(peers), PeerSchedule(topology.schedule, index, ids)


__all__ = [
    "DataConfig",
    "FaultSettings",
    "GossipSettings",
    "LoraSettings",
    "MembershipSettings",
    "ModelSettings",
    "NodeConfig",
    "NodeDocument",
    "NodeSection",
    "Peer",
    "ShardSettings",
    "TrainSettings",
    "TransportSettings",
    "load_node_config",
    "node_config_from_dict",
    "with_bootstrap",
]
