"""Membership control messages (p2pfm/core/control.py) and docs/protocol.md's section 11.5 vector."""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import blake3
import msgpack
import nacl.signing
import pytest

from p2pfm.core import wire
from p2pfm.core.control import FIELDS, KINDS, MAX_TTL, ControlLimits, decode_control, encode_control
from p2pfm.core.errors import LocalProtocolError, RejectReason, RemoteProtocolError
from p2pfm.core.identity import Identity, PeerId
from p2pfm.core.records import PeerRecord, make_peer_record, make_roster_document
from tests.conftest import doc_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
NET = "p2pfm-testnet"
ME = Identity(bytes(range(32)))
YOU = Identity(bytes(range(32, 64)))
THIRD = Identity(bytes([9]) * 32)
REC = make_peer_record(ME, NET, 7, ["tcp://192.0.2.1:5550"])
OTHERS = (
    make_peer_record(YOU, NET, 1, ["tcp://192.0.2.2:5550"]),
    make_peer_record(THIRD, NET, 2, ["memory://third", "tcp://192.0.2.3:1"]),
)
ROSTER = make_roster_document(ME, network=NET, version=3, members=[YOU.peer_id], admins=[ME.peer_id])


def _fields(kind: str) -> dict[str, Any]:
    """Values for every field of ``kind``, built from FIELDS' types."""
    values = {"record": REC, "records": OTHERS, "ttl": 3, "bool": True, "bytes": ROSTER.signed}
    return {name: values[type_] for name, type_ in FIELDS[kind].items()}


def _common(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"kind": "ping", "network": NET, "to": YOU.peer_id.key, "seq": 1, "rv": 0}
    header.update(changes)
    return header


def _sign(header: dict[str, Any], identity: Identity = ME, payload: bytes = b"") -> bytes:
    pieces = (payload,) if payload else ()
    return wire.sign(wire.Unsigned(msgpack.packb(header, use_bin_type=True), pieces), identity)


def _reason(message: bytes, network: str = NET) -> RejectReason:
    with pytest.raises(RemoteProtocolError) as info:
        decode_control(message, network)
    return info.value.reason


# ----------------------------------------------------------------- round trips


def test_fields_cover_every_kind_and_only_known_types() -> None:
    assert set(KINDS) == set(FIELDS) and len(KINDS) == 11
    assert {t for spec in FIELDS.values() for t in spec.values()} == {
        "record",
        "records",
        "ttl",
        "bool",
        "bytes",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips(kind: str) -> None:
    fields = _fields(kind)
    message = encode_control(ME, kind=kind, network=NET, to=YOU.peer_id, seq=11, rv=4, **fields)
    control = decode_control(message, NET)
    assert (control.sender, control.kind, control.network) == (ME.peer_id, kind, NET)
    assert (control.to, control.seq, control.rv) == (YOU.peer_id, 11, 4)
    assert control.wire_bytes == len(message)
    for name, value in fields.items():
        assert getattr(control, name) == value, name


def test_round_trip_of_false_and_empty_values() -> None:
    message = encode_control(
        ME,
        kind="neighbour_reply",
        network=NET,
        to=YOU.peer_id,
        seq=0,
        rv=0,
        accept=False,
        record=REC,
        records=(),
    )
    control = decode_control(message, NET)
    assert control.accept is False and control.records == () and control.record == REC


def test_round_trip_of_the_largest_integers() -> None:
    top = 2**63 - 1
    message = encode_control(
        ME, kind="forward_join", network=NET, to=YOU.peer_id, seq=top, rv=top, record=REC, ttl=MAX_TTL
    )
    control = decode_control(message, NET)
    assert (control.seq, control.rv, control.ttl) == (top, top, MAX_TTL)


# ----------------------------------------------------------------- encode refuses


def _encode(**changes: Any) -> bytes:
    args: dict[str, Any] = {"kind": "forward_join", "network": NET, "to": YOU.peer_id, "seq": 1, "rv": 0}
    args.update(record=REC, ttl=1)
    args.update(changes)
    return encode_control(ME, **args)


def test_encode_helper_builds_a_valid_message() -> None:
    assert decode_control(_encode(), NET).kind == "forward_join"


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "gossip"},
        {"kind": "ping"},  # ping takes no fields: record and ttl are extra
        {"ttl": MAX_TTL + 1},
        {"ttl": -1},
        {"ttl": 1.0},
        {"seq": -1},
        {"rv": -1},
        {"seq": 2**63},
        {"seq": "1"},
        {"record": REC.signed},  # bytes, not a PeerRecord
    ],
    ids=[
        "unknown-kind",
        "extra-fields",
        "ttl-17",
        "ttl-neg",
        "ttl-float",
        "seq-neg",
        "rv-neg",
        "seq-2^63",
        "seq-str",
        "record-bytes",
    ],
)
def test_encode_control_refuses_misuse(changes: dict[str, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        _encode(**changes)


def test_encode_control_refuses_missing_and_extra_fields() -> None:
    with pytest.raises(LocalProtocolError):
        encode_control(ME, kind="forward_join", network=NET, to=YOU.peer_id, seq=1, rv=0, record=REC)
    with pytest.raises(LocalProtocolError):
        _encode(high=True)
    with pytest.raises(LocalProtocolError):
        encode_control(
            ME, kind="shuffle_reply", network=NET, to=YOU.peer_id, seq=1, rv=0, records=[REC.signed]
        )


# ----------------------------------------------------------------- decode refuses


def test_hand_built_header_checks_out() -> None:
    control = decode_control(_sign(_common(kind="forward_join", record=REC.signed, ttl=2)), NET)
    assert (control.kind, control.ttl, control.record) == ("forward_join", 2, REC)


@pytest.mark.parametrize(
    "header",
    [
        _common(kind="gossip"),
        _common(kind="peer"),
        _common(kind=None),
        _common(kind=["ping"]),
        {k: v for k, v in _common().items() if k != "rv"},
        {k: v for k, v in _common().items() if k != "to"},
        {k: v for k, v in _common().items() if k != "kind"},
        _common(extra=1),
        _common(kind="ping", leave=True),
        _common(kind="disconnect"),
        _common(to=YOU.peer_id.key[:31]),
        _common(to=YOU.peer_id.hex),
        _common(seq="1"),
        _common(seq=-1),
        _common(rv=2**63),
        _common(rv=True),
        _common(kind="forward_join", record=REC.signed, ttl=MAX_TTL + 1),
        _common(kind="forward_join", record=REC.signed, ttl=True),
        _common(kind="join_reply", records=[r.signed for r in OTHERS] * 8 + [REC.signed]),
        _common(kind="join_reply", records=REC.signed),
        _common(kind="join_reply", records=["tcp://192.0.2.1:5550"]),
        _common(kind="join", record=REC.signed.hex()),
        _common(kind="join", record=[REC.signed]),
        _common(kind="join", record=b"not a record"),
        _common(kind="neighbour", record=REC.signed, high=1),
        _common(kind="roster", document=ROSTER.signed.hex()),
    ],
    ids=[
        "unknown-kind",
        "peer-kind",
        "nil-kind",
        "list-kind",
        "no-rv",
        "no-to",
        "no-kind",
        "extra-key",
        "ping-with-field",
        "disconnect-without-field",
        "to-31-bytes",
        "to-hex-str",
        "seq-str",
        "seq-neg",
        "rv-2^63",
        "rv-bool",
        "ttl-17",
        "ttl-bool",
        "17-records",
        "records-bin",
        "records-of-str",
        "record-str",
        "record-list",
        "record-garbage",
        "high-int",
        "document-str",
    ],
)
def test_decode_refuses_bad_header_as_malformed(header: dict[str, Any]) -> None:
    assert _reason(_sign(header)) is RejectReason.MALFORMED


def test_seventeen_records_exceed_max_records() -> None:
    assert ControlLimits().max_records == 16
    sixteen = [r.signed for r in OTHERS] * 8
    assert len(decode_control(_sign(_common(kind="join_reply", records=sixteen)), NET).records) == 16
    assert (
        _reason(_sign(_common(kind="join_reply", records=[*sixteen, REC.signed]))) is RejectReason.MALFORMED
    )


def test_control_with_a_payload_is_malformed() -> None:
    assert _reason(_sign(_common(), payload=b"\x00")) is RejectReason.MALFORMED


def test_a_peer_record_is_not_a_control_message() -> None:
    assert _reason(REC.signed) is RejectReason.MALFORMED


def test_control_for_another_network_is_wrong_network() -> None:
    message = encode_control(ME, kind="ping", network="other-net", to=YOU.peer_id, seq=1, rv=0)
    assert _reason(message) is RejectReason.WRONG_NETWORK
    assert decode_control(message, "other-net").kind == "ping"


def test_flipped_header_byte_is_a_bad_signature() -> None:
    message = _encode()
    for i in (wire.HEAD_OVERHEAD_BYTES, wire.HEAD_OVERHEAD_BYTES + 20, len(message) - 1):
        tampered = bytearray(message)
        tampered[i] ^= 0x01
        assert _reason(bytes(tampered)) is RejectReason.BAD_SIGNATURE, i


def test_flipped_signature_byte_is_a_bad_signature() -> None:
    tampered = bytearray(_encode())
    tampered[60] ^= 0x80
    assert _reason(bytes(tampered)) is RejectReason.BAD_SIGNATURE


def _tampered_record() -> bytes:
    bad = bytearray(OTHERS[0].signed)
    bad[-1] ^= 0x01  # the record's own header: its signature no longer verifies
    return bytes(bad)


def test_badly_signed_relayed_record_is_a_bad_signature() -> None:
    message = _sign(_common(kind="join", record=_tampered_record()))  # the outer signature is good
    assert _reason(message) is RejectReason.BAD_SIGNATURE


def test_badly_signed_record_among_records_is_a_bad_signature() -> None:
    records = [REC.signed, _tampered_record()]
    assert _reason(_sign(_common(kind="join_reply", records=records))) is RejectReason.BAD_SIGNATURE


def test_relayed_record_of_another_network_is_wrong_network() -> None:
    foreign = make_peer_record(YOU, "other-net", 1, ["tcp://192.0.2.2:5550"])
    assert _reason(_sign(_common(kind="join", record=foreign.signed))) is RejectReason.WRONG_NETWORK


def test_relayed_record_over_its_limit_is_too_large() -> None:
    huge = _sign({"kind": "peer", "network": NET, "seq": 1, "addresses": ["tcp://a"], "pad": "a" * 2048})
    assert _reason(_sign(_common(kind="join", record=huge))) is RejectReason.TOO_LARGE


def test_message_over_max_control_bytes_is_too_large() -> None:
    limits = ControlLimits()
    message = _sign(_common(kind="roster", document=b"\x00" * limits.max_control_bytes))
    with pytest.raises(RemoteProtocolError) as info:
        decode_control(message, NET, limits)
    assert info.value.reason is RejectReason.TOO_LARGE


# ----------------------------------------------------------------- docs/protocol.md section 11


def _section(title: str) -> str:
    return doc_section(DOC, title)


def _vector() -> dict[str, bytes]:
    block = _section("### 11.5 Test vector")
    pairs = re.findall(r"^(\w+)\s+= ([0-9a-f]+)$", block, flags=re.MULTILINE)
    vector = {name: bytes.fromhex(value) for name, value in pairs}
    expected = {"record", "to", "prelude", "header_length", "header", "head_digest"}
    assert set(vector) == expected and len(pairs) == len(expected)
    return vector


def _message(v: dict[str, bytes]) -> bytes:
    return v["prelude"] + v["header_length"] + v["header"]


def test_code_produces_the_section_11_vector() -> None:
    v = _vector()
    to = YOU.peer_id
    assert to.key == v["to"]
    record = make_peer_record(ME, NET, 7, ["tcp://192.0.2.1:5550"])
    assert record.signed == v["record"]
    message = encode_control(ME, kind="neighbour", network=NET, to=to, seq=1, rv=3, record=record, high=False)
    assert message == _message(v)
    assert len(message) == 379 and struct.unpack("<I", v["header_length"]) == (274,)
    assert len(v["record"]) == 175 and v["header"].count(b"\xc4\xaf" + v["record"]) == 1


def test_code_reads_the_section_11_vector() -> None:
    v = _vector()
    control = decode_control(_message(v), NET)
    assert (control.sender, control.kind, control.to) == (ME.peer_id, "neighbour", PeerId(v["to"]))
    assert (control.seq, control.rv, control.high) == (1, 3, False)
    assert control.record is not None and isinstance(control.record, PeerRecord)
    assert (control.record.peer, control.record.seq) == (ME.peer_id, 7)
    assert control.record.addresses == ("tcp://192.0.2.1:5550",)
    assert control.record.signed == v["record"]


def _envelope(signing_key: nacl.signing.SigningKey, header: bytes) -> tuple[bytes, bytes, bytes]:
    """Sections 1-3 from the spec: (prelude, header_length, head_digest)."""
    signed_prelude = b"P2FM" + bytes([2]) + bytes(signing_key.verify_key)
    header_length = struct.pack("<I", len(header))
    head_digest = blake3.blake3(signed_prelude + header_length + header).digest()
    signature = signing_key.sign(head_digest).signature
    return signed_prelude + signature, header_length, head_digest


def test_spec_alone_rebuilds_the_section_11_vector() -> None:
    """Section 11.1/11.2 read with msgpack, BLAKE3 and Ed25519 only: no p2pfm code involved."""
    v = _vector()
    key = nacl.signing.SigningKey(bytes(range(32)))
    to = bytes(nacl.signing.SigningKey(bytes(range(32, 64))).verify_key)
    assert to == v["to"]
    record_header = msgpack.packb(
        {"kind": "peer", "network": NET, "seq": 7, "addresses": ["tcp://192.0.2.1:5550"]}, use_bin_type=True
    )
    record_prelude, record_length, _ = _envelope(key, record_header)
    record = record_prelude + record_length + record_header  # empty payload
    assert record == v["record"]
    header = msgpack.packb(
        {"kind": "neighbour", "network": NET, "to": to, "seq": 1, "rv": 3, "record": record, "high": False},
        use_bin_type=True,
    )
    prelude, header_length, head_digest = _envelope(key, header)
    assert header == v["header"]
    assert header_length == v["header_length"]
    assert head_digest == v["head_digest"]
    assert prelude == v["prelude"]  # Ed25519 signing is deterministic
    key.verify_key.verify(v["head_digest"], v["prelude"][37:101])  # raises if wrong


def test_section_11_3_bound_matches_the_code() -> None:
    section = _section("### 11.3 Bounds")
    (stated,) = re.findall(r"= ([\d,]+) bytes", section)
    assert ControlLimits().max_control_bytes == int(stated.replace(",", ""))


def test_section_11_2_lists_the_kinds_and_fields_in_order() -> None:
    section = _section("### 11.2 Control messages")
    rows = re.findall(r"^\| `(\w+)` \| ([^|]*) \|", section, flags=re.MULTILINE)
    documented = {kind: re.findall(r"`(\w+)`", fields) for kind, fields in rows if kind in KINDS}
    assert list(documented) == list(KINDS)
    for kind, fields in documented.items():
        assert fields == list(FIELDS[kind]), kind
