"""Signed documents that travel by relay: peer records and the network's roster.

Both use the wire's envelope (docs/protocol.md section 1: prelude, Ed25519
over the BLAKE3 digest of the head, a msgpack header, no payload), so one
verifier checks every signed thing p2pfm believes. A document is a statement
by its signer that anyone can pass on and anyone can check, which is what
lets membership spread by peer exchange without trusting the relay:

- a **peer record** is a node's own statement of where it listens:
  ``{kind: "peer", network, seq, addresses}``, signed by the node itself.
  ``seq`` only grows (a newer record replaces an older one); nobody can
  announce an address for another key.
- a **roster document** is the network's admission list:
  ``{kind: "roster", network, version, members, admins, open}``, signed by
  one of the admins of the roster the receiver already trusts. A receiver
  takes a document only with a higher ``version``; members removed by it are
  refused from then on, members added may join.

Sizes are bounded before anything is decoded (``RecordLimits``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from p2pfm.core import wire
from p2pfm.core.errors import (
    LocalProtocolError,
    MalformedMessage,
    RejectReason,
    RemoteProtocolError,
    UnknownSender,
)
from p2pfm.core.identity import PUBLIC_KEY_BYTES, Identity, PeerId
from p2pfm.core.wire import Buffer

KIND_PEER = "peer"
KIND_ROSTER = "roster"
_PEER_KEYS = frozenset({"kind", "network", "seq", "addresses"})
_ROSTER_KEYS = frozenset({"kind", "network", "version", "members", "admins", "open"})
_MAX_INT = 2**63 - 1
# An address is a transport URL: tcp://HOST:PORT, or memory://NAME in simulations.
_ADDRESS = re.compile(r"\A[a-z][a-z0-9+.-]{0,15}://[!-~]{1,240}\Z")


@dataclass(frozen=True)
class RecordLimits:
    """Bounds on documents, checked before decoding (a receiver's own choice, not the sender's)."""

    max_addresses: int = 4
    max_address_bytes: int = 256
    max_record_bytes: int = 2048  # a record with 4 addresses of 256 bytes is ~1.2 KiB
    max_members: int = 16384
    max_admins: int = 16

    @property
    def max_roster_bytes(self) -> int:
        # 35 bytes per key (msgpack bin 32 + its 2-byte head) plus the envelope and a few keys.
        return wire.HEAD_OVERHEAD_BYTES + 35 * (self.max_members + self.max_admins) + 512


@dataclass(frozen=True)
class PeerRecord:
    """Where a peer listens, as it signed it: the ``signed`` bytes are what is relayed."""

    peer: PeerId
    network: str
    seq: int
    addresses: tuple[str, ...]
    signed: bytes

    @property
    def address(self) -> str:
        """Where control messages go (the first address)."""
        return self.addresses[0]

    @property
    def update_address(self) -> str:
        """Where updates go: the second address, or the first when there is one only (in memory)."""
        return self.addresses[1] if len(self.addresses) > 1 else self.addresses[0]


@dataclass(frozen=True)
class RosterDocument:
    """A version of the network's roster, signed by ``signer`` (one of the admins that came before)."""

    network: str
    version: int
    members: frozenset[PeerId]
    admins: frozenset[PeerId]
    open: bool  # anyone with the network id may join (docs/security.md says what that costs)
    signer: PeerId
    signed: bytes

    def admits(self, peer: PeerId) -> bool:
        return self.open or peer in self.members or peer in self.admins


# ------------------------------------------------------------------ peer records


def make_peer_record(identity: Identity, network: str, seq: int, addresses: Sequence[str]) -> PeerRecord:
    """Sign this node's record. Raises LocalProtocolError on bad arguments."""
    limits = RecordLimits()
    _check_addresses(addresses, limits, LocalProtocolError)
    if type(seq) is not int or not 0 <= seq <= _MAX_INT:
        raise LocalProtocolError(f"record seq must be an int in [0, 2^63), got {seq!r}")
    header = {"kind": KIND_PEER, "network": network, "seq": seq, "addresses": list(addresses)}
    signed = wire.sign(wire.Unsigned(msgpack.packb(header, use_bin_type=True)), identity)
    return PeerRecord(identity.peer_id, network, seq, tuple(addresses), signed)


def open_peer_record(data: Buffer, network: str, limits: RecordLimits | None = None) -> PeerRecord:
    """Verify and decode a relayed peer record. Raises RemoteProtocolError (typed, with a reason)."""
    limits = limits or RecordLimits()
    verified, header = _open(data, limits.max_record_bytes, KIND_PEER, _PEER_KEYS)
    _check_network(header["network"], network)
    seq = header["seq"]
    if type(seq) is not int or not 0 <= seq <= _MAX_INT:
        raise MalformedMessage("peer record seq must be an integer in [0, 2^63)")
    addresses = header["addresses"]
    if not isinstance(addresses, tuple):
        raise MalformedMessage("peer record addresses must be a list")
    _check_addresses(addresses, limits, MalformedMessage)
    return PeerRecord(verified.sender, network, seq, addresses, bytes(data))


def _check_addresses(addresses: Sequence[object], limits: RecordLimits, error: type[Exception]) -> None:
    if not 1 <= len(addresses) <= limits.max_addresses:
        raise error(f"a peer record lists 1..{limits.max_addresses} addresses, got {len(addresses)}")
    for address in addresses:
        if (
            not isinstance(address, str)
            or len(address.encode()) > limits.max_address_bytes
            or not _ADDRESS.match(address)
        ):
            raise error(f"address {address!r} is not SCHEME://HOST... of <= {limits.max_address_bytes} bytes")


# --------------------------------------------------------------------- rosters


def make_roster_document(
    admin: Identity,
    *,
    network: str,
    version: int,
    members: Iterable[PeerId],
    admins: Iterable[PeerId],
    open: bool = False,
) -> RosterDocument:
    """Sign a roster version with ``admin``'s key (which must be among the previous version's admins)."""
    member_keys = sorted({p.key for p in members})
    admin_keys = sorted({p.key for p in admins})
    limits = RecordLimits()
    if len(member_keys) > limits.max_members or len(admin_keys) > limits.max_admins:
        raise LocalProtocolError(
            f"a roster holds <= {limits.max_members} members, <= {limits.max_admins} admins"
        )
    if type(version) is not int or not 0 <= version <= _MAX_INT:
        raise LocalProtocolError(f"roster version must be an int in [0, 2^63), got {version!r}")
    header = {
        "kind": KIND_ROSTER, "network": network, "version": version,
        "members": member_keys, "admins": admin_keys, "open": bool(open),
    }  # fmt: skip
    signed = wire.sign(wire.Unsigned(msgpack.packb(header, use_bin_type=True)), admin)
    return RosterDocument(
        network, version, frozenset(map(PeerId, member_keys)), frozenset(map(PeerId, admin_keys)),
        bool(open), admin.peer_id, signed,
    )  # fmt: skip


def open_roster_document(
    data: Buffer, network: str | None, limits: RecordLimits | None = None
) -> RosterDocument:
    """Verify and decode a roster document (not yet whether its signer may sign it: see ``newer_roster``).

    ``network`` None takes the document's own (a tool that only carries it; a node always checks).
    """
    limits = limits or RecordLimits()
    verified, header = _open(data, limits.max_roster_bytes, KIND_ROSTER, _ROSTER_KEYS)
    claimed = header["network"]
    if network is None:
        if not isinstance(claimed, str):
            raise MalformedMessage("roster network must be a string")
        network = claimed
    _check_network(claimed, network)
    version, is_open = header["version"], header["open"]
    if type(version) is not int or not 0 <= version <= _MAX_INT or type(is_open) is not bool:
        raise MalformedMessage("roster version must be an integer in [0, 2^63) and open a boolean")
    members = _keys(header["members"], limits.max_members, "members")
    admins = _keys(header["admins"], limits.max_admins, "admins")
    return RosterDocument(network, version, members, admins, is_open, verified.sender, bytes(data))


def newer_roster(current: RosterDocument, candidate: RosterDocument) -> bool:
    """Whether ``candidate`` replaces ``current``: a higher version, signed by one of ``current``'s admins.

    Raises UnknownSender when the signer is not an admin of the current
    version (a member cannot promote itself, and an old admin that a newer
    version removed cannot sign again).
    """
    if candidate.version <= current.version:
        return False
    if candidate.signer not in current.admins:
        raise UnknownSender(
            f"roster version {candidate.version} is signed by {candidate.signer.short}, not an admin"
        )
    return True


def _keys(raw: object, most: int, what: str) -> frozenset[PeerId]:
    if not isinstance(raw, tuple) or len(raw) > most:
        raise MalformedMessage(f"roster {what} must be a list of <= {most} keys")
    keys = []
    for key in raw:
        if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
            raise MalformedMessage(f"roster {what} entries must be {PUBLIC_KEY_BYTES}-byte public keys")
        keys.append(PeerId(key))
    if len(set(keys)) != len(keys):
        raise MalformedMessage(f"roster {what} repeat a key")
    return frozenset(keys)


# -------------------------------------------------------------------- helpers


def _open(
    data: Buffer, max_bytes: int, kind: str, keys: frozenset[str]
) -> tuple[wire.Verified, dict[str, Any]]:
    limits = wire.WireLimits(max_message_bytes=max_bytes, max_header_bytes=max_bytes)
    verified = wire.verify(data, limits)
    if verified.payload.nbytes:
        raise MalformedMessage(f"a {kind} document carries no payload")
    header = unpack_map(verified.header, max_bytes)
    if header.get("kind") != kind:
        raise MalformedMessage(f"expected a {kind!r} document, got kind {header.get('kind')!r}")
    if set(header) != keys:
        raise MalformedMessage(f"{kind} document keys {sorted(header)} differ from {sorted(keys)}")
    return verified, header


def unpack_map(data: Buffer, max_bytes: int) -> dict[str, Any]:
    """Decode a msgpack map of at most ``max_bytes`` with no repeated keys. Raises MalformedMessage.

    Every length msgpack could preallocate is bounded by the input's size.
    """
    if memoryview(data).nbytes > max_bytes:
        raise MalformedMessage(f"header of {memoryview(data).nbytes} bytes exceeds {max_bytes}")
    try:
        value = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=False, object_pairs_hook=wire.unique_keys,
            max_str_len=max_bytes, max_bin_len=max_bytes, max_array_len=max_bytes, max_map_len=32,
            max_ext_len=0,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001  hostile input raises many types; all are the peer's fault
        raise MalformedMessage(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, dict):
        raise MalformedMessage("header is not a msgpack map")
    return value


def _check_network(value: object, network: str) -> None:
    if value != network:
        raise RemoteProtocolError(f"document for network {value!r}", RejectReason.WRONG_NETWORK)
