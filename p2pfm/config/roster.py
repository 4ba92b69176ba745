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

from pathlib import Path
from typing import Any

import msgspec
import tomli_w

from p2pfm.config.schema import Address, PeerIdText, Schema, check_network_id, decode
from p2pfm.config.toml import read_toml
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import PeerId


class Member(Schema, frozen=True):
    name: str
    id: PeerIdText
    address: Address | None = None


class Roster(Schema, frozen=True):
    network: str  # 1..64 bytes of UTF-8, the network id of node.network
    members: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        check_network_id("roster.network", self.network)
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
        return msgspec.structs.replace(self, members=(*self.members, member))

    def without(self, name: str) -> Roster:
        if name not in {m.name for m in self.members}:
            raise ConfigError("roster.members", f"no member named {name!r}")
        return msgspec.structs.replace(self, members=tuple(m for m in self.members if m.name != name))


def load_roster(path: Path) -> Roster:
    """Read and validate a roster file (p2pfm roster init / add / remove write it)."""
    return decode(Roster, read_toml(path, "roster"), "roster")


def save_roster(roster: Roster, path: Path) -> None:
    doc: dict[str, Any] = {"network": roster.network, "members": []}
    for member in roster.members:
        entry: dict[str, Any] = {"name": member.name, "id": member.id.hex}
        if member.address is not None:
            entry["address"] = member.address
        doc["members"].append(entry)
    path.write_text(tomli_w.dumps(doc))
