"""Lossy wire encodings of float32 tensors: ``q8``, ``topk8_dN``, ``sign1`` (docs/protocol.md section 5.1).

Three families of encodings a float32 tensor may travel as instead of its
raw bytes, for compressed adapter updates and compressed differences with
error feedback (CHOCO-gossip):

``q8``
    Every element as an int8 with one float32 scale per block of 256
    elements: about 3.9x smaller than float32.
``topk8_dN``, N in 4, 8, 16, 32, 64
    Only the ``k = ceil(n / N)`` largest-magnitude elements, quantised as
    ``q8`` quantises, and a bitmap saying where they are: about 20x smaller
    than float32 for ``topk8_d16``.
``sign1``
    One bit per element, its sign, and one float32 scale per block of 256
    elements, the block's mean magnitude (scaled sign, as in error-feedback
    signSGD): about 28x smaller. Every element decodes to plus or minus its
    block's scale. Dense, evenly sized changes (what Adam-like steps make)
    keep their direction in every coordinate, where top-k keeps a few.

The API::

    encoded_nbytes(encoding, shape) -> int           payload bytes, from the shape alone
    kept(encoding, elements) -> int                  how many values the payload stores
    encode(encoding, array) -> memoryview            the payload bytes of a float32 array
    decode(encoding, shape, buffer) -> ndarray        the dense float32 array a receiver gets
    roundtrip(encoding, array) -> ndarray             decode(encode(array)): what receivers will hold

Decoding is deterministic: a sender that keeps the error-feedback residual
``x - roundtrip(encoding, x)`` holds exactly what every receiver decodes
(``roundtrip`` decodes the sender's own bytes with the receivers' function).

Errors: ``encode`` raises LocalProtocolError (the caller's mistake: an
unknown encoding, an array that is not float32, a NaN or an infinity);
``decode`` raises MalformedMessage, saying what is wrong, for anything a
peer could have sent (an unknown encoding, a bad shape, a buffer of the
wrong length, a bitmap or scale or value a writer never produces). Every
size is checked against the shape before anything proportional to it is
allocated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Union

import numpy as np
import numpy.typing as npt

from p2pfm.core.errors import LocalProtocolError, MalformedMessage

Buffer = Union[bytes, bytearray, memoryview]
Float32Array = npt.NDArray[np.float32]

BLOCK: Final = 256  # values per scale
Q8: Final = "q8"
SIGN1: Final = "sign1"
TOPK_DENSITIES: Final = (4, 8, 16, 32, 64)  # N of topk8_dN: one value kept in N
ENCODINGS: Final[tuple[str, ...]] = (Q8, *(f"topk8_d{n}" for n in TOPK_DENSITIES), SIGN1)
_DENSITY: Final = {f"topk8_d{n}": n for n in TOPK_DENSITIES}
# The largest scale whose 127-fold is still a finite float32 (0x7c010204 * 127
# rounds to +inf): every decoded value is finite. The bits of a non-negative
# float32 order like its values, so one integer comparison per scale also
# refuses a set sign bit (-0.0 included), Inf and NaN.
MAX_SCALE_BITS: Final = 0x7C010203
MAX_SCALE: Final = float(np.array([MAX_SCALE_BITS], dtype="<u4").view("<f4")[0])  # ~2.679e36
# The smallest float32 subnormal: the scale of a non-zero block never rounds to 0.
MIN_SCALE: Final = 2.0**-149
_F32: Final = np.dtype("<f4")
_POPCOUNT: Final = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)
_CHUNK_BLOCKS: Final = 1024  # blocks quantised at a time: temporaries of 1 MiB stay in cache
_SAMPLED_SELECTION: Final = 2**18  # top-k of at least this many elements: threshold from a sample first


# --------------------------------------------------------------------- sizes


def kept(encoding: str, elements: int) -> int:
    """How many int8 values the payload of a tensor of ``elements`` elements stores (sign1: none)."""
    if encoding == Q8:
        return elements
    if encoding == SIGN1:
        return 0
    try:
        density = _DENSITY[encoding]
    except KeyError:
        raise LocalProtocolError(f"unknown lossy encoding {encoding!r}; one of {ENCODINGS}") from None
    return -(-elements // density)  # ceil(n / N); 0 for n = 0


def encoded_nbytes(encoding: str, shape: Sequence[int]) -> int:
    """Payload bytes of a tensor of ``shape`` in ``encoding``: exact, from the shape alone.

    q8: ``4 * ceil(n / 256) + n``; topk8_dN: ``ceil(n / 8) + 4 * ceil(k / 256) + k``, ``k = ceil(n / N)``;
    sign1: ``ceil(n / 8) + 4 * ceil(n / 256)``.
    """
    elements = math.prod(shape)
    if encoding == SIGN1:
        return -(-elements // 8) + 4 * -(-elements // BLOCK)
    values = kept(encoding, elements)
    bitmap = 0 if encoding == Q8 else -(-elements // 8)
    return bitmap + 4 * -(-values // BLOCK) + values


# -------------------------------------------------------------------- encode


def encode(encoding: str, array: np.ndarray[Any, Any]) -> memoryview:
    """The payload bytes of a float32 ``array`` (any shape, read in C order) in ``encoding``.

    Returns a memoryview of a new buffer. Raises LocalProtocolError for an
    unknown encoding, an array that is not float32, or a NaN or infinity.
    """
    if encoding not in ENCODINGS:
        raise LocalProtocolError(f"unknown lossy encoding {encoding!r}; one of {ENCODINGS}")
    if not isinstance(array, (np.ndarray, np.generic)):
        raise LocalProtocolError(f"only float32 arrays can travel as {encoding}, got {type(array).__name__}")
    if array.dtype.kind != "f" or array.dtype.itemsize != 4:
        raise LocalProtocolError(f"only float32 arrays can travel as {encoding}, got dtype {array.dtype}")
    flat: Float32Array = np.ascontiguousarray(array, dtype=_F32).reshape(-1)  # no copy if already so
    n = flat.size
    out = np.empty(encoded_nbytes(encoding, (n,)), dtype=np.uint8)
    if encoding == SIGN1:
        return _encode_sign(flat, out)
    if encoding == Q8:
        values = flat
        bitmap_bytes = 0
    else:
        mask = _top_mask(flat, kept(encoding, n), encoding)
        bitmap_bytes = -(-n // 8)
        out[:bitmap_bytes] = np.packbits(mask, bitorder="little")
        values = flat[np.flatnonzero(mask)]
    blocks = -(-values.size // BLOCK)
    absmax = _block_absmax(values)
    if not np.isfinite(absmax).all():
        raise LocalProtocolError(f"a {encoding} tensor must be finite: it holds a NaN or an infinity")
    scales = _scales(absmax)
    out[bitmap_bytes : bitmap_bytes + 4 * blocks].view(_F32)[:] = scales
    _quantize(values, scales, out[bitmap_bytes + 4 * blocks :].view(np.int8))
    return out.data


def _encode_sign(flat: Float32Array, out: npt.NDArray[np.uint8]) -> memoryview:
    """sign1: the bitmap of negative elements, then each block's mean magnitude (float64 sum / count)."""
    n = flat.size
    bitmap_bytes = -(-n // 8)
    full, tail = divmod(n, BLOCK)
    sums = np.empty(full + (tail > 0), dtype=np.float64)
    if full:
        np.abs(flat[: full * BLOCK]).reshape(full, BLOCK).sum(axis=1, dtype=np.float64, out=sums[:full])
    if tail:
        sums[full] = np.abs(flat[full * BLOCK :]).sum(dtype=np.float64)
    if not np.isfinite(sums).all():
        raise LocalProtocolError(f"a {SIGN1} tensor must be finite: it holds a NaN or an infinity")
    counts = np.full(sums.size, BLOCK, dtype=np.float64)
    if tail:
        counts[-1] = tail
    scales = (sums / counts).astype(np.float32)
    np.minimum(scales, np.float32(MAX_SCALE), out=scales)
    out[:bitmap_bytes] = np.packbits(flat < 0, bitorder="little")  # -0.0 and +0.0 are not negative
    out[bitmap_bytes:].view(_F32)[:] = scales
    return out.data


def roundtrip(encoding: str, array: np.ndarray[Any, Any]) -> Float32Array:
    """What a receiver decodes from ``encode(encoding, array)``: same shape, float32, bit for bit.

    A sender keeps ``array - roundtrip(encoding, array)`` as its error-feedback residual.
    """
    return decode(encoding, array.shape, encode(encoding, array))


def _top_mask(flat: Float32Array, k: int, encoding: str) -> npt.NDArray[np.bool_]:
    """The k elements of largest magnitude; among equal magnitudes the lower index first."""
    n = flat.size
    magnitude = np.abs(flat)
    if n and not np.isfinite(magnitude.max()):
        raise LocalProtocolError(f"a {encoding} tensor must be finite: it holds a NaN or an infinity")
    if k == n:
        return np.ones(n, dtype=np.bool_)
    threshold = _kth_largest(magnitude, k)
    mask: npt.NDArray[np.bool_] = magnitude > threshold  # fewer than k
    missing = k - int(np.count_nonzero(mask))
    for start in range(0, n, _CHUNK_BLOCKS * BLOCK):  # the first `missing` ties, without indexing them all
        if not missing:
            break
        ties = np.flatnonzero(magnitude[start : start + _CHUNK_BLOCKS * BLOCK] == threshold)[:missing]
        mask[start + ties] = True
        missing -= ties.size
    return mask


def _kth_largest(magnitude: Float32Array, k: int) -> float:
    """The k-th largest of ``magnitude`` (1 <= k < n), exactly.

    For a large array, a strided sample gives a value ``c`` that at least k
    elements very likely reach; the k-th largest is then the k-th largest of
    the elements >= c, a much smaller partition. Should fewer than k reach
    ``c``, the whole array is partitioned: the result never depends on the sample.
    """
    n = magnitude.size
    if n >= _SAMPLED_SELECTION:
        sample = magnitude[:: n // 65536]
        rank = min(sample.size, sample.size * k // n * 5 // 4 + 64)  # 25% and 64 to spare
        floor = np.partition(sample, sample.size - rank)[sample.size - rank]
        candidates = magnitude[magnitude >= floor]
        if candidates.size >= k:
            return float(np.partition(candidates, candidates.size - k)[candidates.size - k])
    return float(np.partition(magnitude, n - k)[n - k])  # a float32 value: compares exactly


def _block_absmax(values: Float32Array) -> Float32Array:
    """max |v| of each block of 256 values (the last may be shorter); NaN propagates."""
    full, tail = divmod(values.size, BLOCK)
    out = np.empty(full + (tail > 0), dtype=np.float32)
    if full:
        blocks = values[: full * BLOCK].reshape(full, BLOCK)
        np.maximum(blocks.max(axis=1), -blocks.min(axis=1), out=out[:full])
    if tail:
        last = values[full * BLOCK :]
        out[full] = np.maximum(last.max(), -last.min())
    return np.abs(out, out=out)  # max(0.0, -0.0) may be -0.0: the scale of a zero block is +0.0


def _scales(absmax: Float32Array) -> Float32Array:
    """scale = max|v| / 127 in float32, at least MIN_SCALE for a non-zero block, at most MAX_SCALE."""
    scales: Float32Array = absmax / np.float32(127)
    scales[(scales == 0) & (absmax > 0)] = np.float32(MIN_SCALE)
    np.minimum(scales, np.float32(MAX_SCALE), out=scales)
    return scales


def _quantize(values: Float32Array, scales: Float32Array, out: npt.NDArray[np.int8]) -> None:
    """out = clip(rint(v / scale), -127, 127), the division in float32, ties to even."""
    full, tail = divmod(values.size, BLOCK)
    divisors = scales.copy()
    divisors[divisors == 0] = 1  # a zero scale's block is all zeros: 0 / 1
    scratch = np.empty((min(full, _CHUNK_BLOCKS), BLOCK), dtype=np.float32)
    for start in range(0, full, _CHUNK_BLOCKS):
        stop = min(start + _CHUNK_BLOCKS, full)
        part = scratch[: stop - start]
        chunk = values[start * BLOCK : stop * BLOCK].reshape(-1, BLOCK)
        np.divide(chunk, divisors[start:stop, None], out=part)
        _round_clip_store(part, out[start * BLOCK : stop * BLOCK].reshape(-1, BLOCK))
    if tail:
        part = values[full * BLOCK :] / divisors[full : full + 1]
        _round_clip_store(part, out[full * BLOCK :])


def _round_clip_store(quotients: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
    np.rint(quotients, out=quotients)  # round half to even
    np.clip(quotients, -127, 127, out=quotients)
    np.copyto(out, quotients, casting="unsafe")  # exact: integers in [-127, 127]


@dataclass(frozen=True)
class Encoded:
    """A float32 tensor already in a lossy wire encoding: ``encode``'s bytes, and the tensor's shape.

    A sender that must know what its receivers decode (error feedback,
    p2pfm/core/compression.py) encodes once, decodes these bytes for itself
    and hands them to ``wire.encode_update`` as they are: the bytes it
    accounts for are the bytes that travel, and nothing is encoded twice.
    """

    encoding: str
    shape: tuple[int, ...]
    data: memoryview

    @classmethod
    def of(cls, encoding: str, array: np.ndarray[Any, Any]) -> Encoded:
        return cls(encoding, tuple(int(d) for d in array.shape), encode(encoding, array))

    def decoded(self) -> Float32Array:
        """What a receiver decodes from these bytes (a new array)."""
        return decode(self.encoding, self.shape, self.data)


# -------------------------------------------------------------------- decode


def decode(encoding: str, shape: Sequence[int], buffer: Buffer) -> Float32Array:
    """The dense float32 array of ``shape`` that ``buffer`` encodes; a new, writable array.

    Raises MalformedMessage, saying what is wrong, when the encoding or the
    shape is invalid or the bytes are not what a writer produces: a length
    other than ``encoded_nbytes`` (checked first, from the shape alone,
    before anything is allocated), set bitmap padding bits, a bitmap
    population other than k, a scale that is negative (-0.0 included), not
    finite or above MAX_SCALE, an int8 value of -128.
    """
    if encoding not in ENCODINGS:
        raise MalformedMessage(f"unknown lossy encoding {encoding!r}; one of {ENCODINGS}")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise MalformedMessage(f"{encoding}: shape {tuple(shape)!r} is not a tuple of non-negative ints")
    view = memoryview(buffer)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    n = math.prod(shape)
    k = kept(encoding, n)
    expected = encoded_nbytes(encoding, shape)
    if view.nbytes != expected:
        raise MalformedMessage(
            f"{encoding} tensor of shape {tuple(shape)} takes {expected} bytes, got {view.nbytes}"
        )
    bitmap_bytes = 0 if encoding == Q8 else -(-n // 8)
    if encoding == SIGN1:
        return _decode_sign(np.frombuffer(view, dtype=np.uint8), n, bitmap_bytes).reshape(tuple(shape))
    blocks = -(-k // BLOCK)
    bitmap = np.frombuffer(view, dtype=np.uint8, count=bitmap_bytes)
    if bitmap_bytes:
        _check_bitmap(encoding, bitmap, n, k)
    scale_bits = np.frombuffer(view, dtype="<u4", count=blocks, offset=bitmap_bytes)
    if blocks and int(scale_bits.max()) > MAX_SCALE_BITS:
        _refuse_scale(encoding, scale_bits)
    q = np.frombuffer(view, dtype=np.int8, count=k, offset=bitmap_bytes + 4 * blocks)
    if k and int(q.min()) == -128:
        raise MalformedMessage(f"{encoding}: int8 value -128 (never written) at value {int(np.argmin(q))}")
    scales = scale_bits.view(_F32)
    if encoding == Q8:
        out = np.empty(n, dtype=np.float32)
        _dequantize(q, scales, out)
    else:
        values = np.empty(k, dtype=np.float32)
        _dequantize(q, scales, values)
        out = np.zeros(n, dtype=np.float32)
        out[np.unpackbits(bitmap, count=n, bitorder="little").view(np.bool_)] = values  # in index order
    return out.reshape(tuple(shape))


def _decode_sign(payload: npt.NDArray[np.uint8], n: int, bitmap_bytes: int) -> Float32Array:
    """sign1: plus or minus the block's scale; padding bits and scales checked as for the others."""
    bitmap = payload[:bitmap_bytes]
    _check_padding(SIGN1, bitmap, n)
    scale_bits = payload[bitmap_bytes:].view("<u4")
    if scale_bits.size and int(scale_bits.max()) > MAX_SCALE_BITS:
        _refuse_scale(SIGN1, scale_bits)
    scales = scale_bits.view(_F32)
    negative = np.unpackbits(bitmap, count=n, bitorder="little").view(np.bool_)
    out = np.repeat(scales, BLOCK)[:n]  # each element its block's scale ...
    np.negative(out, out=out, where=negative)  # ... with its sign
    return out


def _check_padding(encoding: str, bitmap: npt.NDArray[np.uint8], n: int) -> None:
    used = n % 8
    if used and int(bitmap[-1]) >> used:
        raise MalformedMessage(
            f"{encoding}: bitmap padding bits are set (last byte {int(bitmap[-1]):#04x} for {n} elements)"
        )


def _check_bitmap(encoding: str, bitmap: npt.NDArray[np.uint8], n: int, k: int) -> None:
    _check_padding(encoding, bitmap, n)
    population = int(_POPCOUNT[bitmap].sum(dtype=np.int64))
    if population != k:
        raise MalformedMessage(f"{encoding}: bitmap marks {population} elements; {n} elements keep {k}")


def _refuse_scale(encoding: str, bits: npt.NDArray[np.uint32]) -> None:
    block = int(np.argmax(bits > MAX_SCALE_BITS))
    word = int(bits[block])
    value = float(np.array([word], dtype="<u4").view("<f4")[0])
    if (word >> 23) & 0xFF == 0xFF:
        why = "not finite"
    elif word >> 31:
        why = "negative (its sign bit is set)"
    else:
        why = f"above the largest scale {MAX_SCALE!r}"
    raise MalformedMessage(f"{encoding}: the scale of block {block} ({value!r}, bits {word:#010x}) is {why}")


def _dequantize(q: npt.NDArray[np.int8], scales: Float32Array, out: Float32Array) -> None:
    """out = float32(q) * scale of its block, one float32 multiplication each."""
    full, tail = divmod(q.size, BLOCK)
    if full:
        np.multiply(
            q[: full * BLOCK].reshape(full, BLOCK),
            scales[:full, None],
            out=out[: full * BLOCK].reshape(full, BLOCK),
        )
    if tail:  # scales[full : full + 1], an array: a numpy scalar could pick a float16 loop on numpy 1.x
        np.multiply(q[full * BLOCK :], scales[full : full + 1], out=out[full * BLOCK :])
