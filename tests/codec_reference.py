"""An independent reading of docs/protocol.md section 5.1 (q8, topk8_dN, sign1) in plain Python.

Slow and simple on purpose: the tests compare p2pfm/core/codec.py against it
byte for byte, so that the page, and not only the code, says what travels.
float32 arithmetic is emulated with Python floats (binary64): a quotient or
product of two float32 values computed in binary64 and then rounded to
binary32 is the correctly rounded binary32 result (binary64 has more than
2 * 24 + 2 bits), and a product of an int8 and a float32 is exact in binary64.
"""

from __future__ import annotations

import math
import struct

BLOCK = 256
MAX_SCALE_BITS = 0x7C010203
DENSITIES = {"topk8_d4": 4, "topk8_d8": 8, "topk8_d16": 16, "topk8_d32": 32, "topk8_d64": 64}


def f32(value: float) -> float:
    """Round a Python float to the nearest binary32 (ties to even)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def bits_to_f32(bits: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", bits))[0])


MAX_SCALE = bits_to_f32(MAX_SCALE_BITS)
MIN_SCALE = bits_to_f32(1)


def kept(encoding: str, n: int) -> int:
    if encoding == "sign1":
        return 0
    return n if encoding == "q8" else math.ceil(n / DENSITIES[encoding])


def nbytes(encoding: str, n: int) -> int:
    if encoding == "sign1":
        return math.ceil(n / 8) + 4 * math.ceil(n / BLOCK)
    k = kept(encoding, n)
    bitmap = 0 if encoding == "q8" else math.ceil(n / 8)
    return bitmap + 4 * math.ceil(k / BLOCK) + k


def _scale(block: list[float]) -> float:
    m = max(abs(v) for v in block)
    if m == 0:
        return 0.0
    s = f32(m / 127)
    if s == 0:
        s = MIN_SCALE
    return min(s, MAX_SCALE)


def _quantize(values: list[float]) -> bytes:
    scales, ints = [], []
    for start in range(0, len(values), BLOCK):
        block = values[start : start + BLOCK]
        s = _scale(block)
        scales.append(s)
        for v in block:
            q = 0 if s == 0 else round(f32(v / s))  # round() is half to even
            ints.append(max(-127, min(127, q)))
    return struct.pack(f"<{len(scales)}f", *scales) + struct.pack(f"<{len(ints)}b", *ints)


def encode(encoding: str, values: list[float]) -> bytes:
    """``values``: the tensor's elements in C order, each a binary32 value, all finite."""
    if encoding == "q8":
        return _quantize(values)
    n = len(values)
    if encoding == "sign1":  # the bitmap of negative elements, then each block's mean magnitude
        bitmap = bytearray(math.ceil(n / 8))
        for i, v in enumerate(values):
            if v < 0:
                bitmap[i // 8] |= 1 << (i % 8)
        blocks = [values[start : start + BLOCK] for start in range(0, n, BLOCK)]
        scales = [min(f32(math.fsum(abs(v) for v in b) / len(b)), MAX_SCALE) for b in blocks]
        return bytes(bitmap) + struct.pack(f"<{len(scales)}f", *scales)
    k = kept(encoding, n)
    order = sorted(range(n), key=lambda i: (-abs(values[i]), i))  # larger magnitude, then lower index
    chosen = sorted(order[:k])
    bitmap = bytearray(math.ceil(n / 8))
    for i in chosen:
        bitmap[i // 8] |= 1 << (i % 8)
    return bytes(bitmap) + _quantize([values[i] for i in chosen])


def decode(encoding: str, n: int, payload: bytes) -> list[float]:
    """The n decoded elements; ValueError for anything a receiver refuses."""
    k = kept(encoding, n)
    if len(payload) != nbytes(encoding, n):
        raise ValueError("length")
    at = 0
    positions = list(range(n))
    if encoding == "sign1":
        size = math.ceil(n / 8)
        bitmap = payload[:size]
        if n % 8 and bitmap[-1] >> (n % 8):
            raise ValueError("padding")
        bits = struct.unpack_from(f"<{math.ceil(n / BLOCK)}I", payload, size)
        if any(b > MAX_SCALE_BITS for b in bits):
            raise ValueError("scale")
        return [
            -bits_to_f32(bits[i // BLOCK]) if bitmap[i // 8] >> (i % 8) & 1 else bits_to_f32(bits[i // BLOCK])
            for i in range(n)
        ]
    if encoding != "q8":
        size = math.ceil(n / 8)
        bitmap, at = payload[:size], size
        if n % 8 and bitmap[-1] >> (n % 8):
            raise ValueError("padding")
        positions = [i for i in range(n) if bitmap[i // 8] >> (i % 8) & 1]
        if len(positions) != k:
            raise ValueError("popcount")
    blocks = math.ceil(k / BLOCK)
    scale_bits = struct.unpack_from(f"<{blocks}I", payload, at)
    if any(b > MAX_SCALE_BITS for b in scale_bits):
        raise ValueError("scale")
    ints = struct.unpack_from(f"<{k}b", payload, at + 4 * blocks)
    if -128 in ints:
        raise ValueError("-128")
    out = [0.0] * n
    for j, (i, q) in enumerate(zip(positions, ints, strict=True)):
        out[i] = f32(q * bits_to_f32(scale_bits[j // BLOCK]))
    return out
