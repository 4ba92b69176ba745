"""p2pfm.core.wire, version 2: one signed buffer per message (docs/protocol.md sections 1-6)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from typing import Any

import blake3
import msgpack
import nacl.signing
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfm.core import codec, wire
from p2pfm.core.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    RejectReason,
    RemoteProtocolError,
    UnknownSender,
    UnsupportedVersion,
)
from p2pfm.core.identity import Identity
from p2pfm.core.wire import ProofHeader, TensorSpec, Unsigned, UpdateHeader, WireLimits

ALICE = Identity(bytes([1]) * 32)
BOB = Identity(bytes([2]) * 32)
LIMITS = WireLimits()
FP = bytes(range(32))
MAX_INT = 2**63 - 1
MAX_DIM = 2**31 - 1
HEAD = 105  # prelude (101) + u32le header length
UPDATE_KEYS = [
    "kind",
    "network",
    "round",
    "seq",
    "ts_ms",
    "fingerprint",
    "degree",
    "samples",
    "tensors",
    "payload",
]
PAYLOAD = b"\0" * 8  # what _header()'s single tensor ["t", "float32", [2]] needs


def _update(tensors: dict[str, np.ndarray[Any, Any]] | None = None, **fields: Any) -> Unsigned:
    base: dict[str, Any] = dict(
        network="net", round=3, seq=7, ts_ms=1_700_000_000_000, fingerprint=FP, degree=2, samples=64
    )
    base.update(fields)
    if tensors is None:
        tensors = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3)}
    return wire.encode_update(tensors=tensors, **base)


def _signed(identity: Identity = ALICE, **kw: Any) -> bytes:
    return wire.sign(_update(**kw), identity)


def _header_len(message: bytes) -> int:
    return int(struct.unpack_from("<I", message, 101)[0])


def _head(message: bytes) -> bytes:
    """message[0 : 105 + H]: the signed head, as equivocation evidence carries it."""
    return message[: HEAD + _header_len(message)]


def _header(**override: Any) -> bytes:
    header: dict[str, Any] = {
        "kind": "update", "network": "net", "round": 1, "seq": 1, "ts_ms": 0, "fingerprint": FP,
        "degree": 1, "samples": 1, "tensors": [["t", "float32", [2]]],
        "payload": blake3.blake3(PAYLOAD).digest(),
    }  # fmt: skip
    header.update(override)
    return msgpack.packb(header, use_bin_type=True)


def _mallory(header: bytes, payload: bytes = PAYLOAD, identity: Identity = ALICE) -> bytes:
    """A validly signed message with arbitrary header and payload bytes (an insider gone bad)."""
    return wire.sign(Unsigned(header, (payload,)), identity)


def _decode_header(message: bytes, limits: WireLimits = LIMITS) -> UpdateHeader | ProofHeader:
    return wire.decode_header(wire.verify(message, limits), limits)


def _with_header_len(message: bytes, length: int) -> bytes:
    """The same bytes with another header length written in (the signature is not redone)."""
    return message[:101] + struct.pack("<I", length) + message[HEAD:]


class _Unhashable:
    """Stands in for the blake3 module: any hashing fails the test."""

    @staticmethod
    def blake3(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the message was hashed before a bound refused it")


@contextlib.contextmanager
def _no_hashing() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(wire, "blake3", _Unhashable)
        yield


def _raw_map(pairs: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map built by hand from already-encoded values: repeats and odd encodings allowed."""
    assert len(pairs) <= 15
    return bytes([0x80 | len(pairs)]) + b"".join(msgpack.packb(k) + v for k, v in pairs)


def _raw_fields(**override: Any) -> list[tuple[str, bytes]]:
    """The ten entries of _header(), each value encoded on its own."""
    header = msgpack.unpackb(_header(**override))
    return [(key, msgpack.packb(value, use_bin_type=True)) for key, value in header.items()]


# ----------------------------------------------------------------- layout


def test_message_layout_follows_the_spec() -> None:
    """prelude | u32le H | header | payload, the signature over BLAKE3(message[0:37] | message[101:105+H])."""
    a = np.arange(3, dtype=np.float32)
    b = np.array([[1, -2], [3, -4]], dtype=np.int8)
    message = _signed(tensors={"a": a, "b": b})
    assert message[:4] == b"P2FM" and message[4] == 2 and message[5:37] == ALICE.peer_id.key
    length = _header_len(message)
    header = msgpack.unpackb(message[HEAD : HEAD + length])
    assert list(header) == UPDATE_KEYS  # writers emit the documented order
    assert header["tensors"] == [["a", "float32", [3]], ["b", "int8", [2, 2]]]
    payload = message[HEAD + length :]
    assert payload == a.tobytes() + b.tobytes()  # header order, no padding
    assert header["payload"] == blake3.blake3(payload).digest()
    digest = blake3.blake3(message[:37] + message[101 : HEAD + length]).digest()
    nacl.signing.VerifyKey(message[5:37]).verify(digest, message[37:101])  # raises if wrong
    assert wire.message_bytes(message) == len(message)


def test_header_uses_the_smallest_encodings() -> None:
    raw = _update(round=5, seq=200, ts_ms=70_000, samples=2**40, degree=0).header
    assert raw[0] == 0x8A  # fixmap of 10
    assert b"\xa5round\x05" in raw  # positive fixint
    assert b"\xa3seq\xcc\xc8" in raw  # uint 8
    assert b"\xa5ts_ms\xce\x00\x01\x11\x70" in raw  # uint 32
    assert b"\xa7samples\xcf\x00\x00\x01\x00\x00\x00\x00\x00" in raw  # uint 64
    assert b"\xa6degree\x00" in raw
    assert b"\xabfingerprint\xc4\x20" + FP in raw  # bin 8, not str


# ----------------------------------------------------------------- round trip

_dtypes = st.sampled_from(["float32", "float16", "float64", "int8", "uint8", "int32", "int64"])
_names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)


@st.composite
def _tensor_dicts(draw: st.DrawFn) -> dict[str, np.ndarray[Any, Any]]:
    names = draw(st.lists(_names, min_size=0, max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = np.dtype(draw(_dtypes))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
        out[name] = draw(hnp.arrays(dtype, shape))
    return out


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=_tensor_dicts(),
    round_=st.integers(0, MAX_INT),
    seq=st.integers(0, MAX_INT),
    ts_ms=st.integers(0, MAX_INT),
    degree=st.integers(0, MAX_DIM),
    samples=st.integers(0, MAX_INT),
    network=st.text(min_size=1, max_size=16),
)
def test_round_trip(
    tensors: dict[str, np.ndarray[Any, Any]],
    round_: int,
    seq: int,
    ts_ms: int,
    degree: int,
    samples: int,
    network: str,
) -> None:
    body = wire.encode_update(
        network=network, round=round_, seq=seq, ts_ms=ts_ms, fingerprint=FP,
        degree=degree, samples=samples, tensors=tensors,
    )  # fmt: skip
    message = wire.sign(body, ALICE)
    assert isinstance(message, bytes)
    update = wire.open_update(message, LIMITS)
    assert update.sender == ALICE.peer_id
    assert (update.network, update.round, update.seq, update.ts_ms) == (network, round_, seq, ts_ms)
    assert (update.degree, update.samples, update.fingerprint) == (degree, samples, FP)
    assert list(update.tensors) == list(tensors)
    for name, array in tensors.items():
        got = update.tensors[name]
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert not got.flags.writeable
    assert update.wire_bytes == wire.message_bytes(message) == len(message)


_EXTREMES: dict[str, list[Any]] = {
    "float32": [0.0, -0.0, 1.5, np.finfo(np.float32).max, np.finfo(np.float32).tiny, -np.inf, np.nan],
    "float16": [0.0, -1.0, 65504.0, 6e-8, np.inf],
    "float64": [np.finfo(np.float64).max, -np.finfo(np.float64).tiny, np.pi],
    "int8": [-128, 0, 127],
    "uint8": [0, 1, 255],
    "int32": [-(2**31), 0, 2**31 - 1],
    "int64": [-(2**63), 0, 2**63 - 1],
}


@pytest.mark.parametrize("dtype", sorted(wire.DTYPES))
def test_every_dtype_round_trips(dtype: str) -> None:
    if dtype == "bfloat16":  # travels as the upper half of a float32, decodes to float32
        values = np.array([1.0, -0.5, 3.0, -np.inf, 2.0**-126], dtype=np.float32)
        message = wire.sign(_update({"x": values}, wire_dtypes={"x": "bfloat16"}), ALICE)
        expected = values
    else:
        values = np.array(_EXTREMES[dtype], dtype=wire.DTYPES[dtype])
        message = wire.sign(_update({"x": values.reshape(1, -1)}), ALICE)
        expected = values.reshape(1, -1)
    update = wire.open_update(message, LIMITS)
    assert update.specs[0].dtype == dtype
    got = update.tensors["x"]
    assert got.dtype == (np.float32 if dtype == "bfloat16" else expected.dtype)
    np.testing.assert_array_equal(got, expected)  # NaN == NaN here
    assert len(message) - HEAD - _header_len(message) == values.size * wire.DTYPES[dtype].itemsize


def test_bfloat16_round_trip_rounds_to_nearest() -> None:
    values = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0, np.inf, -np.inf], dtype=np.float32)
    full = wire.sign(_update({"w": values}), ALICE)
    half = wire.sign(_update({"w": values}, wire_dtypes={"w": "bfloat16"}), ALICE)
    update = wire.open_update(half, LIMITS)
    assert update.specs[0].dtype == "bfloat16"
    got = update.tensors["w"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, values, rtol=2**-8)
    assert got[0] == 1.0 and got[1] == -2.5 and np.isinf(got[5])
    payload = len(half) - HEAD - _header_len(half)
    assert payload == 2 * values.size == (len(full) - HEAD - _header_len(full)) // 2
    nan = wire.float32_to_bfloat16_bits(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(wire.bfloat16_bits_to_float32(nan)).all()


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        (0x3F808000, 0x3F80),  # exactly half way, upper half even: down
        (0x3F818000, 0x3F82),  # exactly half way, upper half odd: up
        (0x3F808001, 0x3F81),  # above half way: up
        (0x3F807FFF, 0x3F80),  # below half way: down
        (0xBF818000, 0xBF82),  # sign does not matter
        (0x7F7FFFFF, 0x7F80),  # float32 max rounds to +inf
        (0x00000001, 0x0000),  # smallest subnormal rounds to +0
        (0x7FC00001, 0x7FC0),  # NaN stays a NaN
        (0x7FFFFFFF, 0x7FC0),  # a NaN that rounding would carry out of the NaN range
    ],
)
def test_bfloat16_ties_to_even(bits: int, expected: int) -> None:
    value = np.array([bits], dtype="<u4").view("<f4")
    assert int(wire.float32_to_bfloat16_bits(value)[0]) == expected


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),  # scalars: test_a_bfloat16_scalar_round_trips
        elements=st.floats(width=32, allow_nan=False, allow_subnormal=False),
    )
)
def test_bfloat16_matches_torch(values: np.ndarray[Any, Any]) -> None:
    torch = pytest.importorskip("torch")
    expected = torch.from_numpy(values.copy()).to(torch.bfloat16).to(torch.float32).numpy()
    update = wire.open_update(wire.sign(_update({"w": values}, wire_dtypes={"w": "bfloat16"}), ALICE), LIMITS)
    np.testing.assert_array_equal(update.tensors["w"], expected)
    assert update.tensors["w"].shape == values.shape


def test_a_bfloat16_scalar_round_trips() -> None:
    message = wire.sign(_update({"s": np.float32(1.5).reshape(())}, wire_dtypes={"s": "bfloat16"}), ALICE)
    update = wire.open_update(message, LIMITS)
    assert update.tensors["s"].shape == () and float(update.tensors["s"]) == 1.5


def test_decoded_arrays_are_views_of_the_message() -> None:
    message = _signed(tensors={"big": np.ones(1 << 16, dtype=np.float32)})
    update = wire.open_update(message, LIMITS)
    assert np.shares_memory(update.tensors["big"], np.frombuffer(message, dtype=np.uint8))


def test_tensors_may_be_unaligned() -> None:
    tensors = {"b": np.array([7], dtype=np.uint8), "f": np.array([1.5, -2.0], dtype=np.float64)}
    message = _signed(tensors=tensors)
    start = HEAD + _header_len(message)
    assert message[start + 1 : start + 17] == tensors["f"].tobytes()  # no padding after one byte
    update = wire.open_update(bytearray(message), LIMITS)  # any buffer type
    np.testing.assert_array_equal(update.tensors["f"], tensors["f"])
    assert wire.open_update(memoryview(message), LIMITS).tensors["b"].tolist() == [7]


def test_big_endian_input_travels_little_endian() -> None:
    big = np.arange(4, dtype=">f4")
    message = _signed(tensors={"b": big})
    assert message[HEAD + _header_len(message) :] == np.arange(4, dtype="<f4").tobytes()
    np.testing.assert_array_equal(wire.open_update(message, LIMITS).tensors["b"], big)


def test_a_header_in_any_key_order_and_wider_encodings_is_accepted() -> None:
    """Writers use the smallest encoding (docs/protocol.md 4.1); readers accept any valid one."""
    fields = dict(_raw_fields(round=5, degree=2))
    fields["round"] = b"\xcf" + (5).to_bytes(8, "big")  # uint 64
    fields["degree"] = b"\xd3" + (2).to_bytes(8, "big")  # int 64
    fields["network"] = b"\xd9\x03net"  # str 8
    fields["fingerprint"] = b"\xc5\x00\x20" + FP  # bin 16
    pairs = list(reversed(fields.items()))
    header = _decode_header(_mallory(_raw_map(pairs)))
    assert isinstance(header, UpdateHeader)
    assert (header.round, header.degree, header.network, header.fingerprint) == (5, 2, "net", FP)


# ----------------------------------------------------------------- tampering


def test_every_single_bit_flip_is_rejected() -> None:
    """Exhaustive: a flip in the head fails verify(), a flip in the payload fails decode_payload()."""
    message = _signed(tensors={"a": np.arange(3, dtype=np.float32)})
    head_end = HEAD + _header_len(message)
    flips = 0
    for bit in range(len(message) * 8):
        offset = bit // 8
        mutated = bytearray(message)
        mutated[offset] ^= 1 << (bit % 8)
        if offset < head_end:
            with pytest.raises(RemoteProtocolError) as info:
                wire.verify(mutated, LIMITS)
            if offset < 4:
                assert isinstance(info.value, MalformedMessage)  # magic
            elif offset == 4:
                assert isinstance(info.value, UnsupportedVersion)
            elif not 101 <= offset < HEAD:  # the header length may also become out of bounds
                assert isinstance(info.value, BadSignature), offset
                assert info.value.reason is RejectReason.BAD_SIGNATURE
        else:
            verified = wire.verify(mutated, LIMITS)
            header = wire.decode_header(verified, LIMITS)
            assert isinstance(header, UpdateHeader)
            with pytest.raises(BadSignature):
                wire.decode_payload(verified, header)
        flips += 1
    assert flips == 8 * len(message) and head_end < len(message)


def test_key_substitution_is_a_bad_signature() -> None:
    message = bytearray(_signed())
    message[5:37] = BOB.peer_id.key  # claim Bob sent Alice's bytes
    with pytest.raises(BadSignature):
        wire.verify(message, LIMITS)


def test_moving_the_header_boundary_is_rejected() -> None:
    message = _signed(tensors={"a": np.arange(4, dtype=np.float32), "b": np.arange(4, dtype=np.float32)})
    length = _header_len(message)
    with pytest.raises(BadSignature):  # 4 payload bytes read as header: H is signed
        wire.verify(_with_header_len(message, length + 4), LIMITS)
    with pytest.raises(BadSignature):
        wire.verify(_with_header_len(message, length - 1), LIMITS)


def test_payload_is_bound_by_the_signed_digest() -> None:
    one = _signed(tensors={"a": np.arange(4, dtype=np.float32), "b": np.zeros(4, dtype=np.float32)})
    two = _signed(tensors={"a": np.ones(4, dtype=np.float32), "b": np.zeros(4, dtype=np.float32)})
    split = HEAD + _header_len(one)
    assert split == HEAD + _header_len(two)
    for message in (
        one[:split] + two[split:],  # another (validly signed) update's payload under this head
        one[:split] + one[split + 16 :] + one[split : split + 16],  # the tensors swapped
    ):
        verified = wire.verify(message, LIMITS)  # the head is intact
        header = wire.decode_header(verified, LIMITS)
        assert isinstance(header, UpdateHeader)
        with pytest.raises(BadSignature) as info:
            wire.decode_payload(verified, header)
        assert info.value.reason is RejectReason.BAD_SIGNATURE
    for message in (one[:-1], one + b"\0"):  # truncated or extended payload
        with pytest.raises(MalformedMessage):
            wire.open_update(message, LIMITS)


def test_unknown_sender_is_refused_before_hashing() -> None:
    message = _signed()
    with _no_hashing(), pytest.raises(UnknownSender) as info:
        wire.verify(message, LIMITS, known_senders={BOB.peer_id})
    assert info.value.reason is RejectReason.UNKNOWN_SENDER
    assert wire.verify(message, LIMITS, known_senders={ALICE.peer_id}).sender == ALICE.peer_id


@pytest.mark.parametrize("version", [0, 1, 3, 255])
def test_other_versions_are_unsupported(version: int) -> None:
    message = _signed()
    with _no_hashing(), pytest.raises(UnsupportedVersion) as info:
        wire.verify(message[:4] + bytes([version]) + message[5:], LIMITS)
    assert info.value.reason is RejectReason.UNSUPPORTED_VERSION


def test_bad_magic_and_short_messages_are_malformed() -> None:
    message = _signed()
    for bad in (b"XXXX" + message[4:], message[: HEAD - 1], message[:101], b"", b"P2FM"):
        with _no_hashing(), pytest.raises(MalformedMessage):
            wire.verify(bad, LIMITS)


# ----------------------------------------------------------------- size bounds


def test_oversized_message_is_refused_before_hashing() -> None:
    message = _signed(tensors={"a": np.zeros(1000, dtype=np.float32)})
    with _no_hashing(), pytest.raises(MessageTooLarge) as info:
        wire.verify(message, WireLimits(max_message_bytes=len(message) - 1))
    assert info.value.reason is RejectReason.TOO_LARGE
    assert wire.verify(message, WireLimits(max_message_bytes=len(message))).wire_bytes == len(message)


def test_header_length_beyond_the_bound_is_too_large_before_hashing() -> None:
    message = _signed()
    bound = max(LIMITS.max_header_bytes, LIMITS.max_proof_header_bytes)
    assert bound == LIMITS.max_proof_header_bytes == 2 * (HEAD + LIMITS.max_header_bytes) + 256 + 64
    for length in (bound + 1, 2**32 - 1):
        with _no_hashing(), pytest.raises(MessageTooLarge):
            wire.verify(_with_header_len(message, length), LIMITS)


def test_header_length_beyond_the_message_is_malformed_before_hashing() -> None:
    message = _signed()
    room = len(message) - HEAD
    for length in (0, room + 1, LIMITS.max_proof_header_bytes):
        with _no_hashing(), pytest.raises(MalformedMessage):
            wire.verify(_with_header_len(message, length), LIMITS)
    with pytest.raises(BadSignature):  # H = everything after the prelude fits: on to the signature
        wire.verify(_with_header_len(message, room), LIMITS)


def test_update_header_above_max_header_bytes_is_too_large() -> None:
    """verify() allows a proof's bigger header; decode_header() holds updates to max_header_bytes."""
    limits = WireLimits(max_header_bytes=120)
    message = _mallory(_header(network="n" * 60))
    assert 120 < _header_len(message) <= limits.max_proof_header_bytes
    verified = wire.verify(message, limits)
    with pytest.raises(MessageTooLarge):
        wire.decode_header(verified, limits)
    assert isinstance(wire.decode_header(verified, LIMITS), UpdateHeader)


def _entries(count: int) -> list[list[Any]]:
    return [[f"t{i}", "float32", [1]] for i in range(count)]


@pytest.mark.parametrize(
    ("limits", "count"),
    [
        (WireLimits(max_tensors=2), 3),  # caught by the header check
        (WireLimits(max_tensors=2), 9),  # caught by the parser's array bound, max(max_tensors, max_ndim, 3)
        (LIMITS, LIMITS.max_tensors + 1),
    ],
)
def test_too_many_tensors_are_malformed(limits: WireLimits, count: int) -> None:
    message = _mallory(_header(tensors=_entries(count)), b"")
    with pytest.raises(MalformedMessage) as info:
        _decode_header(message, limits)
    assert info.value.reason is RejectReason.MALFORMED
    header = _decode_header(_mallory(_header(tensors=_entries(limits.max_tensors)), b""), limits)
    assert isinstance(header, UpdateHeader) and len(header.specs) == limits.max_tensors


@pytest.mark.parametrize(
    "shape",
    [
        [2**31 - 1, 2**31 - 1, 2**31 - 1],
        [0, 2**31 - 1, 2**31 - 1, 2**31 - 1],  # found by fuzz/fuzz_messages.py: a zero hid the rest
        [2**31 - 1, 0, 2**31 - 1],
        [2**14, 2**14 + 1],  # one element over max_tensor_elements = 2**28
        [0, 2**28, 2],
    ],
)
def test_huge_shape_with_little_data_is_refused_before_allocating(shape: list[int]) -> None:
    message = _mallory(_header(tensors=[["t", "float32", shape]]), b"")
    with pytest.raises(MessageTooLarge) as info:
        _decode_header(message)  # the payload is never looked at
    assert info.value.reason is RejectReason.TOO_LARGE
    with pytest.raises(MessageTooLarge):
        wire.open_update(message, LIMITS)


@pytest.mark.parametrize("shape", [[2**14, 2**14], [0, 2**28], [1] * 8, [], [0]])
def test_shapes_at_the_bounds_are_accepted(shape: list[int]) -> None:
    header = _decode_header(_mallory(_header(tensors=[["t", "float32", shape]]), b""))
    assert isinstance(header, UpdateHeader) and header.specs[0].shape == tuple(shape)


@pytest.mark.parametrize(
    ("limits", "name", "ok"),
    [
        (LIMITS, "n" * 256, True),
        (LIMITS, "n" * 257, False),  # above the parser's string bound
        (LIMITS, "é" * 128, True),  # 256 UTF-8 bytes
        (LIMITS, "é" * 129, False),  # 129 characters, 258 bytes: bytes count
        (WireLimits(max_name_bytes=8), "n" * 9, False),  # below the parser's bound, caught by the check
    ],
)
def test_tensor_name_length_bound(limits: WireLimits, name: str, ok: bool) -> None:
    message = _mallory(_header(tensors=[[name, "float32", [2]]]), b"")
    if ok:
        assert isinstance(_decode_header(message, limits), UpdateHeader)
    else:
        with pytest.raises(MalformedMessage):
            _decode_header(message, limits)


@pytest.mark.parametrize(
    ("network", "ok"), [("n" * 64, True), ("n" * 65, False), ("é" * 32, True), ("é" * 33, False), ("", False)]
)
def test_network_id_length_bound(network: str, ok: bool) -> None:
    message = _mallory(_header(network=network), b"")
    if ok:
        header = _decode_header(message)
        assert isinstance(header, UpdateHeader) and header.network == network
    else:
        with pytest.raises(MalformedMessage):
            _decode_header(message)


def test_ndim_bound() -> None:
    assert isinstance(_decode_header(_mallory(_header(tensors=[["t", "float32", [1] * 8]]))), UpdateHeader)
    with pytest.raises(MalformedMessage):
        _decode_header(_mallory(_header(tensors=[["t", "float32", [1] * 9]]), b""))
    with pytest.raises(MalformedMessage):
        _decode_header(_mallory(_header(tensors=[["t", "float32", [1] * 3]]), b""), WireLimits(max_ndim=2))


@pytest.mark.parametrize(("allowed", "dtype"), [(frozenset({"float32"}), "float16"), (None, "complex64")])
def test_dtype_not_allowed(allowed: frozenset[str] | None, dtype: str) -> None:
    limits = LIMITS if allowed is None else WireLimits(dtypes=allowed)
    with pytest.raises(MalformedMessage):
        _decode_header(_mallory(_header(tensors=[["t", dtype, [2]]]), b""), limits)
    assert isinstance(_decode_header(_mallory(_header()), limits), UpdateHeader)


# ----------------------------------------------------------------- malformed


def test_a_repeated_header_key_is_refused() -> None:
    """Issue 9 item 10: a map that names "round" twice; a last-wins parser would take round 2."""
    fields = _raw_fields(round=1)
    at = [key for key, _ in fields].index("round")
    pairs = [*fields[: at + 1], ("round", msgpack.packb(2)), *fields[at + 1 :]]
    raw = _raw_map(pairs)
    assert raw[0] == 0x8B and len(pairs) == 11  # a map header declaring 11 entries
    last_wins = msgpack.unpackb(raw)
    assert sorted(last_wins) == sorted(UPDATE_KEYS) and last_wins["round"] == 2
    message = _mallory(raw)
    verified = wire.verify(message, LIMITS)  # the signature is valid: the signer is the culprit
    with pytest.raises(MalformedMessage) as info:
        wire.decode_header(verified, LIMITS)
    assert info.value.reason is RejectReason.MALFORMED


def test_a_repeated_key_is_all_that_is_wrong_with_that_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """With version 1's dict-last-wins map parsing, the same bytes would decode as round 2."""
    fields = _raw_fields(round=1)
    raw = _raw_map([*fields, ("round", msgpack.packb(2))])
    monkeypatch.setattr(wire, "unique_keys", dict)
    header = _decode_header(_mallory(raw))
    assert isinstance(header, UpdateHeader) and header.round == 2


@pytest.mark.parametrize(
    "header",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01\x02",  # a list, not a map
        msgpack.packb({"kind": "update"}),  # missing keys
        _header(extra=1),
        _header(kind="hello"),
        _header(kind=b"update"),  # bin, not str
        _header(kind="equivocation"),  # an update's keys under the proof's kind
        _header(round=True),  # bool is not int
        _header(round=-1),
        _header(round=2**63),
        _header(seq=1.5),
        _header(seq=1.0),  # an integral float is still not an int
        _header(samples=None),
        _header(degree=2**31),
        _header(network=""),
        _header(network=b"bytes"),
        _header(fingerprint=b"short"),
        _header(fingerprint=b"x" * 33),
        _header(fingerprint="x" * 32),
        _header(payload=b"x" * 31),
        _header(payload="x" * 32),
        _header(tensors=[["t", "complex64", [2]]]),
        _header(tensors=[["t", "float32", [-2]]]),
        _header(tensors=[["t", "float32", [2**31]]]),
        _header(tensors=[["t", "float32", [True]]]),
        _header(tensors=[["t", "float32", [3]]]),  # 12 bytes expected, 8 sent
        _header(tensors=[["t", "float32"]]),
        _header(tensors=[["", "float32", [2]]]),
        _header(tensors=[[b"t", "float32", [2]]]),
        _header(tensors=[["t", "float32", 2]]),
        _header(tensors=[["t", "float32", [1] * 9]]),
        _header(tensors=[["t", "float32", [1]], ["t", "float32", [1]]]),
        _header(tensors=[]),  # 8 payload bytes but no tensor
        _header(tensors="nope"),
        msgpack.packb({1: 2}),  # non-string keys
        msgpack.packb({b"kind": "update"}),  # bin keys
        b"\x91" * 5000,  # deep nesting
        msgpack.packb({"kind": msgpack.ExtType(1, b"x")}),
        _raw_map([*_raw_fields()[:-1], ("payload", b"\xc7\x00\x05")]),  # an empty ext value
        _header() + b"\x00",  # trailing bytes
        _header()[:-1],  # truncated
        bytes([0xDE, 0x00, 0x11]) + _header()[1:],  # map 16 declaring 17 entries
    ],
)
def test_malformed_but_signed_headers_are_rejected(header: bytes) -> None:
    message = _mallory(header)
    with pytest.raises(RemoteProtocolError) as info:
        wire.open_update(message, LIMITS)
    assert info.value.reason in {RejectReason.MALFORMED, RejectReason.TOO_LARGE}


def test_a_payload_digest_mismatch_is_a_bad_signature() -> None:
    with pytest.raises(BadSignature):
        wire.open_update(_mallory(_header(payload=bytes(32))), LIMITS)
    with pytest.raises(BadSignature):
        wire.open_update(_mallory(_header(), b"\1" * 8), LIMITS)
    assert wire.open_update(_mallory(_header()), LIMITS).tensors["t"].tolist() == [0.0, 0.0]


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        _update(round=-1)
    with pytest.raises(LocalProtocolError):
        _update(degree=2**31)
    with pytest.raises(LocalProtocolError):
        _update(seq=True)
    with pytest.raises(LocalProtocolError):
        _update(fingerprint=b"short")
    with pytest.raises(LocalProtocolError):
        _update(network="")
    with pytest.raises(LocalProtocolError):
        _update(network="n" * 65)
    with pytest.raises(LocalProtocolError):
        _update({"c": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(LocalProtocolError):
        _update({"": np.zeros(2, dtype=np.float32)})
    with pytest.raises(LocalProtocolError):
        _update({"n" * 257: np.zeros(2, dtype=np.float32)})
    with pytest.raises(LocalProtocolError):
        _update({"a": np.zeros(1), "b": np.zeros(1)}, limits=WireLimits(max_tensors=1))
    with pytest.raises(LocalProtocolError):
        _update({"i": np.zeros(2, dtype=np.int32)}, wire_dtypes={"i": "bfloat16"})
    with pytest.raises(LocalProtocolError):
        _update({"i": np.zeros(2, dtype=np.float32)}, wire_dtypes={"i": "float8"})
    with pytest.raises(LocalProtocolError):
        wire.encode_proof(network="net", evidence=(b"a",))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        wire.encode_proof(network="net", evidence=(b"a", "b"))  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        wire.encode_proof(network="", evidence=(b"a", b"b"))


# ----------------------------------------------------------------- equivocation proofs


def _two_heads(**second: Any) -> tuple[bytes, bytes]:
    """Heads of two different updates Alice signed for round 4 (or as ``second`` overrides)."""
    first = _signed(round=4, seq=10)
    other: dict[str, Any] = dict(round=4, seq=11, tensors={"lora_A": np.ones((2, 3), dtype=np.float32)})
    other.update(second)
    identity = other.pop("identity", ALICE)
    return _head(first), _head(_signed(identity, **other))


def test_proof_round_trip_and_valid_evidence() -> None:
    evidence = _two_heads()
    message = wire.sign(wire.encode_proof(network="net", evidence=evidence), BOB)  # Bob relays it
    assert len(message) == HEAD + _header_len(message)  # no payload
    header = _decode_header(message)
    assert isinstance(header, ProofHeader)
    assert list(msgpack.unpackb(message[HEAD:])) == ["kind", "network", "evidence"]
    assert (header.sender, header.network, header.evidence) == (BOB.peer_id, "net", evidence)
    facts = wire.check_evidence(*header.evidence, LIMITS)
    assert (facts.accused, facts.network, facts.round) == (ALICE.peer_id, "net", 4)
    assert facts.fingerprints == (FP, FP)
    assert wire.check_evidence(evidence[1], evidence[0], LIMITS).accused == ALICE.peer_id
    with pytest.raises(MalformedMessage):  # a proof is not an update
        wire.open_update(message, LIMITS)


def test_evidence_reports_both_fingerprints() -> None:
    first, second = _two_heads(fingerprint=bytes(32))
    assert wire.check_evidence(first, second, LIMITS).fingerprints == (FP, bytes(32))


def test_identical_heads_are_no_proof() -> None:
    head = _two_heads()[0]
    with pytest.raises(MalformedMessage):
        wire.check_evidence(head, head, LIMITS)


@pytest.mark.parametrize(
    "second",
    [
        {"identity": BOB},  # two senders
        {"round": 5},  # two rounds
        {"network": "other"},  # two networks
    ],
)
def test_heads_that_differ_in_sender_round_or_network_are_no_proof(second: dict[str, Any]) -> None:
    with pytest.raises(MalformedMessage) as info:
        wire.check_evidence(*_two_heads(**second), LIMITS)
    assert info.value.reason is RejectReason.MALFORMED


def test_a_head_with_its_payload_is_no_proof() -> None:
    first, _ = _two_heads()
    whole = _signed(round=4, seq=11, tensors={"lora_A": np.ones((2, 3), dtype=np.float32)})
    with pytest.raises(MalformedMessage):
        wire.check_evidence(first, whole, LIMITS)
    with pytest.raises(MalformedMessage):
        wire.check_evidence(whole, first, LIMITS)


def test_a_tampered_head_is_no_proof() -> None:
    first, second = _two_heads()
    for offset in (10, 50, 101, HEAD + 3, len(second) - 1):
        tampered = bytearray(second)
        tampered[offset] ^= 0x01
        with pytest.raises(MalformedMessage):
            wire.check_evidence(first, bytes(tampered), LIMITS)
    with pytest.raises(MalformedMessage):
        wire.check_evidence(first, second[:-1], LIMITS)
    with pytest.raises(MalformedMessage):
        wire.check_evidence(first, b"garbage", LIMITS)


def test_a_proof_head_is_no_update_head() -> None:
    first, second = _two_heads()
    proof = wire.sign(wire.encode_proof(network="net", evidence=(first, second)), ALICE)
    with pytest.raises(MalformedMessage):
        wire.check_evidence(first, proof, LIMITS)


def _proof_header(**override: Any) -> bytes:
    header: dict[str, Any] = {"kind": "equivocation", "network": "net", "evidence": list(_two_heads())}
    header.update(override)
    return msgpack.packb(header, use_bin_type=True)


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        (_proof_header(extra=1), b""),
        (_proof_header(round=4), b""),  # an update key in a proof
        (msgpack.packb({"kind": "equivocation", "network": "net"}), b""),
        (_proof_header(), b"x"),  # a proof carries no payload
        (_proof_header(network=""), b""),
        (_proof_header(network="n" * 65), b""),
        (_proof_header(evidence=[b"one"]), b""),
        (_proof_header(evidence=[b"a", b"b", b"c"]), b""),
        (_proof_header(evidence=[b"a", "b"]), b""),
        (_proof_header(evidence=b"ab"), b""),
    ],
)
def test_malformed_proofs_are_rejected(header: bytes, payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        _decode_header(wire.sign(Unsigned(header, (payload,)), BOB))


def test_evidence_longer_than_a_head_is_malformed() -> None:
    limits = WireLimits(max_header_bytes=1000)
    big = b"\0" * (limits.max_head_bytes + 1)
    message = wire.sign(Unsigned(_proof_header(evidence=[big, b"x"])), BOB)
    assert _header_len(message) <= limits.max_proof_header_bytes
    with pytest.raises(MalformedMessage):
        _decode_header(message, limits)


# ----------------------------------------------------------------- derived limits

NETWORK = "p2pfm-testnet"
SCHEMA = (
    TensorSpec("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight", "float32", (8, 96)),
    TensorSpec("base_model.model.encoder.layer.0.attention.self.query.lora_B.weight", "float32", (96, 8)),
    TensorSpec("base_model.model.classifier.weight", "float16", (2, 96)),
    TensorSpec("base_model.model.classifier.bias", "float32", (2,)),
    TensorSpec("base_model.model.step", "int64", ()),
)


def _of_schema(specs: tuple[TensorSpec, ...], identity: Identity = ALICE, **fields: Any) -> bytes:
    """A message of ``specs`` with every integer field at its widest, as limits_for_schema assumes."""
    tensors = {s.name: np.ones(s.shape, dtype=wire.DTYPES[s.dtype]) for s in specs}
    values: dict[str, Any] = dict(
        network=NETWORK, round=MAX_INT, seq=MAX_INT, ts_ms=MAX_INT, fingerprint=b"\xff" * 32,
        degree=MAX_DIM, samples=MAX_INT, tensors=tensors,
    )  # fmt: skip
    values.update(fields)
    return wire.sign(wire.encode_update(**values), identity)


def test_limits_for_schema_fit_the_largest_legitimate_messages() -> None:
    limits = wire.limits_for_schema(SCHEMA, network=NETWORK)
    asking = [Identity(bytes([i]) * 32).peer_id for i in range(limits.max_resync_peers)]
    widest = _of_schema(SCHEMA, base=MAX_INT - 1, resync=asking)  # a chain's difference, asking the most
    assert _header_len(widest) <= limits.max_header_bytes // 2
    assert wire.open_update(widest, limits).resync == tuple(asking)
    message = _of_schema(SCHEMA)
    assert len(message) <= limits.max_message_bytes and _header_len(message) <= limits.max_header_bytes
    update = wire.open_update(message, limits)
    assert update.specs == SCHEMA and update.round == MAX_INT
    assert limits.max_message_bytes < LIMITS.max_message_bytes // 10_000  # far below the default
    assert limits.max_header_bytes < LIMITS.max_header_bytes
    first, second = _head(message), _head(_of_schema(SCHEMA, seq=MAX_INT - 1))
    proof = wire.sign(wire.encode_proof(network=NETWORK, evidence=(first, second)), BOB)
    assert len(proof) <= limits.max_message_bytes
    header = _decode_header(proof, limits)  # a proof of two of the widest heads fits as well
    assert isinstance(header, ProofHeader)
    assert wire.check_evidence(*header.evidence, limits).round == MAX_INT


def test_limits_for_schema_refuse_a_message_one_tensor_bigger() -> None:
    limits = wire.limits_for_schema(SCHEMA, network=NETWORK)
    extra = TensorSpec("base_model.model.extra.lora_A.weight", "float32", (8, 96))
    message = _of_schema((*SCHEMA, extra), round=1, seq=1, ts_ms=1, degree=1, samples=1)
    with _no_hashing(), pytest.raises(MessageTooLarge):
        wire.verify(message, limits)


def test_limits_for_schema_keep_the_other_bounds_and_cap_at_the_base() -> None:
    base = WireLimits(
        max_message_bytes=1000, max_tensors=7, dtypes=frozenset({"float32", "float16", "int64"})
    )
    limits = wire.limits_for_schema(SCHEMA, network=NETWORK, base=base)
    assert limits.max_message_bytes == 1000
    assert (limits.max_tensors, limits.dtypes, limits.max_ndim) == (7, base.dtypes, base.max_ndim)


def test_limits_for_schema_of_a_bfloat16_schema() -> None:
    schema = tuple(TensorSpec(s.name, "bfloat16", s.shape) for s in SCHEMA if s.dtype == "float32")
    limits = wire.limits_for_schema(schema, network=NETWORK)
    values = {s.name: np.ones(s.shape, dtype=np.float32) for s in schema}
    message = wire.sign(
        wire.encode_update(
            network=NETWORK, round=MAX_INT, seq=MAX_INT, ts_ms=MAX_INT, fingerprint=FP, degree=MAX_DIM,
            samples=MAX_INT, tensors=values, wire_dtypes={name: "bfloat16" for name in values},
        ),
        ALICE,
    )  # fmt: skip
    assert wire.open_update(message, limits).specs == schema


# ----------------------------------------------------------------- lossy encodings (codec.py)


def test_wire_dtypes_are_the_eight_raw_ones_and_the_lossy_encodings() -> None:
    in_order = (*wire.DTYPES, *codec.ENCODINGS)
    assert in_order == wire.WIRE_DTYPES
    assert len(wire.DTYPES) == 8 and set(wire.DTYPES).isdisjoint(wire.ENCODINGS)
    assert LIMITS.dtypes == frozenset(wire.WIRE_DTYPES)
    assert wire.ENCODINGS == ("q8", "topk8_d4", "topk8_d8", "topk8_d16", "topk8_d32", "topk8_d64", "sign1")


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
@pytest.mark.parametrize("shape", [(3, 100), (), (0,), (1,), (2, 0, 3), (257,)])
def test_lossy_tensors_round_trip(encoding: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    values = rng.standard_normal(shape).astype(np.float32)
    raw = np.arange(4, dtype=np.float32)
    message = _signed(tensors={"w": values, "raw": raw}, wire_dtypes={"w": encoding})
    header = msgpack.unpackb(message[HEAD : HEAD + _header_len(message)])
    assert header["tensors"] == [["w", encoding, list(shape)], ["raw", "float32", [4]]]
    payload = message[HEAD + _header_len(message) :]
    spec = TensorSpec("w", encoding, shape)
    assert spec.nbytes == codec.encoded_nbytes(encoding, shape) == len(payload) - 16
    assert payload[: spec.nbytes] == bytes(codec.encode(encoding, values))
    update = wire.open_update(message, LIMITS)
    assert update.specs == (spec, TensorSpec("raw", "float32", (4,)))
    got = update.tensors["w"]
    assert got.dtype == np.float32 and got.shape == shape and not got.flags.writeable
    assert got.tobytes() == codec.roundtrip(encoding, values).tobytes()  # what the sender keeps as its view
    assert np.shares_memory(update.tensors["raw"], np.frombuffer(message, dtype=np.uint8))  # still a view


def test_a_lossy_update_is_smaller() -> None:
    values = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    sizes = {
        dtype: len(_signed(tensors={"w": values}, wire_dtypes={"w": dtype}))
        for dtype in ("float32", "bfloat16", "q8", "topk8_d16")
    }
    assert sizes["float32"] / sizes["q8"] > 3.8 and sizes["float32"] / sizes["topk8_d16"] > 20
    assert sizes["bfloat16"] > sizes["q8"] > sizes["topk8_d16"]


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32", "int8", "uint8", "int64"])
def test_only_float32_tensors_travel_lossy(dtype: str) -> None:
    with pytest.raises(LocalProtocolError, match="only float32 arrays can travel as q8"):
        _update({"w": np.ones(4, dtype=dtype)}, wire_dtypes={"w": "q8"})
    with pytest.raises(LocalProtocolError, match="'w'"):
        _update({"w": np.ones(4, dtype=dtype)}, wire_dtypes={"w": "topk8_d4"})


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_tensor_cannot_travel_lossy(bad: float) -> None:
    values = np.array([1.0, bad, 2.0], dtype=np.float32)
    for encoding in ("q8", "topk8_d32"):
        with pytest.raises(LocalProtocolError, match=r"tensor 'w': .*finite"):
            _update({"w": values}, wire_dtypes={"w": encoding})


def _lossy_mallory(encoding: str, shape: list[int], data: bytes) -> bytes:
    """A validly signed update whose one lossy tensor's bytes are ``data`` (digest right)."""
    header = _header(tensors=[["w", encoding, shape]], payload=blake3.blake3(data).digest())
    return _mallory(header, data)


@pytest.mark.parametrize(
    ("encoding", "edit", "match"),
    [
        ("q8", lambda b: b[:-1] + b"\x80", "-128"),
        ("q8", lambda b: b"\x00\x00\xc0\x7f" + b[4:], "scale of block 0"),  # NaN
        ("q8", lambda b: b"\x00\x00\x00\x80" + b[4:], "negative"),  # -0.0
        ("topk8_d4", lambda b: bytes([b[0] ^ 0xFF]) + b[1:], "marks"),
        ("topk8_d4", lambda b: b[:2] + bytes([b[2] | 0x80]) + b[3:], "padding"),
    ],
)
def test_invalid_lossy_bytes_are_malformed(encoding: str, edit: Any, match: str) -> None:
    values = np.linspace(-1, 1, 20, dtype=np.float32)
    good = bytes(codec.encode(encoding, values))
    assert wire.open_update(_lossy_mallory(encoding, [20], good), LIMITS).tensors["w"].shape == (20,)
    message = _lossy_mallory(encoding, [20], edit(good))
    verified = wire.verify(message, LIMITS)
    header = wire.decode_header(verified, LIMITS)
    assert isinstance(header, UpdateHeader)
    with pytest.raises(MalformedMessage, match=rf"tensor 'w': .*{match}") as info:
        wire.decode_payload(verified, header)
    assert info.value.reason is RejectReason.MALFORMED


def test_a_lossy_payload_of_the_wrong_length_is_malformed() -> None:
    good = bytes(codec.encode("topk8_d8", np.ones(100, dtype=np.float32)))
    for data in (good[:-1], good + b"\0"):
        with pytest.raises(MalformedMessage, match="payload of"):
            wire.open_update(_lossy_mallory("topk8_d8", [100], data), LIMITS)


def test_lossy_dtypes_obey_the_allowed_dtypes() -> None:
    message = _lossy_mallory("q8", [2], bytes(codec.encode("q8", np.ones(2, dtype=np.float32))))
    with pytest.raises(MalformedMessage, match="not allowed"):
        _decode_header(message, WireLimits(dtypes=frozenset(wire.DTYPES)))
    assert isinstance(_decode_header(message, WireLimits(dtypes=frozenset({"q8"}))), UpdateHeader)
    for name in ("q4", "topk8_d2", "topk8", "Q8"):
        with pytest.raises(MalformedMessage, match="not allowed"):
            _decode_header(_mallory(_header(tensors=[["w", name, [2]]]), b""))


def test_decoded_lossy_bytes_are_bounded_by_the_header() -> None:
    """A small topk8_d64 payload claims a big dense array: max_decoded_bytes refuses it from the header."""

    shape = [2**14, 2**14]  # 2^28 elements: 38 MiB of topk8_d64 decode to 1 GiB
    message = _mallory(_header(tensors=[["w", "topk8_d64", shape]]), b"")
    with pytest.raises(MessageTooLarge, match="max_decoded_bytes"):  # from the header alone
        _decode_header(message)
    limits = WireLimits(max_decoded_bytes=4 * 2**28)
    header = _decode_header(message, limits)  # within the bound: on to the payload (which is short)
    assert isinstance(header, UpdateHeader)
    small = WireLimits(max_decoded_bytes=40)  # the sum over the tensors counts: 2 x 4 x 5 = 40, not 44
    two = [["a", "q8", [5]], ["b", "topk8_d4", [5]]]
    assert isinstance(_decode_header(_mallory(_header(tensors=two), b""), small), UpdateHeader)
    with pytest.raises(MessageTooLarge):
        _decode_header(_mallory(_header(tensors=[*two, ["c", "q8", [1]]]), b""), small)
    # Raw and bfloat16 tensors are not counted: their bound is the message size.
    raw = [["a", "float32", [100]], ["b", "bfloat16", [100]]]
    assert isinstance(_decode_header(_mallory(_header(tensors=raw), b""), small), UpdateHeader)


LOSSY_SCHEMA = (
    TensorSpec("base_model.model.encoder.layer.0.attention.self.query.lora_A.weight", "q8", (8, 96)),
    TensorSpec("base_model.model.encoder.layer.0.attention.self.query.lora_B.weight", "topk8_d16", (96, 8)),
    TensorSpec("base_model.model.classifier.weight", "topk8_d64", (2, 96)),
    TensorSpec("base_model.model.classifier.bias", "float32", (2,)),
)


def _of_lossy_schema(specs: tuple[TensorSpec, ...], **fields: Any) -> bytes:
    values: dict[str, Any] = dict(
        network=NETWORK, round=MAX_INT, seq=MAX_INT, ts_ms=MAX_INT, fingerprint=b"\xff" * 32,
        degree=MAX_DIM, samples=MAX_INT,
        tensors={s.name: np.ones(s.shape, dtype=np.float32) for s in specs},
        wire_dtypes={s.name: s.dtype for s in specs},
    )  # fmt: skip
    values.update(fields)
    return wire.sign(wire.encode_update(**values), ALICE)


def test_limits_for_a_lossy_schema_are_exact() -> None:
    limits = wire.limits_for_schema(LOSSY_SCHEMA, network=NETWORK)
    message = _of_lossy_schema(LOSSY_SCHEMA)
    payload = sum(s.nbytes for s in LOSSY_SCHEMA)
    assert len(message) - HEAD - _header_len(message) == payload
    assert payload < sum(s.elements for s in LOSSY_SCHEMA) * 4 // 3
    assert len(message) <= limits.max_message_bytes
    update = wire.open_update(message, limits)
    assert update.specs == LOSSY_SCHEMA and update.round == MAX_INT
    assert limits.max_decoded_bytes == 4 * sum(s.elements for s in LOSSY_SCHEMA)
    twin = tuple(TensorSpec(s.name, "float32", s.shape) for s in LOSSY_SCHEMA)
    assert wire.limits_for_schema(twin, network=NETWORK).max_decoded_bytes == limits.max_decoded_bytes
    extra = TensorSpec("base_model.model.extra.lora_A.weight", "q8", (8, 1024))  # 8320 bytes: > the slack
    bigger = _of_lossy_schema((*LOSSY_SCHEMA, extra), round=1, seq=1, ts_ms=1, degree=1, samples=1)
    with _no_hashing(), pytest.raises(MessageTooLarge):
        wire.verify(bigger, limits)
    capped = wire.limits_for_schema(LOSSY_SCHEMA, network=NETWORK, base=WireLimits(max_decoded_bytes=100))
    assert capped.max_decoded_bytes == 100


def test_a_difference_names_the_round_it_builds_on() -> None:
    """docs/protocol.md 4.2 and 8.3: ``base`` is optional, an int below the round, and signed."""
    identity = Identity(b"\x09" * 32)
    fields: dict[str, Any] = dict(network="n", seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=0)
    tensors = {"w": np.ones(4, np.float32)}
    message = wire.sign(wire.encode_update(round=5, base=3, tensors=tensors, **fields), identity)
    update = wire.open_update(message, wire.WireLimits())
    assert update.base == 3 and update.round == 5
    plain = wire.open_update(
        wire.sign(wire.encode_update(round=5, tensors=tensors, **fields), identity), wire.WireLimits()
    )
    assert plain.base is None
    for bad in (5, 6, -1):
        with pytest.raises(LocalProtocolError, match="base"):
            wire.encode_update(round=5, base=bad, tensors=tensors, **fields)
    # A receiver refuses a base at or above the round (a writer that breaks the rule).
    header = msgpack.unpackb(wire.encode_update(round=5, base=3, tensors=tensors, **fields).header)
    for bad_base in (5, 9, -1, "3"):
        forged = wire.Unsigned(
            msgpack.packb({**header, "base": bad_base}, use_bin_type=True), (tensors["w"].tobytes(),)
        )
        with pytest.raises(wire.MalformedMessage):
            wire.open_update(wire.sign(forged, identity), wire.WireLimits())


def test_an_update_may_ask_neighbours_for_keyframes() -> None:
    """docs/protocol.md 4.2 and 8.3: ``resync`` is optional, 1..max_resync_peers distinct keys, signed."""
    identity = Identity(b"\x09" * 32)
    peers = [Identity(bytes([i]) * 32).peer_id for i in (1, 2, 3)]
    fields: dict[str, Any] = dict(network="n", seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=0)
    tensors = {"w": np.ones(4, np.float32)}
    unsigned = wire.encode_update(round=5, base=4, resync=peers, tensors=tensors, **fields)
    message = wire.sign(unsigned, identity)
    update = wire.open_update(message, wire.WireLimits())
    assert update.resync == tuple(peers) and update.base == 4
    assert (
        wire.open_update(
            wire.sign(wire.encode_update(round=5, tensors=tensors, **fields), identity), wire.WireLimits()
        ).resync
        == ()
    )
    small = wire.WireLimits(max_resync_peers=2)
    for bad in (peers, [peers[0], peers[0]]):
        with pytest.raises(LocalProtocolError, match="resync"):
            wire.encode_update(round=5, resync=bad, tensors=tensors, limits=small, **fields)
    # A receiver refuses any other shape of the list (a writer that breaks the rule).
    header = msgpack.unpackb(wire.encode_update(round=5, tensors=tensors, **fields).header)
    for bad_resync in ([], [b"x" * 31], [peers[0].key, peers[0].key], b"k" * 32, [peers[0].key, 7], "a"):
        forged = wire.Unsigned(
            msgpack.packb({**header, "resync": bad_resync}, use_bin_type=True), (tensors["w"].tobytes(),)
        )
        with pytest.raises(wire.MalformedMessage, match="resync"):
            wire.open_update(wire.sign(forged, identity), wire.WireLimits())
    too_many = [p.key for p in peers]
    forged = wire.Unsigned(
        msgpack.packb({**header, "resync": too_many}, use_bin_type=True), (tensors["w"].tobytes(),)
    )
    with pytest.raises(wire.MalformedMessage, match="resync"):
        wire.open_update(wire.sign(forged, identity), small)
    # An unknown extra key is still refused.
    extra = msgpack.packb({**header, "other": 1}, use_bin_type=True)
    forged = wire.Unsigned(extra, (tensors["w"].tobytes(),))
    with pytest.raises(wire.MalformedMessage, match="header keys"):
        wire.open_update(wire.sign(forged, identity), wire.WireLimits())
