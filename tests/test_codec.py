"""p2pfm.core.codec: the lossy wire encodings q8 and topk8_dN (docs/protocol.md section 5.1)."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfm.core import codec
from p2pfm.core.errors import LocalProtocolError, MalformedMessage, RejectReason
from tests import codec_reference as ref

TOPKS = [e for e in codec.ENCODINGS if e.startswith("topk8_d")]
INT8 = ["q8", *TOPKS]  # the encodings that store int8 values (sign1 stores signs)
F32_MAX = float(np.finfo(np.float32).max)


def _f32(values: list[float]) -> np.ndarray[Any, Any]:
    return np.array(values, dtype=np.float32)


def _bits(value: float) -> bytes:
    return struct.pack("<f", value)


def _scales_of(encoding: str, n: int, payload: bytes) -> np.ndarray[Any, Any]:
    """The scales of a payload, one per kept value (what the error bound is relative to)."""
    k = codec.kept(encoding, n)
    at = 0 if encoding == "q8" else math.ceil(n / 8)
    scales = np.frombuffer(payload, "<f4", count=math.ceil(k / 256), offset=at)
    return np.repeat(scales, 256)[:k]


# ----------------------------------------------------------------- hand-worked bytes


@pytest.mark.parametrize(
    ("encoding", "values", "shape", "payload", "decoded"),
    [
        # scale = 127 / 127 = 1.0 (0000803f); -3.5 and 2.5 are ties: to even, -4 and 2.
        ("q8", [127.0, -3.5, 2.5, 0.4, -0.6, 0.0], (6,), "0000803f" "7ffc0200ff00",
         [127.0, -4.0, 2.0, 0.0, -1.0, 0.0]),
        # scale = float32(1 / 127) = 0x3c010204; -0.3 / scale = -38.1 -> -38 (da); 0.2 / scale = 25.4 -> 25.
        ("q8", [1.0, -0.3, 0.2], (3,), "0402013c" "7fda19",
         [1.0, -38 * ref.bits_to_f32(0x3C010204), 25 * ref.bits_to_f32(0x3C010204)]),
        # k = ceil(10 / 4) = 3 of magnitudes 127, 2.5 (x3): the tie keeps indices 3 and 5, not 7.
        # bitmap: bits 1, 3, 5 = 0x2a, then 0x00 (elements 8, 9 and six zero padding bits).
        ("topk8_d4", [0.1, -127.0, 0.0, 2.5, 0.5, -2.5, 1.0, 2.5, 0.3, 0.2], (2, 5),
         "2a00" "0000803f" "8102fe", [0.0, -127.0, 0.0, 2.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0]),
        # All zeros: k = 3, every magnitude ties at 0, the first three are kept; scale +0.0.
        ("topk8_d4", [0.0] * 10, (10,), "0700" "00000000" "000000", [0.0] * 10),
        # A scalar: one block of one value.
        ("q8", [-3.0], (), _bits(ref.f32(3.0 / 127)).hex() + "81", [-127 * ref.f32(3.0 / 127)]),
        # One element in topk8_d64: k = 1; the only bit set, seven padding bits zero.
        ("topk8_d64", [0.5], (1,), "01" + _bits(ref.f32(0.5 / 127)).hex() + "7f", [127 * ref.f32(0.5 / 127)]),
        ("q8", [], (0,), "", []),
        ("topk8_d16", [], (3, 0), "", []),
    ],
)  # fmt: skip
def test_hand_worked_examples(
    encoding: str, values: list[float], shape: tuple[int, ...], payload: str, decoded: list[float]
) -> None:
    array = _f32(values).reshape(shape)
    encoded = bytes(codec.encode(encoding, array))
    assert encoded.hex() == payload
    assert codec.encoded_nbytes(encoding, shape) == len(encoded)
    got = codec.decode(encoding, shape, encoded)
    assert got.dtype == np.float32 and got.shape == shape
    assert got.reshape(-1).tolist() == [ref.f32(v) for v in decoded]
    assert ref.encode(encoding, array.reshape(-1).tolist()) == encoded
    assert ref.decode(encoding, array.size, encoded) == got.reshape(-1).tolist()


def test_two_blocks_by_hand() -> None:
    """257 values: two scales first, then 257 int8; the second block has one value."""
    values = _f32([2.0] * 255 + [-1.0] + [-0.5])
    s0, s1 = ref.f32(2.0 / 127), ref.f32(0.5 / 127)
    minus_one = round(ref.f32(-1.0 / s0))
    assert minus_one == -64  # -1 / s0 rounds to exactly -63.5 in float32: a tie, to even
    expected = struct.pack("<2f", s0, s1) + b"\x7f" * 255 + struct.pack("<b", minus_one) + b"\x81"
    assert bytes(codec.encode("q8", values)) == expected
    got = codec.decode("q8", (257,), expected)
    assert got[0] == np.float32(127) * np.float32(s0) and got[256] == np.float32(-127) * np.float32(s1)


def test_topk_bitmap_spans_bytes_and_blocks() -> None:
    """600 elements, d4: k = 150 values in one block; kept are the multiples of 4 (the large ones)."""
    values = np.full(600, 0.01, dtype=np.float32)
    values[::4] = np.arange(150, dtype=np.float32) + 1
    encoded = bytes(codec.encode("topk8_d4", values))
    assert encoded[:75] == b"\x11" * 75  # bits 0 and 4 of every byte
    assert len(encoded) == 75 + 4 + 150
    assert encoded[75:79] == _bits(ref.f32(150 / 127))
    assert encoded == ref.encode("topk8_d4", values.tolist())


# ----------------------------------------------------------------- against the page's reading

_finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
_small_ints = st.integers(-3, 3).map(float)  # many ties and zeros


@st.composite
def _arrays(draw: st.DrawFn, max_side: int = 600) -> np.ndarray[Any, Any]:
    n = draw(st.integers(0, max_side))
    elements = draw(st.sampled_from([_finite32, _small_ints, st.floats(-(2.0**-133), 2.0**-133, width=32)]))
    return draw(hnp.arrays(np.float32, n, elements=elements))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoding=st.sampled_from(codec.ENCODINGS), values=_arrays())
def test_code_matches_an_independent_reading_of_the_spec(encoding: str, values: np.ndarray[Any, Any]) -> None:
    encoded = bytes(codec.encode(encoding, values))
    expected = ref.encode(encoding, values.tolist())
    if encoding == "sign1":  # a mean is the writer's to round: the page asks for the mean, not its bits
        bitmap = math.ceil(values.size / 8)
        assert encoded[:bitmap] == expected[:bitmap]
        ours, theirs = (np.frombuffer(b[bitmap:], "<f4").astype(np.float64) for b in (encoded, expected))
        np.testing.assert_allclose(ours, theirs, rtol=2**-22, atol=0)
    else:
        assert encoded == expected
    decoded = codec.decode(encoding, values.shape, encoded)
    assert decoded.tolist() == ref.decode(encoding, values.size, encoded)
    assert np.isfinite(decoded).all()


# ----------------------------------------------------------------- properties


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoding=st.sampled_from(INT8), values=_arrays(max_side=2000))
def test_error_feedback_is_exact(encoding: str, values: np.ndarray[Any, Any]) -> None:
    """x == roundtrip(x) + (x - roundtrip(x)) in float32: a sender loses nothing it keeps as residual."""
    view = codec.roundtrip(encoding, values)
    residual = values - view
    assert residual.dtype == np.float32
    np.testing.assert_array_equal(view + residual, values)
    assert np.isfinite(residual).all()


@settings(max_examples=60, deadline=None)
@given(
    encoding=st.sampled_from(INT8),
    values=hnp.arrays(np.float32, st.integers(1, 1500), elements=st.floats(-(2.0**100), 2.0**100, width=32)),
)
def test_kept_values_are_within_half_a_scale(encoding: str, values: np.ndarray[Any, Any]) -> None:
    payload = bytes(codec.encode(encoding, values))
    decoded = codec.decode(encoding, values.shape, payload)
    kept = np.ones(values.size, dtype=bool)
    if encoding != "q8":  # a kept value may decode to 0 (|x| < scale / 2): the bitmap says which are kept
        kept = np.unpackbits(np.frombuffer(payload, np.uint8, count=math.ceil(values.size / 8)),
                             count=values.size, bitorder="little").astype(bool)  # fmt: skip
    scales = _scales_of(encoding, values.size, payload).astype(np.float64)
    error = np.abs(values[kept].astype(np.float64) - decoded[kept].astype(np.float64))
    normal = scales >= 2.0**-126  # below, the scale itself is rounded coarsely (section 5.1)
    assert (error[normal] <= scales[normal] / 2 * (1 + 2**-20)).all()
    assert (decoded[~kept] == 0).all()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(encoding=st.sampled_from(TOPKS), values=_arrays(max_side=1500))
def test_topk_keeps_exactly_the_k_largest(encoding: str, values: np.ndarray[Any, Any]) -> None:
    n = values.size
    k = math.ceil(n / int(encoding.rsplit("d", 1)[1]))
    payload = bytes(codec.encode(encoding, values))
    bits = np.unpackbits(np.frombuffer(payload, np.uint8, count=math.ceil(n / 8)), count=n, bitorder="little")
    mask = bits.astype(bool)
    assert int(mask.sum()) == k == codec.kept(encoding, n)
    magnitude = np.abs(values)
    if 0 < k < n:
        assert magnitude[mask].min() >= magnitude[~mask].max()
        threshold = magnitude[mask].min()
        tied = np.flatnonzero(magnitude == threshold)
        # Among equal magnitudes the lower indices are kept: the kept ties are a prefix of the ties.
        assert mask[tied].tolist() == sorted(mask[tied].tolist(), reverse=True)


def _large_patterns() -> list[np.ndarray[Any, Any]]:
    """Large tensors (topk selects from a sample first above 2^18 elements) that could fool a sample."""
    rng = np.random.default_rng(5)
    n = 2**19 + 12345  # a sample of every 8th element
    few = np.zeros(n, dtype=np.float32)
    few[rng.integers(0, n, 40)] = rng.standard_normal(40).astype(np.float32)
    strided = np.zeros(n, dtype=np.float32)
    strided[:: n // 65536] = 1.0  # exactly what a strided sample sees: all ones, the rest zeros
    return [
        rng.standard_normal(n).astype(np.float32),
        np.sort(rng.standard_normal(n)).astype(np.float32),  # the largest all at the ends
        rng.integers(-2, 3, n).astype(np.float32),  # ties everywhere
        few,
        strided,
        -strided[::-1].copy(),
        np.zeros(n, dtype=np.float32),
    ]


@pytest.mark.parametrize("encoding", ["topk8_d4", "topk8_d64"])
def test_topk_selection_of_large_tensors_is_exact(encoding: str) -> None:
    for values in _large_patterns():
        n = values.size
        k = codec.kept(encoding, n)
        payload = bytes(codec.encode(encoding, values))
        got = np.unpackbits(
            np.frombuffer(payload, np.uint8, count=math.ceil(n / 8)), count=n, bitorder="little"
        )
        first_k = np.lexsort((np.arange(n), -np.abs(values)))[:k]  # by magnitude, then index
        expected = np.zeros(n, dtype=np.uint8)
        expected[first_k] = 1
        np.testing.assert_array_equal(got, expected)


def test_large_tensors_quantise_every_block_on_its_own() -> None:
    rng = np.random.default_rng(3)
    values = (
        rng.standard_normal(100_000) * np.repeat(10.0 ** rng.integers(-3, 4, 391), 256)[:100_000]
    ).astype(np.float32)
    payload = bytes(codec.encode("q8", values))
    scales = np.frombuffer(payload, "<f4", count=391)
    block_max = np.abs(np.pad(values, (0, 391 * 256 - 100_000))).reshape(391, 256).max(axis=1)
    np.testing.assert_array_equal(scales, block_max / np.float32(127))
    decoded = codec.decode("q8", values.shape, payload)
    assert (np.abs(values - decoded) <= np.repeat(scales, 256)[:100_000] / 2 * (1 + 2**-20)).all()


def test_sizes() -> None:
    n = 1 << 20
    values = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    ratios = {e: 4 * n / codec.encode(e, values).nbytes for e in codec.ENCODINGS}
    assert 3.9 < ratios["q8"] < 4.0  # 1 + 4/256 bytes per element
    assert 20 < ratios["topk8_d16"] < 22  # (1/8 + 1/16 + 1/16 * 4/256) bytes per element
    assert 10 < ratios["topk8_d4"] < ratios["topk8_d8"] < ratios["topk8_d16"] < ratios["topk8_d32"]
    assert ratios["topk8_d32"] < ratios["topk8_d64"] < 32  # the bitmap alone is 1/32 of float32
    for encoding in codec.ENCODINGS:
        for shape in [(0,), (), (1,), (7,), (8,), (9,), (255,), (256,), (257,), (3, 1000), (4096, 65)]:
            values = np.ones(shape, dtype=np.float32)
            assert codec.encode(encoding, values).nbytes == codec.encoded_nbytes(encoding, shape)
            assert codec.encoded_nbytes(encoding, shape) == ref.nbytes(encoding, math.prod(shape))


def test_tiny_and_huge_magnitudes() -> None:
    # A block whose max / 127 rounds to 0 in float32: the scale is the smallest subnormal, exactly.
    tiny = _f32([ref.bits_to_f32(3), -ref.bits_to_f32(1), 0.0])
    assert ref.f32(ref.bits_to_f32(3) / 127) == 0.0
    payload = bytes(codec.encode("q8", tiny))
    assert payload[:4] == struct.pack("<I", 1) and payload[4:] == bytes([3, 0xFF, 0])
    np.testing.assert_array_equal(codec.roundtrip("q8", tiny), tiny)
    # float32 max: max / 127 would make 127 * scale overflow; the scale is capped at MAX_SCALE.
    huge = _f32([F32_MAX, -F32_MAX, 1e38])
    payload = bytes(codec.encode("q8", huge))
    assert payload[:4] == struct.pack("<I", codec.MAX_SCALE_BITS)
    decoded = codec.roundtrip("q8", huge)
    assert np.isfinite(decoded).all() and decoded[0] > 3.4e38 and decoded[1] < -3.4e38
    with np.errstate(over="ignore"):  # why the cap: the next float32 up overflows
        assert np.isinf(np.float32(127) * np.array([codec.MAX_SCALE_BITS + 1], "<u4").view("<f4"))[0]


def test_negative_zero_and_input_layouts() -> None:
    values = _f32([-0.0, 1.0, -2.0, 0.25]).reshape(2, 2)
    expected = bytes(codec.encode("q8", values))
    assert codec.decode("q8", (2, 2), expected)[0, 0] == 0.0
    assert bytes(codec.encode("q8", values.astype(">f4"))) == expected  # big-endian input
    transposed = values.T  # not C-contiguous: read in the C order of the array as given
    assert bytes(codec.encode("topk8_d4", transposed)) == bytes(
        codec.encode("topk8_d4", np.ascontiguousarray(transposed))
    )
    assert codec.roundtrip("topk8_d4", transposed).shape == (2, 2)


def test_decoding_is_deterministic_and_returns_new_arrays() -> None:
    values = np.random.default_rng(1).standard_normal((33, 17), dtype=np.float32)
    for encoding in codec.ENCODINGS:
        payload = codec.encode(encoding, values)
        first, second = codec.decode(encoding, (33, 17), payload), codec.decode(encoding, (33, 17), payload)
        assert first.tobytes() == second.tobytes() == codec.roundtrip(encoding, values).tobytes()
        assert first.flags.writeable and not np.shares_memory(first, second)
        assert bytes(codec.encode(encoding, values)) == bytes(payload)


# ----------------------------------------------------------------- misuse on encode


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_refused(encoding: str, bad: float) -> None:
    for size in (1, 300, 2000):
        values = np.ones(size, dtype=np.float32)
        values[size // 2] = bad
        with pytest.raises(LocalProtocolError, match="finite"):
            codec.encode(encoding, values)


@pytest.mark.parametrize("dtype", ["float64", "float16", "int8", "int32", "uint8"])
def test_non_float32_input_is_refused(dtype: str) -> None:
    with pytest.raises(LocalProtocolError, match="float32"):
        codec.encode("q8", np.ones(4, dtype=dtype))
    with pytest.raises(LocalProtocolError, match="float32"):
        codec.encode("topk8_d8", [1.0, 2.0])  # type: ignore[arg-type]


def test_unknown_encodings_are_refused() -> None:
    for name in ("q4", "topk8_d2", "topk8_d128", "Q8", "float32", ""):
        with pytest.raises(LocalProtocolError, match="unknown lossy encoding"):
            codec.encode(name, np.ones(4, dtype=np.float32))
        with pytest.raises(LocalProtocolError):
            codec.encoded_nbytes(name, (4,))
        with pytest.raises(MalformedMessage, match="unknown lossy encoding"):
            codec.decode(name, (4,), b"\0" * 8)


# ----------------------------------------------------------------- malformed on decode


def _topk_payload(n: int = 20, encoding: str = "topk8_d4") -> bytearray:
    values = np.arange(n, dtype=np.float32) - 7
    return bytearray(codec.encode(encoding, values))


def test_a_claimed_size_is_checked_before_anything_is_allocated() -> None:
    for encoding in codec.ENCODINGS:  # 2^40 elements would need terabytes
        with pytest.raises(MalformedMessage, match="takes") as info:
            codec.decode(encoding, (2**20, 2**20), b"\0" * 64)
        assert info.value.reason is RejectReason.MALFORMED


@pytest.mark.parametrize("encoding", codec.ENCODINGS)
def test_wrong_lengths_are_refused(encoding: str) -> None:
    payload = bytes(codec.encode(encoding, np.ones(300, dtype=np.float32)))
    for bad in (payload[:-1], payload + b"\0", b"", payload[:4]):
        with pytest.raises(MalformedMessage, match=f"takes {len(payload)} bytes, got {len(bad)}"):
            codec.decode(encoding, (300,), bad)
    with pytest.raises(MalformedMessage):
        codec.decode(encoding, (600,), payload)  # the shape decides the length
    assert codec.decode(encoding, (300,), payload).shape == (300,)
    assert codec.decode(encoding, (3, 100), memoryview(payload)).shape == (3, 100)


@pytest.mark.parametrize("shape", [(-1,), (2.0,), (True, 2), ("2",)])
def test_bad_shapes_are_refused(shape: tuple[Any, ...]) -> None:
    with pytest.raises(MalformedMessage, match="shape"):
        codec.decode("q8", shape, b"")


def test_bitmap_padding_bits_must_be_zero() -> None:
    payload = _topk_payload(20)  # 3 bitmap bytes, the last uses 4 bits
    assert payload[2] >> 4 == 0
    for bit in range(4, 8):
        bad = bytearray(payload)
        bad[2] |= 1 << bit
        with pytest.raises(MalformedMessage, match="padding"):
            codec.decode("topk8_d4", (20,), bytes(bad))
    assert codec.decode("topk8_d4", (20,), bytes(payload)).shape == (20,)


def test_bitmap_population_must_be_k() -> None:
    payload = _topk_payload(20)  # k = 5
    bitmap = int.from_bytes(payload[:3], "little")
    assert bin(bitmap).count("1") == 5
    zero_bit = next(i for i in range(20) if not bitmap >> i & 1)
    one_bit = next(i for i in range(20) if bitmap >> i & 1)
    for changed, population in ((bitmap | 1 << zero_bit, 6), (bitmap & ~(1 << one_bit), 4)):
        bad = bytearray(payload)
        bad[:3] = changed.to_bytes(3, "little")
        with pytest.raises(MalformedMessage, match=f"marks {population} elements; 20 elements keep 5"):
            codec.decode("topk8_d4", (20,), bytes(bad))
    moved = bytearray(payload)  # same population, other positions: valid, decoded where it says
    moved[:3] = (bitmap & ~(1 << one_bit) | 1 << zero_bit).to_bytes(3, "little")
    decoded = codec.decode("topk8_d4", (20,), bytes(moved))
    assert decoded[one_bit] == 0 and int(np.count_nonzero(decoded)) <= 5


@pytest.mark.parametrize(
    ("bits", "why"),
    [
        (0x7FC00000, "not finite"),  # NaN
        (0x7F800001, "not finite"),  # a signalling NaN
        (0x7F800000, "not finite"),  # +Inf
        (0xFF800000, "not finite"),  # -Inf
        (0xFFFFFFFF, "not finite"),  # a NaN with its sign bit set
        (0xBF800000, "negative"),  # -1.0
        (0x80000000, "negative"),  # -0.0: writers write +0.0
        (codec.MAX_SCALE_BITS + 1, "above the largest scale"),
        (0x7F7FFFFF, "above the largest scale"),  # float32 max
    ],
)
@pytest.mark.parametrize("encoding", ["q8", "topk8_d4"])
def test_bad_scales_are_refused(bits: int, why: str, encoding: str) -> None:
    n = 600  # q8: 3 blocks; topk8_d4: k = 150, 1 block
    payload = bytearray(codec.encode(encoding, np.ones(n, dtype=np.float32)))
    at = 0 if encoding == "q8" else 75
    block = 2 if encoding == "q8" else 0
    struct.pack_into("<I", payload, at + 4 * block, bits)
    with pytest.raises(MalformedMessage, match=f"scale of block {block} .*{why}"):
        codec.decode(encoding, (n,), bytes(payload))


@pytest.mark.parametrize("bits", [0, 1, 0x3F800000, codec.MAX_SCALE_BITS])
def test_scales_at_the_bounds_are_accepted(bits: int) -> None:
    payload = struct.pack("<I", bits) + struct.pack("<3b", 127, -127, 5)
    decoded = codec.decode("q8", (3,), payload)
    scale = np.array([bits], "<u4").view("<f4")[0]
    assert decoded.tolist() == [np.float32(127) * scale, np.float32(-127) * scale, np.float32(5) * scale]
    assert np.isfinite(decoded).all()


@pytest.mark.parametrize("encoding", INT8)
def test_int8_minus_128_is_refused(encoding: str) -> None:
    n = 70
    payload = bytearray(codec.encode(encoding, np.ones(n, dtype=np.float32)))
    payload[-1] = 0x80  # the last value
    k = codec.kept(encoding, n)
    with pytest.raises(MalformedMessage, match=f"-128 .* at value {k - 1}"):
        codec.decode(encoding, (n,), bytes(payload))
    payload[-1] = 0x81  # -127 is fine
    assert codec.decode(encoding, (n,), bytes(payload)).min() < 0


# ------------------------------------------------------------------- sign1


def test_sign1_by_hand() -> None:
    """docs/protocol.md 5.1: the bitmap of negative elements, then each block's mean magnitude."""
    values = np.array([1.0, -2.0, 3.0, -0.0, 0.0], dtype=np.float32)
    encoded = bytes(codec.encode("sign1", values))
    assert encoded == bytes([0b00000010]) + struct.pack("<f", 1.2)
    assert codec.decode("sign1", (5,), encoded).tolist() == [
        np.float32(1.2),
        -np.float32(1.2),
        *[np.float32(1.2)] * 3,
    ]


def test_sign1_blocks_and_sizes() -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal(600).astype(np.float32)  # blocks of 256, 256, 88
    decoded = codec.roundtrip("sign1", values)
    for start in (0, 256, 512):
        block = values[start : start + 256]
        np.testing.assert_allclose(np.abs(decoded[start : start + 256]), np.abs(block).mean(), rtol=1e-6)
        assert (np.signbit(decoded[start : start + 256]) == (block < 0)).all()
    assert codec.encoded_nbytes("sign1", (600,)) == 75 + 4 * 3 == len(bytes(codec.encode("sign1", values)))
    n = 2**16
    assert 4 * n / codec.encoded_nbytes("sign1", (n,)) == pytest.approx(28.4, abs=0.1)


def test_sign1_padding_and_scales_are_checked() -> None:
    values = np.ones(10, dtype=np.float32)
    payload = bytearray(codec.encode("sign1", values))
    payload[1] |= 0b1000_0000  # element 15 does not exist
    with pytest.raises(MalformedMessage, match="padding"):
        codec.decode("sign1", (10,), bytes(payload))
    payload = bytearray(codec.encode("sign1", values))
    payload[2:6] = struct.pack("<I", 0x7F800000)  # +inf
    with pytest.raises(MalformedMessage, match="not finite"):
        codec.decode("sign1", (10,), bytes(payload))
    payload[2:6] = struct.pack("<I", 0x80000000)  # -0.0
    with pytest.raises(MalformedMessage, match="negative"):
        codec.decode("sign1", (10,), bytes(payload))
