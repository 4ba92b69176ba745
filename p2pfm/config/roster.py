"""The roster: who is a member of a network.

A roster file (TOML) names the network and lists its members' public keys,
optionally with their addresses::

    network = "my-network"

    [[members]]
    name = "alice"
    id = "<64 hex: alice's peer id>"
    address = "tcp://203.0.113.7:5550"   # optional

A node with ``node.roster`` set admits CurveZMQ connections only from
members, and refuses messages from anyone who is not both a member and one
of its neighbours. Every member keeps the same file; docs/security.md says
how a network adds or removes a member.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from p2pfm.config.toml import coerce, read_toml
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import PeerId
from p2pfm.net.zmq_transport import check_address


@dataclass(frozen=True)
class Member:
    name: str
    id: PeerId
    address: str | None = None


@dataclass(frozen=True)
class Roster:
    network: str
    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= len(self.network.encode()) <= 64:
            raise ConfigError("roster.network", "must be 1..64 bytes of UTF-8")
        names = [m.name for m in self.members]
        ids = [m.id for m in self.members]
        for i, member in enumerate(self.members):
            if names.index(member.name) != i:
                raise ConfigError(f"roster.members[{i}].name", f"{member.name!r} is listed twice")
            if ids.index(member.id) != i:
                raise ConfigError(f"roster.members[{i}].id", f"peer {member.id.short} is listed twice")

    @property
    def ids(self) -> frozenset[PeerId]:
        return frozenset(m.id for m in self.members)

    def with_member(self, member: Member) -> Roster:
        return replace(self, members=(*self.members, member))

    def without(self, name: str) -> Roster:
        if name not in {m.name for m in self.members}:
            raise ConfigError("roster.members", f"no member named {name!r}")
        return replace(self, members=tuple(m for m in self.members if m.name != name))


def load_roster(path: Path) -> Roster:
    doc = read_toml(path, "roster")
    unknown = sorted(set(doc) - {"network", "members"})
    if unknown:
        raise ConfigError(f"roster.{unknown[0]}", "unknown key; valid keys are: members, network")
    if "network" not in doc:
        raise ConfigError("roster.network", f"is required in {path}")
    members = doc.get("members", [])
    if not isinstance(members, list):
        raise ConfigError("roster.members", "must be an array of tables ([[members]])")
    network = coerce(doc["network"], str, "roster.network")
    return Roster(network, tuple(_member(entry, f"roster.members[{i}]") for i, entry in enumerate(members)))


def _member(table: object, where: str) -> Member:
    if not isinstance(table, Mapping):
        raise ConfigError(where, "must be a table with name and id")
    unknown = sorted(set(table) - {"name", "id", "address"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", "unknown key; valid keys are: address, id, name")
    for key in ("name", "id"):
        if key not in table:
            raise ConfigError(f"{where}.{key}", "is required")
    try:
        peer = PeerId.from_hex(coerce(table["id"], str, f"{where}.id"))
    except ValueError as exc:
        raise ConfigError(f"{where}.id", str(exc)) from None
    address = table.get("address")
    if address is not None:
        address = check_address(f"{where}.address", coerce(address, str, f"{where}.address"))
    return Member(coerce(table["name"], str, f"{where}.name"), peer, address)


def save_roster(roster: Roster, path: Path) -> None:
    doc: dict[str, Any] = {"network": roster.network, "members": []}
    for member in roster.members:
        entry: dict[str, Any] = {"name": member.name, "id": member.id.hex}
        if member.address is not None:
            entry["address"] = member.address
        doc["members"].append(entry)
    path.write_text(tomli_w.dumps(doc))
