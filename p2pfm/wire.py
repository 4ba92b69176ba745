"""The wire format: signed, msgpack-encoded updates as ZeroMQ-style frames.

A message is a list of frames (docs/protocol.md is the normative spec)::

    frame 0   prelude, 101 bytes: b"P2FM" | version u8 | sender key (32) | signature (64)
    frame 1   header: a msgpack map (kind, network, round, seq, ts_ms,
              fingerprint, degree, samples, tensors=[[name, dtype, shape], ...])
    frame 2+i raw little-endian bytes of tensor i, C order

The signature is Ed25519 over a 32-byte BLAKE3 digest of the exact bytes
that travel (prelude without its signature, then every later frame with its
length). Hash-then-sign keeps signing at BLAKE3 speed (GB/s) instead of
Ed25519's own SHA-512 pass, and one frame per tensor lets the transport send
tensor memory without copying it.

Receiving is two typed steps, so that nothing is decoded before it is
authenticated: :func:`verify` bounds sizes and checks the signature and
returns a :class:`Verified`; only :func:`decode_update` accepts one.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import blake3
import msgpack
import nacl.exceptions
import nacl.signing
import numpy as np

from p2pfm.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    UnknownSender,
    UnsupportedVersion,
)
from p2pfm.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId

MAGIC = b"P2FM"
WIRE_VERSION = 1
KIND_UPDATE = "update"
FINGERPRINT_BYTES = 32
_SIGNED_PRELUDE_BYTES = len(MAGIC) + 1 + PUBLIC_KEY_BYTES  # 37
PRELUDE_BYTES = _SIGNED_PRELUDE_BYTES + SIGNATURE_BYTES  # 101
_MAX_INT = 2**63 - 1  # every integer field fits a signed 64-bit int
_MAX_DIM = 2**31 - 1

Buffer = Union[bytes, bytearray, memoryview]

# Wire dtype name -> numpy storage dtype (always little-endian). bfloat16 has
# no numpy dtype: it travels as the upper 16 bits of a float32 and is
# widened back to float32 (exactly) when decoded.
DTYPES: Mapping[str, np.dtype[Any]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "float64": np.dtype("<f8"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
_NUMPY_TO_WIRE = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items() if k != "bfloat16"}


@dataclass(frozen=True)
class WireLimits:
    """Hard bounds a receiver checks before it allocates or hashes anything."""

    max_message_bytes: int = 512 * 2**20  # a 7B-model LoRA r=16 fp32 adapter is ~160 MiB
    max_header_bytes: int = 2**20  # 4096 tensor entries need ~200 KiB
    max_tensors: int = 4096
    max_tensor_elements: int = 2**28
    max_ndim: int = 8
    max_name_bytes: int = 256
    max_network_id_bytes: int = 64
    dtypes: frozenset[str] = field(default_factory=lambda: frozenset(DTYPES))

    @property
    def max_frames(self) -> int:
        return self.max_tensors + 2


@dataclass(frozen=True)
class TensorSpec:
    """Name, wire dtype and shape of one tensor: what the schema gate compares."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)  # Python ints: no overflow; () -> 1

    @property
    def nbytes(self) -> int:
        return self.elements * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Unsigned:
    """Body frames (header + tensor data) of a message not yet signed."""

    body: tuple[Buffer, ...]


@dataclass(frozen=True)
class Verified:
    """Frames whose size bounds and signature have been checked."""

    sender: PeerId
    body: tuple[memoryview, ...]
    wire_bytes: int


@dataclass(frozen=True)
class Update:
    """A decoded, authenticated adapter update (not yet judged by the protocol)."""

    sender: PeerId
    network: str
    round: int
    seq: int
    ts_ms: int
    fingerprint: bytes
    degree: int
    samples: int
    specs: tuple[TensorSpec, ...]
    tensors: dict[str, np.ndarray[Any, Any]]  # read-only views into the frames
    wire_bytes: int


# --------------------------------------------------------------------- encode


def encode_update(
    *,
    network: str,
    round: int,
    seq: int,
    ts_ms: int,
    fingerprint: bytes,
    degree: int,
    samples: int,
    tensors: Mapping[str, np.ndarray[Any, Any]],
    wire_dtypes: Mapping[str, str] | None = None,
    limits: WireLimits | None = None,
) -> Unsigned:
    """Build the body frames of an update. Raises LocalProtocolError on misuse.

    ``wire_dtypes`` optionally casts tensors for transport (for example
    ``{"w": "bfloat16"}`` halves the bytes of a float32 tensor). Tensor bytes
    are not copied when the array already has the wire layout.
    """
    limits = limits or WireLimits()
    _check_network(network, limits, LocalProtocolError)
    for name, value, top in (
        ("round", round, _MAX_INT),
        ("seq", seq, _MAX_INT),
        ("ts_ms", ts_ms, _MAX_INT),
        ("degree", degree, _MAX_DIM),
        ("samples", samples, _MAX_INT),
    ):
        if type(value) is not int or not 0 <= value <= top:
            raise LocalProtocolError(f"{name} must be an int in [0, {top}], got {value!r}")
    if not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_BYTES:
        raise LocalProtocolError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
    if len(tensors) > limits.max_tensors:
        raise LocalProtocolError(f"{len(tensors)} tensors exceed max_tensors={limits.max_tensors}")
    entries: list[list[Any]] = []
    data: list[Buffer] = []
    for name, array in tensors.items():
        wire_dtype = (wire_dtypes or {}).get(name) or _wire_dtype_of(name, array)
        if len(name.encode()) > limits.max_name_bytes or not name:
            raise LocalProtocolError(f"tensor name {name!r} must be 1..{limits.max_name_bytes} bytes")
        entries.append([name, wire_dtype, list(array.shape)])
        data.append(_to_wire_bytes(name, array, wire_dtype))
    header = {
        "kind": KIND_UPDATE,
        "network": network,
        "round": round,
        "seq": seq,
        "ts_ms": ts_ms,
        "fingerprint": fingerprint,
        "degree": degree,
        "samples": samples,
        "tensors": entries,
    }
    return Unsigned((msgpack.packb(header, use_bin_type=True), *data))


def sign(message: Unsigned, identity: Identity) -> list[Buffer]:
    """Prepend the prelude frame: magic, version, sender key and signature."""
    signed_prelude = MAGIC + bytes([WIRE_VERSION]) + identity.peer_id.key
    signature = identity.sign(_digest(signed_prelude, [memoryview(f) for f in message.body]))
    return [signed_prelude + signature, *message.body]


def _wire_dtype_of(name: str, array: np.ndarray[Any, Any]) -> str:
    try:
        return _NUMPY_TO_WIRE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise LocalProtocolError(f"tensor {name!r} has unsupported dtype {array.dtype}") from None


def _to_wire_bytes(name: str, array: np.ndarray[Any, Any], wire_dtype: str) -> memoryview:
    if wire_dtype not in DTYPES:
        raise LocalProtocolError(f"tensor {name!r}: unknown wire dtype {wire_dtype!r}")
    if wire_dtype == "bfloat16":
        if array.dtype.kind != "f":
            raise LocalProtocolError(f"tensor {name!r}: only float arrays can travel as bfloat16")
        stored = float32_to_bfloat16_bits(array)
    else:
        # A no-op (no copy) when the array is already contiguous little-endian.
        stored = np.ascontiguousarray(array, dtype=DTYPES[wire_dtype])
    return stored.reshape(-1).view(np.uint8).data


def float32_to_bfloat16_bits(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Round float values to bfloat16 (nearest, ties to even); return the bits as uint16."""
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype("<u2")
    nan = np.isnan(array)
    if nan.any():  # keep NaN a NaN (rounding could carry it into Inf)
        out[nan] = 0x7FC0
    return out


def bfloat16_bits_to_float32(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Widen bfloat16 bit patterns to float32; exact."""
    return (bits.astype("<u4") << 16).view("<f4")


# --------------------------------------------------------------------- verify


def message_bytes(frames: Sequence[Buffer]) -> int:
    """Total size of a message's frames, in bytes."""
    return sum(memoryview(f).nbytes for f in frames)


def verify(
    frames: Sequence[Buffer],
    limits: WireLimits,
    known_senders: Container[PeerId] | None = None,
) -> Verified:
    """Bound sizes and check the signature; decode nothing. Raises RemoteProtocolError.

    ``known_senders``, when given, refuses unknown keys before any hashing.
    """
    if not 2 <= len(frames) <= limits.max_frames:
        raise MalformedMessage(f"{len(frames)} frames; expected 2..{limits.max_frames}")
    views = [_byte_view(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > limits.max_message_bytes:
        raise MessageTooLarge(f"{total} bytes exceed max_message_bytes={limits.max_message_bytes}")
    prelude = views[0]
    if prelude.nbytes != PRELUDE_BYTES or bytes(prelude[:4]) != MAGIC:
        raise MalformedMessage("first frame is not a p2pfm prelude")
    if prelude[4] != WIRE_VERSION:
        raise UnsupportedVersion(f"wire version {prelude[4]}; this node speaks {WIRE_VERSION}")
    if views[1].nbytes > limits.max_header_bytes:
        raise MessageTooLarge(f"header of {views[1].nbytes} bytes exceeds {limits.max_header_bytes}")
    sender = PeerId(bytes(prelude[5:_SIGNED_PRELUDE_BYTES]))
    if known_senders is not None and sender not in known_senders:
        raise UnknownSender(f"sender {sender.short} is not a known peer")
    digest = _digest(bytes(prelude[:_SIGNED_PRELUDE_BYTES]), views[1:])
    try:
        _verify_key(sender.key).verify(digest, bytes(prelude[_SIGNED_PRELUDE_BYTES:]))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        raise BadSignature(f"signature from {sender.short} does not verify") from None
    return Verified(sender, tuple(views[1:]), total)


@functools.lru_cache(maxsize=4096)
def _verify_key(key: bytes) -> nacl.signing.VerifyKey:
    """Decoding a public key costs a point decompression; peers are few, cache it."""
    return nacl.signing.VerifyKey(key)


def _byte_view(frame: Buffer) -> memoryview:
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _digest(signed_prelude: bytes, body: Sequence[memoryview]) -> bytes:
    """BLAKE3-256 of prelude[0:37] | u32le(frame count) | (u64le(len) | frame)*."""
    # One thread on purpose: the length prefixes break BLAKE3's chunk
    # alignment across frames, so AUTO threading measured slower (26 ms vs
    # 16 ms for 64 MiB, benchmarks/wire.py), and ZeroMQ's I/O thread needs
    # the other core anyway.
    hasher = blake3.blake3(max_threads=1)
    hasher.update(signed_prelude)
    hasher.update(struct.pack("<I", len(body)))
    for frame in body:
        hasher.update(struct.pack("<Q", frame.nbytes))
        hasher.update(frame)
    return hasher.digest()


# --------------------------------------------------------------------- decode


def decode_update(message: Verified, limits: WireLimits) -> Update:
    """Parse an authenticated message into an Update. Raises RemoteProtocolError."""
    header = _unpack_header(message.body[0], limits)
    data = message.body[1:]
    if header.get("kind") != KIND_UPDATE:
        raise MalformedMessage(f"kind {header.get('kind')!r} is not {KIND_UPDATE!r}")
    expected_keys = {"kind", "network", "round", "seq", "ts_ms", "fingerprint", "degree"}
    expected_keys |= {"samples", "tensors"}
    if set(header) != expected_keys:
        raise MalformedMessage(f"header keys {sorted(header)} differ from {sorted(expected_keys)}")
    _check_network(header["network"], limits, MalformedMessage)
    ints = {}
    for name, top in (("round", _MAX_INT), ("seq", _MAX_INT), ("ts_ms", _MAX_INT)):
        ints[name] = _field_int(header, name, top)
    degree = _field_int(header, "degree", _MAX_DIM)
    samples = _field_int(header, "samples", _MAX_INT)
    fingerprint = header["fingerprint"]
    if not isinstance(fingerprint, bytes) or len(fingerprint) != FINGERPRINT_BYTES:
        raise MalformedMessage(f"fingerprint must be {FINGERPRINT_BYTES} bytes of msgpack bin")
    specs = _parse_specs(header["tensors"], limits)
    if len(specs) != len(data):
        raise MalformedMessage(f"header lists {len(specs)} tensors but {len(data)} data frames came")
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for spec, frame in zip(specs, data, strict=True):
        if frame.nbytes != spec.nbytes:
            raise MalformedMessage(f"tensor {spec.name!r}: {frame.nbytes} bytes, shape needs {spec.nbytes}")
        array = np.frombuffer(frame, dtype=DTYPES[spec.dtype]).reshape(spec.shape)
        if spec.dtype == "bfloat16":
            array = bfloat16_bits_to_float32(array)
        array.flags.writeable = False
        tensors[spec.name] = array
    return Update(
        sender=message.sender,
        network=header["network"],
        round=ints["round"],
        seq=ints["seq"],
        ts_ms=ints["ts_ms"],
        fingerprint=fingerprint,
        degree=degree,
        samples=samples,
        specs=specs,
        tensors=tensors,
        wire_bytes=message.wire_bytes,
    )


def open_update(
    frames: Sequence[Buffer], limits: WireLimits, known_senders: Container[PeerId] | None = None
) -> Update:
    """verify() then decode_update(): the whole receive path of the wire layer."""
    return decode_update(verify(frames, limits, known_senders), limits)


def _unpack_header(frame: memoryview, limits: WireLimits) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max(limits.max_name_bytes, limits.max_network_id_bytes, 16),
            max_bin_len=FINGERPRINT_BYTES,
            max_array_len=max(limits.max_tensors, limits.max_ndim, 3),
            max_map_len=16,
            max_ext_len=0,
        )
    # msgpack raises many exception types on hostile input (ValueError,
    # TypeError, ExtraData, StackError, UnicodeDecodeError...): all are the
    # peer's fault, none may escape as anything but MalformedMessage.
    except Exception as exc:  # noqa: BLE001
        raise MalformedMessage(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a msgpack map")
    return header


def _field_int(header: Mapping[str, Any], name: str, top: int) -> int:
    value = header[name]
    if type(value) is not int or not 0 <= value <= top:
        raise MalformedMessage(f"{name} must be an integer in [0, {top}]")
    return value


def _check_network(network: object, limits: WireLimits, error: type[Exception]) -> None:
    if not isinstance(network, str) or not 1 <= len(network.encode()) <= limits.max_network_id_bytes:
        raise error(f"network id must be a string of 1..{limits.max_network_id_bytes} UTF-8 bytes")


def _parse_specs(raw: object, limits: WireLimits) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, list) or len(raw) > limits.max_tensors:
        raise MalformedMessage(f"tensors must be a list of at most {limits.max_tensors} entries")
    specs: list[TensorSpec] = []
    names: set[str] = set()
    for entry in raw:
        if not (isinstance(entry, list) and len(entry) == 3):
            raise MalformedMessage("each tensor entry must be [name, dtype, shape]")
        name, dtype, shape = entry
        if not isinstance(name, str) or not name or name in names:
            raise MalformedMessage(f"tensor name {name!r} is empty, not a string or repeated")
        if not isinstance(dtype, str) or dtype not in limits.dtypes or dtype not in DTYPES:
            raise MalformedMessage(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if (
            not isinstance(shape, list)
            or len(shape) > limits.max_ndim
            or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
        ):
            raise MalformedMessage(f"tensor {name!r}: shape must be <= {limits.max_ndim} non-negative ints")
        # Bound the product of max(d, 1): a zero dimension must not hide huge
        # others (numpy refuses such shapes, and the bound should not depend
        # on where the zero is). Checked while multiplying: no huge integers.
        bound = 1
        for dim in shape:
            bound *= max(dim, 1)
            if bound > limits.max_tensor_elements:
                raise MessageTooLarge(f"tensor {name!r} exceeds max_tensor_elements")
        names.add(name)
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    return tuple(specs)
