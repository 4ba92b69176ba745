"""Signed peer records and roster documents (p2pfm/core/records.py, docs/protocol.md section 11.1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import pytest

from p2pfm.core import wire
from p2pfm.core.errors import LocalProtocolError, RejectReason, RemoteProtocolError, UnknownSender
from p2pfm.core.identity import Identity, PeerId
from p2pfm.core.records import (
    RecordLimits,
    RosterDocument,
    make_peer_record,
    make_roster_document,
    newer_roster,
    open_peer_record,
    open_roster_document,
    unpack_map,
)

NET = "p2pfm-testnet"
ME = Identity(bytes(range(32)))
ADMIN = Identity(bytes([1]) * 32)
OTHER_ADMIN = Identity(bytes([2]) * 32)
MEMBER = Identity(bytes([3]) * 32)
STRANGER = Identity(bytes([4]) * 32)
ADDRESSES = ["tcp://192.0.2.1:5550", "memory://node-1"]


def _sign(header: dict[str, Any], identity: Identity = ME, payload: bytes = b"") -> bytes:
    """A message of the wire's envelope around a header we build ourselves."""
    pieces = (payload,) if payload else ()
    return wire.sign(wire.Unsigned(msgpack.packb(header, use_bin_type=True), pieces), identity)


def _record_header(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {"kind": "peer", "network": NET, "seq": 7, "addresses": ["tcp://192.0.2.1:5550"]}
    header.update(changes)
    return header


def _reason(call: Any, *args: Any) -> RejectReason:
    with pytest.raises(RemoteProtocolError) as info:
        call(*args)
    return info.value.reason


# ------------------------------------------------------------------ peer records


def test_peer_record_round_trips() -> None:
    record = make_peer_record(ME, NET, 42, ADDRESSES)
    opened = open_peer_record(record.signed, NET)
    assert opened.peer == ME.peer_id == record.peer
    assert opened.seq == 42 and opened.network == NET
    assert opened.addresses == tuple(ADDRESSES) and opened.address == ADDRESSES[0]
    assert opened.signed == record.signed
    assert opened == record


def test_peer_record_opens_from_a_memoryview() -> None:
    record = make_peer_record(ME, NET, 1, ADDRESSES)
    assert open_peer_record(memoryview(bytearray(record.signed)), NET) == record


def test_flipped_signature_or_header_byte_is_a_bad_signature() -> None:
    signed = make_peer_record(ME, NET, 7, ADDRESSES).signed
    # sender key (5..37), signature (37..101) and header (105..): all covered by the signature
    for i in [*range(5, wire.PRELUDE_BYTES), *range(wire.HEAD_OVERHEAD_BYTES, len(signed))]:
        tampered = bytearray(signed)
        tampered[i] ^= 0xFF
        assert _reason(open_peer_record, bytes(tampered), NET) is RejectReason.BAD_SIGNATURE, i


def test_flipped_prelude_byte_is_refused() -> None:
    signed = make_peer_record(ME, NET, 7, ADDRESSES).signed
    for i in range(4):
        tampered = bytearray(signed)
        tampered[i] ^= 0xFF
        assert _reason(open_peer_record, bytes(tampered), NET) is RejectReason.MALFORMED
    tampered = bytearray(signed)
    tampered[4] ^= 0xFF
    assert _reason(open_peer_record, bytes(tampered), NET) is RejectReason.UNSUPPORTED_VERSION
    for i in range(wire.PRELUDE_BYTES, wire.HEAD_OVERHEAD_BYTES):  # the header length
        tampered = bytearray(signed)
        tampered[i] ^= 0xFF
        reason = _reason(open_peer_record, bytes(tampered), NET)
        assert reason in {RejectReason.MALFORMED, RejectReason.TOO_LARGE}, i


def test_truncated_record_is_refused() -> None:
    signed = make_peer_record(ME, NET, 7, ADDRESSES).signed
    assert _reason(open_peer_record, signed[:-1], NET) is RejectReason.MALFORMED
    assert _reason(open_peer_record, signed[:50], NET) is RejectReason.MALFORMED


def test_record_for_another_network_is_wrong_network() -> None:
    signed = make_peer_record(ME, "other-net", 7, ADDRESSES).signed
    assert _reason(open_peer_record, signed, NET) is RejectReason.WRONG_NETWORK


@pytest.mark.parametrize(
    "addresses",
    [
        [],
        [f"tcp://192.0.2.1:{5550 + i}" for i in range(5)],
        ["192.0.2.1:5550"],
        ["tcp://" + "a" * 251],  # 257 bytes
        ["tcp://has space"],
        ["tcp://"],
    ],
    ids=["none", "five", "no-scheme", "over-256-bytes", "space", "empty-host"],
)
def test_make_peer_record_refuses_bad_addresses(addresses: list[str]) -> None:
    with pytest.raises(LocalProtocolError):
        make_peer_record(ME, NET, 1, addresses)


def test_make_peer_record_accepts_the_largest_addresses() -> None:
    addresses = [f"tcp://{i}" + "a" * 239 for i in range(4)]  # 4 addresses of 246 bytes
    record = make_peer_record(ME, NET, 2**63 - 1, addresses)
    assert len(record.signed) <= RecordLimits().max_record_bytes
    assert open_peer_record(record.signed, NET).addresses == tuple(addresses)


@pytest.mark.parametrize("seq", [-1, 2**63, 1.0, True])
def test_make_peer_record_refuses_bad_seq(seq: Any) -> None:
    with pytest.raises(LocalProtocolError):
        make_peer_record(ME, NET, seq, ADDRESSES)


@pytest.mark.parametrize(
    "header",
    [
        _record_header(extra=1),
        {k: v for k, v in _record_header().items() if k != "addresses"},
        {k: v for k, v in _record_header().items() if k != "seq"},
        _record_header(seq="7"),
        _record_header(seq=-1),
        _record_header(seq=1.5),
        _record_header(addresses="tcp://192.0.2.1:5550"),
        _record_header(addresses=[]),
        _record_header(addresses=[5550]),
        _record_header(addresses=["no-scheme"]),
        _record_header(kind="roster"),
    ],
    ids=[
        "extra-key",
        "no-addresses",
        "no-seq",
        "str-seq",
        "negative-seq",
        "float-seq",
        "str-addresses",
        "empty-addresses",
        "int-address",
        "address-without-scheme",
        "wrong-kind",
    ],
)
def test_hand_built_bad_record_is_malformed(header: dict[str, Any]) -> None:
    assert _reason(open_peer_record, _sign(header), NET) is RejectReason.MALFORMED


def test_hand_built_record_checks_out() -> None:
    """The hand-built helper makes records the code accepts: the refusals above are about the change."""
    record = open_peer_record(_sign(_record_header()), NET)
    assert (record.peer, record.seq, record.addresses) == (ME.peer_id, 7, ("tcp://192.0.2.1:5550",))


def test_record_with_a_payload_is_malformed() -> None:
    assert _reason(open_peer_record, _sign(_record_header(), payload=b"x"), NET) is RejectReason.MALFORMED


def test_record_over_max_record_bytes_is_too_large() -> None:
    most = RecordLimits().max_record_bytes
    header = _record_header(addresses=["tcp://192.0.2.1:5550"], pad="a" * most)
    signed = _sign(header)
    assert len(signed) > most
    assert _reason(open_peer_record, signed, NET) is RejectReason.TOO_LARGE


def test_record_limits_are_the_receivers_choice() -> None:
    signed = make_peer_record(ME, NET, 1, ADDRESSES).signed
    tight = RecordLimits(max_addresses=1)
    assert _reason(open_peer_record, signed, NET, tight) is RejectReason.MALFORMED
    small = RecordLimits(max_record_bytes=len(signed) - 1)
    assert _reason(open_peer_record, signed, NET, small) is RejectReason.TOO_LARGE


# --------------------------------------------------------------------- rosters


def _roster(
    signer: Identity, version: int, *, admins: Sequence[Identity], members: Sequence[Identity] = ()
) -> RosterDocument:
    return make_roster_document(
        signer,
        network=NET,
        version=version,
        members=[m.peer_id for m in members],
        admins=[a.peer_id for a in admins],
    )


def test_roster_document_round_trips() -> None:
    doc = make_roster_document(
        ADMIN, network=NET, version=5, members=[MEMBER.peer_id, ME.peer_id], admins=[ADMIN.peer_id], open=True
    )
    opened = open_roster_document(doc.signed, NET)
    assert opened == doc
    assert opened.members == {MEMBER.peer_id, ME.peer_id} and opened.admins == {ADMIN.peer_id}
    assert (opened.version, opened.open, opened.signer, opened.network) == (5, True, ADMIN.peer_id, NET)


def test_roster_for_another_network_is_wrong_network() -> None:
    doc = make_roster_document(ADMIN, network="other", version=1, members=[], admins=[ADMIN.peer_id])
    assert _reason(open_roster_document, doc.signed, NET) is RejectReason.WRONG_NETWORK


def test_roster_with_flipped_header_byte_is_a_bad_signature() -> None:
    doc = _roster(ADMIN, 1, admins=[ADMIN], members=[MEMBER])
    tampered = bytearray(doc.signed)
    tampered[-1] ^= 0x01
    assert _reason(open_roster_document, bytes(tampered), NET) is RejectReason.BAD_SIGNATURE


def test_peer_record_is_not_a_roster_and_back() -> None:
    record = make_peer_record(ME, NET, 1, ADDRESSES)
    doc = _roster(ADMIN, 1, admins=[ADMIN])
    assert _reason(open_roster_document, record.signed, NET) is RejectReason.MALFORMED
    assert _reason(open_peer_record, doc.signed, NET) is RejectReason.MALFORMED


def test_higher_version_signed_by_a_current_admin_is_newer() -> None:
    current = _roster(ADMIN, 1, admins=[ADMIN, OTHER_ADMIN], members=[MEMBER])
    assert newer_roster(current, _roster(OTHER_ADMIN, 2, admins=[OTHER_ADMIN]))
    assert newer_roster(current, _roster(ADMIN, 9, admins=[ADMIN]))


def test_equal_or_lower_version_is_not_newer() -> None:
    current = _roster(ADMIN, 5, admins=[ADMIN])
    assert newer_roster(current, _roster(ADMIN, 5, admins=[ADMIN], members=[MEMBER])) is False
    assert newer_roster(current, _roster(ADMIN, 4, admins=[ADMIN])) is False
    # not newer comes first: a stale document by anyone is merely ignored
    assert newer_roster(current, _roster(STRANGER, 3, admins=[STRANGER])) is False


def test_higher_version_signed_by_a_member_is_unknown_sender() -> None:
    current = _roster(ADMIN, 1, admins=[ADMIN], members=[MEMBER])
    promoted = _roster(MEMBER, 2, admins=[MEMBER], members=[MEMBER])
    with pytest.raises(UnknownSender) as info:
        newer_roster(current, promoted)
    assert info.value.reason is RejectReason.UNKNOWN_SENDER


def test_demoted_admin_cannot_sign_after_its_removal_is_adopted() -> None:
    v1 = _roster(ADMIN, 1, admins=[ADMIN, OTHER_ADMIN])
    v2 = _roster(ADMIN, 2, admins=[ADMIN], members=[OTHER_ADMIN])
    assert newer_roster(v1, v2)
    v3 = _roster(OTHER_ADMIN, 3, admins=[OTHER_ADMIN])
    assert newer_roster(v1, v3)  # against version 1 it was still an admin ...
    with pytest.raises(UnknownSender):
        newer_roster(v2, v3)  # ... but not once version 2 is held


def test_roster_admits_members_and_admins_only_unless_open() -> None:
    closed = _roster(ADMIN, 1, admins=[ADMIN], members=[MEMBER])
    assert closed.admits(MEMBER.peer_id) and closed.admits(ADMIN.peer_id)
    assert not closed.admits(STRANGER.peer_id)
    opened = make_roster_document(
        ADMIN, network=NET, version=2, members=[], admins=[ADMIN.peer_id], open=True
    )
    assert opened.admits(STRANGER.peer_id) and opened.admits(ADMIN.peer_id)


def _roster_header(**changes: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "kind": "roster", "network": NET, "version": 2,
        "members": [MEMBER.peer_id.key], "admins": [ADMIN.peer_id.key], "open": False,
    }  # fmt: skip
    header.update(changes)
    return header


def test_hand_built_roster_checks_out() -> None:
    doc = open_roster_document(_sign(_roster_header(), ADMIN), NET)
    assert doc.members == {MEMBER.peer_id} and doc.admins == {ADMIN.peer_id}
    assert doc.signer == ADMIN.peer_id


@pytest.mark.parametrize(
    "header",
    [
        _roster_header(members=[MEMBER.peer_id.key, MEMBER.peer_id.key]),
        _roster_header(admins=[ADMIN.peer_id.key, ADMIN.peer_id.key]),
        _roster_header(members=[MEMBER.peer_id.key[:31]]),
        _roster_header(admins=[ADMIN.peer_id.key + b"\x00"]),
        _roster_header(members=[MEMBER.peer_id.hex]),
        _roster_header(members=MEMBER.peer_id.key),
        _roster_header(open=1),
        _roster_header(version=-1),
        _roster_header(version="2"),
        _roster_header(extra=True),
        {k: v for k, v in _roster_header().items() if k != "open"},
    ],
    ids=[
        "repeated-member",
        "repeated-admin",
        "member-key-31-bytes",
        "admin-key-33-bytes",
        "member-key-as-hex-str",
        "members-not-a-list",
        "open-an-int",
        "negative-version",
        "str-version",
        "extra-key",
        "no-open",
    ],
)
def test_hand_built_bad_roster_is_malformed(header: dict[str, Any]) -> None:
    assert _reason(open_roster_document, _sign(header, ADMIN), NET) is RejectReason.MALFORMED


def test_roster_over_its_limits_is_refused() -> None:
    doc = _roster(ADMIN, 1, admins=[ADMIN, OTHER_ADMIN], members=[MEMBER, ME])
    assert (
        _reason(open_roster_document, doc.signed, NET, RecordLimits(max_admins=1)) is RejectReason.MALFORMED
    )
    assert (
        _reason(open_roster_document, doc.signed, NET, RecordLimits(max_members=1)) is RejectReason.MALFORMED
    )


def test_make_roster_document_refuses_bad_version() -> None:
    for version in (-1, 2**63):
        with pytest.raises(LocalProtocolError):
            make_roster_document(ADMIN, network=NET, version=version, members=[], admins=[ADMIN.peer_id])


def test_make_roster_document_refuses_too_many_admins() -> None:
    admins = [PeerId(bytes([i]) * 32) for i in range(RecordLimits().max_admins + 1)]
    with pytest.raises(LocalProtocolError):
        make_roster_document(ADMIN, network=NET, version=1, members=[], admins=admins)


# ------------------------------------------------------------------ unpack_map


def test_unpack_map_reads_a_map() -> None:
    assert unpack_map(msgpack.packb({"a": 1, "b": b"x"}, use_bin_type=True), 64) == {"a": 1, "b": b"x"}


def test_unpack_map_refuses_a_repeated_key() -> None:
    data = b"\x82" + msgpack.packb("a") + msgpack.packb(1) + msgpack.packb("a") + msgpack.packb(2)
    assert _reason(unpack_map, data, 64) is RejectReason.MALFORMED


def test_unpack_map_refuses_input_over_max_bytes() -> None:
    data = msgpack.packb({"a": 1})
    assert unpack_map(data, len(data)) == {"a": 1}
    assert _reason(unpack_map, data, len(data) - 1) is RejectReason.MALFORMED


@pytest.mark.parametrize(
    "data",
    [msgpack.packb([1, 2]), msgpack.packb({1: 2}), msgpack.packb({"a": 1}) + b"\x00", b"\xc1", b""],
    ids=["array", "int-key", "trailing-bytes", "reserved-byte", "empty"],
)
def test_unpack_map_refuses_what_is_not_one_str_keyed_map(data: bytes) -> None:
    assert _reason(unpack_map, data, 64) is RejectReason.MALFORMED
