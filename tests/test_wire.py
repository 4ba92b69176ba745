from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfm import wire
from p2pfm.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    RejectReason,
    RemoteProtocolError,
    UnknownSender,
    UnsupportedVersion,
)
from p2pfm.identity import Identity
from p2pfm.wire import Unsigned, WireLimits

ALICE = Identity(bytes([1]) * 32)
BOB = Identity(bytes([2]) * 32)
LIMITS = WireLimits()
FP = bytes(range(32))


def _update(tensors: dict[str, np.ndarray[Any, Any]] | None = None, **fields: Any) -> Unsigned:
    base: dict[str, Any] = dict(
        network="net", round=3, seq=7, ts_ms=1_700_000_000_000, fingerprint=FP, degree=2, samples=64
    )
    base.update(fields)
    if tensors is None:
        tensors = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3)}
    return wire.encode_update(tensors=tensors, **base)


def _signed(**kw: Any) -> list[bytes]:
    return [bytes(f) for f in wire.sign(_update(**kw), ALICE)]


def _header(**override: Any) -> bytes:
    header: dict[str, Any] = {
        "kind": "update", "network": "net", "round": 1, "seq": 1, "ts_ms": 0,
        "fingerprint": FP, "degree": 1, "samples": 1, "tensors": [["t", "float32", [2]]],
    }  # fmt: skip
    header.update(override)
    return msgpack.packb(header, use_bin_type=True)


def _mallory(header: bytes, *data: bytes) -> list[bytes]:
    """A validly signed message with arbitrary body bytes (an insider gone bad)."""
    return [bytes(f) for f in wire.sign(Unsigned((header, *data)), ALICE)]


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
    round_=st.integers(0, 2**63 - 1),
    seq=st.integers(0, 2**63 - 1),
    ts_ms=st.integers(0, 2**63 - 1),
    degree=st.integers(0, 2**31 - 1),
    samples=st.integers(0, 2**63 - 1),
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
    frames = wire.sign(body, ALICE)
    update = wire.open_update(frames, LIMITS)
    assert update.sender == ALICE.peer_id
    assert (update.network, update.round, update.seq, update.ts_ms) == (network, round_, seq, ts_ms)
    assert (update.degree, update.samples, update.fingerprint) == (degree, samples, FP)
    assert list(update.tensors) == list(tensors)
    for name, array in tensors.items():
        got = update.tensors[name]
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
        assert not got.flags.writeable
    assert update.wire_bytes == wire.message_bytes(frames)


def test_bfloat16_round_trip_rounds_to_nearest() -> None:
    values = np.array([1.0, -2.5, 3.14159, 1e-3, 65504.0, np.inf, -np.inf], dtype=np.float32)
    frames = wire.sign(_update({"w": values}, round=1), ALICE)
    half = wire.sign(
        wire.encode_update(
            network="net", round=1, seq=7, ts_ms=1_700_000_000_000, fingerprint=FP, degree=2,
            samples=64, tensors={"w": values}, wire_dtypes={"w": "bfloat16"},
        ),
        ALICE,
    )  # fmt: skip
    update = wire.open_update(half, LIMITS)
    assert update.specs[0].dtype == "bfloat16"
    got = update.tensors["w"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, values, rtol=2**-8)
    assert got[0] == 1.0 and got[1] == -2.5 and np.isinf(got[5])
    assert memoryview(half[2]).nbytes == 2 * values.size == memoryview(frames[2]).nbytes // 2
    nan = wire.float32_to_bfloat16_bits(np.array([np.nan], dtype=np.float32))
    assert np.isnan(wire.bfloat16_bits_to_float32(nan))[0]


def test_decoded_arrays_are_views_of_the_frames() -> None:
    frames = wire.sign(_update({"big": np.ones(1 << 16, dtype=np.float32)}), ALICE)
    update = wire.open_update(frames, LIMITS)
    assert np.shares_memory(update.tensors["big"], np.frombuffer(frames[2], dtype=np.uint8))


# ----------------------------------------------------------------- tampering


def test_every_single_bit_flip_is_rejected() -> None:
    frames = _signed(tensors={"a": np.arange(3, dtype=np.float32)})
    flips = 0
    for index, frame in enumerate(frames):
        for bit in range(len(frame) * 8):
            mutated = bytearray(frame)
            mutated[bit // 8] ^= 1 << (bit % 8)
            copy = list(frames)
            copy[index] = bytes(mutated)
            with pytest.raises(RemoteProtocolError):
                wire.open_update(copy, LIMITS)
            flips += 1
    assert flips == 8 * sum(len(f) for f in frames)


def test_flips_in_signature_and_body_are_bad_signatures() -> None:
    frames = _signed()
    for index, offset in [(0, 40), (0, 100), (1, 0), (1, 10), (2, 0)]:
        copy = list(frames)
        mutated = bytearray(copy[index])
        mutated[offset] ^= 0x80
        copy[index] = bytes(mutated)
        with pytest.raises(BadSignature) as info:
            wire.open_update(copy, LIMITS)
        assert info.value.reason is RejectReason.BAD_SIGNATURE


def test_key_substitution_is_a_bad_signature() -> None:
    frames = _signed()
    prelude = bytearray(frames[0])
    prelude[5:37] = BOB.peer_id.key  # claim Bob sent Alice's bytes
    with pytest.raises(BadSignature):
        wire.open_update([bytes(prelude), *frames[1:]], LIMITS)


def test_reframing_the_same_bytes_is_rejected() -> None:
    frames = _signed(tensors={"a": np.arange(4, dtype=np.float32), "b": np.arange(4, dtype=np.float32)})
    moved = [frames[0], frames[1], frames[2] + frames[3][:4], frames[3][4:]]
    with pytest.raises(BadSignature):
        wire.open_update(moved, LIMITS)
    with pytest.raises(BadSignature):  # dropping a frame
        wire.open_update(frames[:-1], LIMITS)


def test_unknown_sender_is_refused_before_hashing() -> None:
    frames = _signed()
    with pytest.raises(UnknownSender):
        wire.verify(frames, LIMITS, known_senders={BOB.peer_id})
    assert wire.verify(frames, LIMITS, known_senders={ALICE.peer_id}).sender == ALICE.peer_id


def test_other_version_and_magic() -> None:
    frames = _signed()
    with pytest.raises(UnsupportedVersion):
        wire.open_update([frames[0][:4] + b"\x02" + frames[0][5:], *frames[1:]], LIMITS)
    with pytest.raises(MalformedMessage):
        wire.open_update([b"XXXX" + frames[0][4:], *frames[1:]], LIMITS)
    with pytest.raises(MalformedMessage):
        wire.open_update([frames[0][:-1], *frames[1:]], LIMITS)


# ----------------------------------------------------------------- size bounds


def test_oversized_message_is_refused_before_hashing() -> None:
    small = WireLimits(max_message_bytes=1000)
    frames = _signed(tensors={"a": np.zeros(1000, dtype=np.float32)})
    with pytest.raises(MessageTooLarge) as info:
        wire.verify(frames, small)
    assert info.value.reason is RejectReason.TOO_LARGE


def test_too_many_frames_and_too_few() -> None:
    limits = WireLimits(max_tensors=2)
    frames = _signed(tensors={k: np.zeros(1, dtype=np.float32) for k in "abc"})
    with pytest.raises(MalformedMessage):
        wire.verify(frames, limits)
    with pytest.raises(MalformedMessage):
        wire.verify(frames[:1], LIMITS)
    with pytest.raises(MalformedMessage):
        wire.verify([], LIMITS)


def test_oversized_header() -> None:
    frames = _mallory(_header(network="n" * 60), b"\0" * 8)
    with pytest.raises(MessageTooLarge):
        wire.verify(frames, WireLimits(max_header_bytes=50))


@pytest.mark.parametrize(
    "shape",
    [
        [2**31 - 1, 2**31 - 1, 2**31 - 1],
        [0, 2**31 - 1, 2**31 - 1, 2**31 - 1],  # found by fuzz/fuzz_messages.py: a zero hid the rest
        [2**31 - 1, 0, 2**31 - 1],
    ],
)
def test_huge_shape_with_little_data_is_refused_before_allocating(shape: list[int]) -> None:
    frames = _mallory(_header(tensors=[["t", "float32", shape]]), b"")
    with pytest.raises(MessageTooLarge):
        wire.open_update(frames, LIMITS)


# ----------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "header",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01\x02",  # a list, not a map
        msgpack.packb({"kind": "update"}),  # missing keys
        _header(extra=1),
        _header(kind="hello"),
        _header(round=True),
        _header(round=-1),
        _header(seq=1.5),
        _header(degree=2**31),
        _header(network=""),
        _header(network=b"bytes"),
        _header(fingerprint=b"short"),
        _header(fingerprint="x" * 32),
        _header(tensors=[["t", "complex64", [2]]]),
        _header(tensors=[["t", "float32", [-2]]]),
        _header(tensors=[["t", "float32", [3]]]),  # 12 bytes expected, 8 sent
        _header(tensors=[["t", "float32"]]),
        _header(tensors=[["", "float32", [2]]]),
        _header(tensors=[["t", "float32", [1] * 9]]),
        _header(tensors=[["t", "float32", [2]], ["t", "float32", [2]]]),
        _header(tensors=[]),  # one data frame but no tensor
        _header(tensors="nope"),
        msgpack.packb({1: 2}),  # non-string keys
        b"\x91" * 5000,  # deep nesting
        msgpack.packb({"kind": msgpack.ExtType(1, b"x")}),
        _header() + b"\x00",  # trailing bytes
    ],
)
def test_malformed_but_signed_headers_are_rejected(header: bytes) -> None:
    frames = _mallory(header, b"\0" * 8)
    with pytest.raises(RemoteProtocolError) as info:
        wire.open_update(frames, LIMITS)
    assert info.value.reason in {RejectReason.MALFORMED, RejectReason.TOO_LARGE}


def test_misuse_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        _update(round=-1)
    with pytest.raises(LocalProtocolError):
        _update(fingerprint=b"short")
    with pytest.raises(LocalProtocolError):
        _update(network="")
    with pytest.raises(LocalProtocolError):
        _update({"c": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(LocalProtocolError):
        _update({"": np.zeros(2, dtype=np.float32)})
    with pytest.raises(LocalProtocolError):
        wire.encode_update(
            network="n", round=0, seq=0, ts_ms=0, fingerprint=FP, degree=0, samples=0,
            tensors={"i": np.zeros(2, dtype=np.int32)}, wire_dtypes={"i": "bfloat16"},
        )  # fmt: skip


def test_big_endian_input_travels_little_endian() -> None:
    big = np.arange(4, dtype=">f4")
    frames = _signed(tensors={"b": big})
    assert bytes(frames[2]) == np.arange(4, dtype="<f4").tobytes()
    np.testing.assert_array_equal(wire.open_update(frames, LIMITS).tensors["b"], big)
