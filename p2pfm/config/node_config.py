"""A node's configuration: one TOML file, validated into frozen dataclasses.

Layout (docs/node.md has the full reference)::

    [node]       key, listen, network, out, name
    [[peers]]    id, address, name          (or a [topology] section instead)
    [topology]   spec, self, members = { name = { id, address } }
    [model] [lora] [data] [train] [gossip] [faults] [transport]

Relative paths are resolved against the config file's folder, so a config
and its key can travel together. Every mistake raises a ConfigError naming
the field, e.g. ``config field 'train.lr': must be > 0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from p2pfm.config.roster import Roster, load_roster
from p2pfm.config.toml import build, coerce, read_toml
from p2pfm.core.consensus import MixRule
from p2pfm.core.errors import ConfigError, TopologyError
from p2pfm.core.identity import PeerId
from p2pfm.core.topology import parse_topology
from p2pfm.learn.adapter import LoraSettings, ModelSettings
from p2pfm.learn.data import DataConfig
from p2pfm.learn.train import TrainSettings
from p2pfm.net.zmq_transport import TransportSettings, check_address
from p2pfm.node.attacks import AttackKind

_SECTIONS = {"node", "peers", "topology", "model", "lora", "data", "train", "gossip", "faults", "transport"}


@dataclass(frozen=True)
class NodeSection:
    key: Path  # Ed25519 key file (p2pfm keygen)
    listen: str  # tcp://HOST:PORT this node binds
    network: str  # network id; must match every neighbour's
    out: Path  # output folder: metrics, checkpoint, final adapter
    name: str = ""  # human label for logs and reports (default: short peer id)
    roster: Path | None = None  # network member list (p2pfm roster); None: admit the neighbours only

    def __post_init__(self) -> None:
        check_address("node.listen", self.listen)
        if not 1 <= len(self.network.encode()) <= 64:
            raise ConfigError("node.network", "must be 1..64 bytes of UTF-8")


@dataclass(frozen=True)
class Peer:
    id: PeerId
    address: str
    name: str


@dataclass(frozen=True)
class ShardSettings:
    """Which of the data partitions this node trains on."""

    shard: int = 0  # this node's partition index
    shards: int = 1  # number of partitions (nodes in the network)

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise ConfigError("data.shards", "must be >= 1")
        if not 0 <= self.shard < self.shards:
            raise ConfigError("data.shard", f"must be in 0..{self.shards - 1}, got {self.shard}")


@dataclass(frozen=True)
class GossipSettings:
    rounds: int = 10
    round_timeout_s: float = 30.0  # wait for neighbours after sending our own update
    wire_dtype: Literal["float32", "bfloat16"] = "float32"
    mix: bool = True  # false: train alone and never mix (the `local` baseline)
    seed: int = 0  # adapter initialisation seed; the same on every node
    snapshot_every: int = 0  # keep the mixed adapter every N rounds (consensus analysis); 0 = never
    eval_every: int = 1  # evaluate every N rounds (and after the last); 1 also evaluates before training
    rule: MixRule = "mean"  # mixing rule (docs/robust.md)
    trim: int = 1  # trimmed-mean: values dropped at each end per coordinate
    byzantine_weight: float = 0.25  # clip: neighbour weight share whose farthest holders get clipped
    max_rounds_ahead: int = 3  # updates further ahead than this are refused (future_round)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("gossip.rounds", "must be >= 1")
        if not self.round_timeout_s > 0:
            raise ConfigError("gossip.round_timeout_s", "must be > 0 seconds")
        if self.trim < 0:
            raise ConfigError("gossip.trim", "must be >= 0")
        if not 0.0 <= self.byzantine_weight < 1.0:
            raise ConfigError("gossip.byzantine_weight", "must be in [0, 1)")
        if self.eval_every < 1:
            raise ConfigError("gossip.eval_every", "must be >= 1")
        if self.snapshot_every < 0:
            raise ConfigError("gossip.snapshot_every", "must be >= 0")
        if self.max_rounds_ahead < 1:
            raise ConfigError(
                "gossip.max_rounds_ahead", "must be >= 1 (a neighbour is up to one round ahead)"
            )


@dataclass(frozen=True)
class FaultSettings:
    """Injected faults, for scenarios and tests (a healthy node has none)."""

    slow_factor: float = 1.0  # training takes this many times longer
    drop: dict[str, float] = field(default_factory=dict)  # neighbour name -> loss probability
    # Misbehave (attack experiments, p2pfm/node/attacks.py): "" = honest.
    attack: AttackKind | Literal[""] = ""
    attack_factor: float | None = None  # default per attack (scale 10, noise 1, signflip 1)

    def __post_init__(self) -> None:
        if not self.slow_factor >= 1.0:
            raise ConfigError("faults.slow_factor", "must be >= 1.0")
        for name, prob in self.drop.items():
            if not 0.0 <= prob <= 1.0:
                raise ConfigError(f"faults.drop.{name}", "must be a probability in [0, 1]")


@dataclass(frozen=True)
class NodeConfig:
    node: NodeSection
    peers: tuple[Peer, ...]
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

    @property
    def checkpoint_dir(self) -> Path:
        return self.node.out / "checkpoint"


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate a node config file."""
    doc = read_toml(path, "config")
    return node_config_from_dict(doc, path)


def node_config_from_dict(doc: Mapping[str, Any], path: Path) -> NodeConfig:
    unknown = sorted(set(doc) - _SECTIONS)
    if unknown:
        raise ConfigError(unknown[0], f"unknown section; valid sections are: {', '.join(sorted(_SECTIONS))}")
    if "node" not in doc:
        raise ConfigError("node", "section is required (key, listen, network, out)")
    base = path.parent
    node = build(NodeSection, doc["node"], "node")
    node = NodeSection(
        key=_resolve(base, node.key), listen=node.listen, network=node.network,
        out=_resolve(base, node.out), name=node.name,
        roster=None if node.roster is None else _resolve(base, node.roster),
    )  # fmt: skip
    model = build(ModelSettings, doc.get("model", {}), "model")
    if model.path not in ("minilm",) and not Path(model.path).is_absolute():
        model = ModelSettings(
            path=str(_resolve(base, Path(model.path))), task=model.task,
            num_labels=model.num_labels, gguf_file=model.gguf_file,
        )  # fmt: skip
    data_table = dict(doc.get("data", {}))
    shard = build(
        ShardSettings, {k: data_table.pop(k) for k in ("shard", "shards") if k in data_table}, "data"
    )
    data_table.setdefault("task", model.task)
    if data_table["task"] != model.task:
        raise ConfigError("data.task", f"must match model.task ({model.task!r})")
    data = build(DataConfig, data_table, "data")
    if data.source != "bbc-news" and not Path(data.source).is_absolute():
        data = _replace_source(data, str(_resolve(base, Path(data.source))))
    peers = _peers(doc, base)
    roster = None
    if node.roster is not None:
        roster = load_roster(node.roster)
        if roster.network != node.network:
            raise ConfigError("node.network", f"is {node.network!r} but the roster is for {roster.network!r}")
        for i, peer in enumerate(peers):
            if peer.id not in roster.ids:
                raise ConfigError(
                    f"peers[{i}].id", f"{peer.name} ({peer.id.short}) is not a member of the roster"
                )
    return NodeConfig(
        node=node,
        peers=peers,
        model=model,
        lora=build(LoraSettings, doc.get("lora", {}), "lora"),
        data=data,
        shard=shard,
        train=build(TrainSettings, doc.get("train", {}), "train"),
        gossip=build(GossipSettings, doc.get("gossip", {}), "gossip"),
        faults=build(FaultSettings, doc.get("faults", {}), "faults"),
        transport=build(TransportSettings, doc.get("transport", {}), "transport"),
        path=path,
        roster=roster,
    )


def _resolve(base: Path, value: Path) -> Path:
    return value if value.is_absolute() else (base / value).resolve()


def _replace_source(data: DataConfig, source: str) -> DataConfig:
    from dataclasses import replace  # noqa: PLC0415

    return replace(data, source=source)


def _peer(table: object, where: str) -> Peer:
    if not isinstance(table, Mapping):
        raise ConfigError(where, "must be a table with id and address")
    unknown = set(table) - {"id", "address", "name"}
    if unknown:
        raise ConfigError(
            f"{where}.{sorted(unknown)[0]}", "unknown field; valid fields are: address, id, name"
        )
    for key in ("id", "address"):
        if key not in table:
            raise ConfigError(f"{where}.{key}", "is required")
    hex_id = coerce(table["id"], str, f"{where}.id")
    try:
        peer_id = PeerId.from_hex(hex_id)
    except ValueError as exc:
        raise ConfigError(f"{where}.id", str(exc)) from None
    address = check_address(f"{where}.address", coerce(table["address"], str, f"{where}.address"))
    name = coerce(table.get("name", peer_id.short), str, f"{where}.name")
    return Peer(peer_id, address, name)


def _peers(doc: Mapping[str, Any], base: Path) -> tuple[Peer, ...]:
    if ("peers" in doc) == ("topology" in doc):
        raise ConfigError("peers", "give either [[peers]] entries or a [topology] section (exactly one)")
    if "peers" in doc:
        entries = doc["peers"]
        if not isinstance(entries, list):
            raise ConfigError("peers", "must be an array of tables ([[peers]])")
        peers = tuple(_peer(entry, f"peers[{i}]") for i, entry in enumerate(entries))
    else:
        peers = _topology_peers(doc["topology"], base)
    ids = [p.id for p in peers]
    if len(set(ids)) != len(ids):
        raise ConfigError("peers", "the same peer id is listed twice")
    return peers


def _topology_peers(table: object, base: Path) -> tuple[Peer, ...]:
    if not isinstance(table, Mapping):
        raise ConfigError("topology", "must be a table with spec, self and members")
    for key in ("spec", "self", "members"):
        if key not in table:
            raise ConfigError(f"topology.{key}", "is required")
    spec = coerce(table["spec"], str, "topology.spec")
    if ":" not in spec and not Path(spec).is_absolute():
        spec = str(_resolve(base, Path(spec)))
    me = coerce(table["self"], str, "topology.self")
    members = table["members"]
    if not isinstance(members, Mapping):
        raise ConfigError("topology.members", "must be a table: name = { id = ..., address = ... }")
    try:
        topology = parse_topology(spec)
        index = topology.index_of(me)
    except TopologyError as exc:
        raise ConfigError("topology", str(exc)) from None
    peers = []
    for j in topology.neighbours(index):
        name = topology.names[j]
        if name not in members:
            raise ConfigError("topology.members", f"neighbour {name!r} of {me!r} has no entry")
        peer = _peer(members[name], f"topology.members.{name}")
        peers.append(Peer(peer.id, peer.address, name))
    return tuple(peers)
