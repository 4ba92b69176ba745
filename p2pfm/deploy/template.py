"""A launched network's node config template, and one node's config made from it.

The template is a node config (docs/node.md) without what differs between
nodes: ``[model] [lora] [data] [train] [gossip] [membership] [transport]``
and optionally ``[node] network``. ``p2pfm launch`` fills in, per node, the
``[node]`` section (key, listen address, name, out folder), the data shard
(``data.shard`` = the node's index, ``data.shards`` = the number of nodes)
and the membership fields (the signed roster, the advertised host). Those
fields are refused in the template, naming the field, so an operator never
wonders which value wins.

Relative paths in the template (``model.path``, ``data.source``) are
relative to the template's folder, as in a node config; a node's config is
written elsewhere (its state folder), so they are made absolute here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from p2pfm.config.node_config import NodeConfig, node_config_from_dict
from p2pfm.config.settings import BBC_NEWS, MINILM, OPEN_NODE_PORTS, SMOLLM2
from p2pfm.config.toml import read_toml
from p2pfm.core.errors import ConfigError

PORTS_PER_NODE = OPEN_NODE_PORTS  # a launched network is open: each node listens on 3 ports

# Filled in per node by the launcher; a template that sets one is refused.
_PER_NODE: Mapping[str, tuple[str, ...]] = {
    "node": ("key", "listen", "out", "name", "roster", "metrics_address"),
    "data": ("shard", "shards"),
    "membership": ("bootstrap", "advertise_host", "roster"),
}
_SECTIONS = ("node", "model", "lora", "data", "train", "gossip", "faults", "transport", "membership")
# (section, key, aliases): relative to the template's folder unless an alias or absolute.
_PATHS = (("model", "path", (MINILM, SMOLLM2)), ("data", "source", (BBC_NEWS,)))


@dataclass(frozen=True)
class NodeSlot:
    """What differs between the nodes of a launched network: one node's place in it."""

    index: int  # 0 .. count - 1: the data shard, and the name's number
    count: int  # nodes in the network: data.shards
    name: str
    key: Path
    listen: str  # tcp://HOST:PORT
    roster: Path  # the signed roster (p2pfm roster sign)
    out: Path
    network: str
    advertise_host: str | None = None
    metrics_address: str | None = None  # node.metrics_address, "host:port"; None: left out (off)


def read_template(path: Path) -> dict[str, Any]:
    """Read and shape-check a template file (its values are checked by :func:`check_template`)."""
    return template_from_dict(read_toml(path, "template"), path.parent)


def template_from_dict(doc: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The template with per-node fields refused and relative paths made absolute (against ``base``)."""
    for section in ("peers", "topology"):
        if section in doc:
            raise ConfigError(
                section,
                "a launched network is open (neighbours come from membership): remove it from the template",
            )
    out: dict[str, Any] = {}
    for section, table in doc.items():
        if section not in _SECTIONS:
            raise ConfigError(
                section, f"is not a node config section (expected one of {', '.join(_SECTIONS)})"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(section, "must be a table ([section])")
        for key in _PER_NODE.get(section, ()):
            if key in table:
                raise ConfigError(
                    f"{section}.{key}", "is set per node by p2pfm launch: remove it from the template"
                )
        out[section] = dict(table)
    out.setdefault("membership", {})
    for section, key, aliases in _PATHS:
        value = out.get(section, {}).get(key)
        if isinstance(value, str) and value and value not in aliases and not Path(value).is_absolute():
            out[section][key] = str((base / value).resolve())
    return out


def template_network(template: Mapping[str, Any], given: str | None) -> str:
    """The network id: ``given`` (--network), else the template's ``node.network``."""
    own = template.get("node", {}).get("network")
    if given is not None:
        if own is not None and own != given:
            raise ConfigError("--network", f"is {given!r} but the template's node.network is {own!r}")
        return given
    if not isinstance(own, str):
        raise ConfigError("node.network", "give the network id in the template's [node] section or --network")
    return own


def node_document(template: Mapping[str, Any], slot: NodeSlot) -> dict[str, Any]:
    """One node's config document: the template plus ``slot``."""
    node = {
        **template.get("node", {}),
        "key": str(slot.key),
        "listen": slot.listen,
        "network": slot.network,
        "out": str(slot.out),
        "name": slot.name,
    }
    if slot.metrics_address is not None:
        node["metrics_address"] = slot.metrics_address
    membership = {**template.get("membership", {}), "roster": str(slot.roster)}
    if slot.advertise_host is not None:
        membership["advertise_host"] = slot.advertise_host
    data = {**template.get("data", {}), "shard": slot.index, "shards": slot.count}
    return {**template, "node": node, "data": data, "membership": membership}


def check_template(template: Mapping[str, Any], path: Path, *, count: int, network: str) -> NodeConfig:
    """Validate the template as its last node would load it; errors name the field and the template."""
    if count < 1:
        raise ConfigError("--nodes", f"must be >= 1, got {count}")
    slot = NodeSlot(
        index=count - 1,
        count=count,
        name="check",
        key=path.parent / "node.key",
        listen="tcp://127.0.0.1:5550",
        roster=path.parent / "roster.signed",
        out=path.parent / "out",
        network=network,
    )
    try:
        return node_config_from_dict(node_document(template, slot), path)
    except ConfigError as exc:
        raise ConfigError(exc.field, f"{exc.problem} (in template {path})") from None


def write_node_config(template: Mapping[str, Any], slot: NodeSlot, out: Path) -> NodeConfig:
    """Check one node's config and write it to ``out`` (what a launched node runs with)."""
    doc = node_document(template, slot)
    config = node_config_from_dict(doc, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return config
