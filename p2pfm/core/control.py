"""Membership control messages: their encoding, signing and checked decoding.

A control message uses the wire's envelope (one buffer: prelude, Ed25519
over the head's BLAKE3 digest, a msgpack header, no payload) and travels on
the transport's control channel, apart from the adapter updates (whose
channel conflates: only the newest message per link survives there).

Every control header holds ``kind``, ``network``, ``to`` (the recipient's
peer id: a message cannot be replayed at anyone else), ``seq`` (strictly
increasing per sender: a message cannot be replayed at its recipient
either) and ``rv`` (the roster version the sender holds: whoever holds a
newer one passes it on), plus the fields of its kind:

    join             record                    a joiner's own peer record, to a member
    join_reply       records                   a sample of the member's views (peer exchange)
    forward_join     record, ttl               a join walking the overlay
    neighbour        record, high              "take me into your active view" (high: I have none)
    neighbour_reply  accept, record, records   yes or no, the replier's record, and a sample (hints)
    disconnect       leave                     "you are out of my active view" (leave: I am going)
    shuffle          record, records, ttl      peer exchange walking the overlay
    shuffle_reply    records                   the walk's end answers with a sample of its own
    ping / pong                                is a quiet neighbour alive
    roster           document                  a signed roster document (p2pfm/core/records.py)

``record`` and ``records`` are signed peer records, each checked on its
own. Everything is bounded before allocation: the whole message
(``max_control_bytes``), the record count (``max_records``), each record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from p2pfm.core import wire
from p2pfm.core.errors import LocalProtocolError, MalformedMessage, RejectReason, RemoteProtocolError
from p2pfm.core.identity import PUBLIC_KEY_BYTES, Identity, PeerId
from p2pfm.core.records import PeerRecord, RecordLimits, open_peer_record, unpack_map
from p2pfm.core.wire import Buffer

_MAX_INT = 2**63 - 1
MAX_TTL = 16
_COMMON = ("kind", "network", "to", "seq", "rv")
# kind -> its own fields, each with the type it must have
FIELDS: dict[str, dict[str, str]] = {
    "join": {"record": "record"},
    "join_reply": {"records": "records"},
    "forward_join": {"record": "record", "ttl": "ttl"},
    "neighbour": {"record": "record", "high": "bool"},
    "neighbour_reply": {"accept": "bool", "record": "record", "records": "records"},
    "disconnect": {"leave": "bool"},
    "shuffle": {"record": "record", "records": "records", "ttl": "ttl"},
    "shuffle_reply": {"records": "records"},
    "ping": {},
    "pong": {},
    "roster": {"document": "bytes"},
}
KINDS = tuple(FIELDS)


@dataclass(frozen=True)
class ControlLimits:
    """What a receiver accepts on its control channel."""

    max_records: int = 16  # records in one message
    records: RecordLimits = field(default_factory=RecordLimits)

    @property
    def max_control_bytes(self) -> int:
        """The largest control message: a roster document, or a full list of records."""
        most_records = (self.max_records + 1) * (self.records.max_record_bytes + 3)
        return wire.HEAD_OVERHEAD_BYTES + max(most_records, self.records.max_roster_bytes) + 256


@dataclass(frozen=True)
class Control:
    """A checked control message: its sender (signature verified) and fields."""

    sender: PeerId
    kind: str
    network: str
    to: PeerId
    seq: int
    rv: int
    record: PeerRecord | None = None
    records: tuple[PeerRecord, ...] = ()
    ttl: int = 0
    high: bool = False
    accept: bool = False
    leave: bool = False
    document: bytes = b""
    wire_bytes: int = 0


def encode_control(
    identity: Identity, *, kind: str, network: str, to: PeerId, seq: int, rv: int, **fields: Any
) -> bytes:
    """Build and sign one control message. Raises LocalProtocolError on misuse."""
    spec = FIELDS.get(kind)
    if spec is None:
        raise LocalProtocolError(f"unknown control kind {kind!r}")
    if set(fields) != set(spec):
        raise LocalProtocolError(f"control {kind!r} takes fields {sorted(spec)}, got {sorted(fields)}")
    for name, value in (("seq", seq), ("rv", rv)):
        if type(value) is not int or not 0 <= value <= _MAX_INT:
            raise LocalProtocolError(f"{name} must be an int in [0, 2^63), got {value!r}")
    header: dict[str, Any] = {"kind": kind, "network": network, "to": to.key, "seq": seq, "rv": rv}
    for name, value in fields.items():
        header[name] = _encode_field(spec[name], name, value)
    return wire.sign(wire.Unsigned(msgpack.packb(header, use_bin_type=True)), identity)


def _encode_field(kind: str, name: str, value: Any) -> Any:
    if kind == "record":
        if not isinstance(value, PeerRecord):
            raise LocalProtocolError(f"{name} must be a PeerRecord")
        return value.signed
    if kind == "records":
        most = ControlLimits().max_records
        if not isinstance(value, (list, tuple)) or len(value) > most:
            raise LocalProtocolError(
                f"{name} must be a list of at most {most} PeerRecords (receivers refuse more)"
            )
        if not all(isinstance(r, PeerRecord) for r in value):
            raise LocalProtocolError(f"{name} must be PeerRecords")
        return [r.signed for r in value]
    if kind == "ttl":
        if type(value) is not int or not 0 <= value <= MAX_TTL:
            raise LocalProtocolError(f"ttl must be an int in [0, {MAX_TTL}], got {value!r}")
        return value
    if kind == "bool":
        return bool(value)
    return bytes(value)


def decode_control(message: Buffer, network: str, limits: ControlLimits | None = None) -> Control:
    """Verify the signature, then check every field. Raises RemoteProtocolError (with its reason)."""
    limits = limits or ControlLimits()
    most = limits.max_control_bytes
    verified = wire.verify(message, wire.WireLimits(max_message_bytes=most, max_header_bytes=most))
    if verified.payload.nbytes:
        raise MalformedMessage("a control message carries no payload")
    header = unpack_map(verified.header, most)
    kind = header.get("kind")
    spec = FIELDS.get(kind) if isinstance(kind, str) else None
    if spec is None or not isinstance(kind, str):
        raise MalformedMessage(f"control kind {kind!r} is not one of {', '.join(KINDS)}")
    if set(header) != {*_COMMON, *spec}:
        raise MalformedMessage(
            f"control {kind!r} keys {sorted(header)} differ from {sorted({*_COMMON, *spec})}"
        )
    if header["network"] != network:
        raise RemoteProtocolError(
            f"control message for network {header['network']!r}", RejectReason.WRONG_NETWORK
        )
    to = header["to"]
    if not isinstance(to, bytes) or len(to) != PUBLIC_KEY_BYTES:
        raise MalformedMessage("to must be a 32-byte peer id")
    ints = [header["seq"], header["rv"]]
    if not all(type(v) is int and 0 <= v <= _MAX_INT for v in ints):
        raise MalformedMessage("seq and rv must be integers in [0, 2^63)")
    fields: dict[str, Any] = {}
    for name, field_kind in spec.items():
        fields[name] = _decode_field(field_kind, name, header[name], network, limits)
    return Control(
        sender=verified.sender, kind=kind, network=network, to=PeerId(to), seq=ints[0], rv=ints[1],
        wire_bytes=verified.wire_bytes, **fields,
    )  # fmt: skip


def _decode_field(kind: str, name: str, value: object, network: str, limits: ControlLimits) -> Any:
    if kind == "record":
        if not isinstance(value, bytes):
            raise MalformedMessage(f"{name} must be a signed peer record (bin)")
        return _record(value, network, limits)
    if kind == "records":
        if not isinstance(value, tuple) or len(value) > limits.max_records:
            raise MalformedMessage(f"{name} must be a list of <= {limits.max_records} records")
        if not all(isinstance(v, bytes) for v in value):
            raise MalformedMessage(f"{name} entries must be signed peer records (bin)")
        return tuple(_record(v, network, limits) for v in value if isinstance(v, bytes))
    if kind == "ttl":
        if type(value) is not int or not 0 <= value <= MAX_TTL:
            raise MalformedMessage(f"ttl must be an integer in [0, {MAX_TTL}]")
        return value
    if kind == "bool":
        if type(value) is not bool:
            raise MalformedMessage(f"{name} must be a boolean")
        return value
    if not isinstance(value, bytes):
        raise MalformedMessage(f"{name} must be bin")
    return value


def _record(data: bytes, network: str, limits: ControlLimits) -> PeerRecord:
    try:
        return open_peer_record(data, network, limits.records)
    except RemoteProtocolError as exc:
        # A bad record inside a validly signed message: the relay's fault, counted under the record's reason.
        raise type(exc)(f"a relayed peer record: {exc}", exc.reason) from None
