"""The wire format, version 2: one signed, msgpack-headed buffer per message.

A message is ONE byte string (one ZeroMQ frame; docs/protocol.md is the
normative spec)::

    prelude   101 bytes   b"P2FM" | version u8 (= 2) | sender key (32) | signature (64)
    u32le H               length of the header
    header    H bytes     a msgpack map; for an update it lists the tensors
                          ([name, dtype, shape]) and carries BLAKE3(payload)
    payload               the tensors' bytes, concatenated in header order
                          (updates only; empty otherwise): raw little-endian
                          values, or a lossy encoding of a float32 tensor
                          (p2pfm/core/codec.py: q8, topk8_dN)

The signature is Ed25519 over the 32-byte BLAKE3 digest of the *head*:
``message[0:37] || message[101:105+H]`` (prelude without its signature, the
header length and the header). The header binds the payload through its
``payload`` digest. So a signed head is a small self-contained statement
("sender S says round r is the state with digest D"): two different heads
signed by one sender for one round are a compact, checkable proof that it
equivocated (:func:`check_evidence`), and a receiver judges a message (replay,
round, rate) from its head before it hashes the payload.

Why one buffer and not one frame per tensor (version 1): libzmq bounds each
frame (``MAXMSGSIZE``), never a multipart message, and buffers a whole
multipart message before the application sees any of it. With one frame per
message, ``MAXMSGSIZE`` bounds the whole message, and a conflating PULL
socket (``ZMQ_CONFLATE``) keeps at most one frame per link.

Receiving is typed steps, so that nothing is decoded before it is
authenticated: :func:`verify` bounds sizes and checks the head's signature
and returns a :class:`Verified`; only :func:`decode_header` accepts one, and
only :func:`decode_payload` turns a checked header into arrays.
"""

from __future__ import annotations

import dataclasses
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

from p2pfm.core import codec
from p2pfm.core.errors import (
    BadSignature,
    LocalProtocolError,
    MalformedMessage,
    MessageTooLarge,
    UnknownSender,
    UnsupportedVersion,
)
from p2pfm.core.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, PeerId

MAGIC = b"P2FM"
WIRE_VERSION = 2
KIND_UPDATE = "update"
KIND_EQUIVOCATION = "equivocation"
FINGERPRINT_BYTES = 32
DIGEST_BYTES = 32
_SIGNED_PRELUDE_BYTES = len(MAGIC) + 1 + PUBLIC_KEY_BYTES  # 37
PRELUDE_BYTES = _SIGNED_PRELUDE_BYTES + SIGNATURE_BYTES  # 101
HEAD_OVERHEAD_BYTES = PRELUDE_BYTES + 4  # prelude + u32le header length = 105
_MAX_INT = 2**63 - 1  # every integer field fits a signed 64-bit int
_MAX_DIM = 2**31 - 1
_UPDATE_KEYS = frozenset(
    {"kind", "network", "round", "seq", "ts_ms", "fingerprint", "degree", "samples", "tensors", "payload"}
)
# Optional update keys: ``base`` (a compressed difference names the round it builds on) and
# ``resync`` (a compressing node names the senders whose chains it lost: docs/protocol.md 8.3).
_OPTIONAL_UPDATE_KEYS = frozenset({"base", "resync"})
_PROOF_KEYS = frozenset({"kind", "network", "evidence"})
_MAX_MAP_KEYS = 16

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
# Lossy encodings a float32 tensor may travel as (p2pfm/core/codec.py,
# docs/protocol.md 5.1); a receiver decodes them to dense float32 arrays.
ENCODINGS: tuple[str, ...] = codec.ENCODINGS
# Every name a header's dtype may hold, in a fixed order.
WIRE_DTYPES: tuple[str, ...] = (*DTYPES, *ENCODINGS)
_WIRE_DTYPE_SET, _ENCODING_SET = frozenset(WIRE_DTYPES), frozenset(ENCODINGS)


@dataclass(frozen=True)
class WireLimits:
    """Hard bounds a receiver checks before it allocates or hashes anything.

    The defaults fit any model up to a 7B-parameter LoRA adapter; a node
    derives tighter ones from its own schema (:func:`limits_for_schema`).
    """

    max_message_bytes: int = 512 * 2**20  # a 7B-model LoRA r=16 fp32 adapter is ~160 MiB
    max_header_bytes: int = 2**20  # 4096 tensor entries need ~200 KiB
    max_tensors: int = 4096
    max_tensor_elements: int = 2**28
    max_ndim: int = 8
    max_name_bytes: int = 256
    max_network_id_bytes: int = 64
    # The dense float32 arrays of an update's lossy tensors (4 bytes per
    # element, allocated when decoded): a 1 MiB topk8_d64 payload decodes to ~28 MiB.
    max_decoded_bytes: int = 512 * 2**20
    max_resync_peers: int = 16  # senders one update may ask for a keyframe (more wait their turn)
    dtypes: frozenset[str] = field(default_factory=lambda: frozenset(WIRE_DTYPES))

    @property
    def max_head_bytes(self) -> int:
        """Largest signed head of an update: what one piece of equivocation evidence may be."""
        return HEAD_OVERHEAD_BYTES + self.max_header_bytes

    @property
    def max_proof_header_bytes(self) -> int:
        """An equivocation proof's header holds two heads plus a few keys."""
        return 2 * self.max_head_bytes + 256 + self.max_network_id_bytes


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
        """Payload bytes of this tensor: its encoded size for a lossy encoding."""
        storage = DTYPES.get(self.dtype)
        if storage is None:
            return codec.encoded_nbytes(self.dtype, self.shape)
        return self.elements * storage.itemsize


@dataclass(frozen=True)
class Unsigned:
    """Header and payload pieces of a message not yet signed."""

    header: bytes
    payload: tuple[Buffer, ...] = ()


@dataclass(frozen=True)
class Verified:
    """A message whose size bounds and head signature have been checked."""

    sender: PeerId
    head: memoryview  # message[0 : 105 + H]: the signed part, kept as evidence
    header: memoryview
    payload: memoryview
    wire_bytes: int


@dataclass(frozen=True)
class UpdateHeader:
    """The checked header of an update (its payload not yet hashed or decoded)."""

    sender: PeerId
    network: str
    round: int
    seq: int
    ts_ms: int
    fingerprint: bytes
    degree: int
    samples: int
    specs: tuple[TensorSpec, ...]
    payload_digest: bytes
    # None: the tensors are the sender's state. An int: they are a compressed difference on top of
    # the sender's message of round ``base`` (p2pfm/core/compression.py; docs/protocol.md 4.2).
    base: int | None
    # Senders whose chains the sender of this update lost: each is asked for a keyframe (8.3).
    resync: tuple[PeerId, ...] = field(default=(), kw_only=True)


_HEADER_FIELDS = tuple(f.name for f in dataclasses.fields(UpdateHeader))


@dataclass(frozen=True)
class ProofHeader:
    """An equivocation proof: two signed update heads of one sender for one round."""

    sender: PeerId  # who relays the proof (not the accused)
    network: str
    evidence: tuple[bytes, bytes]


@dataclass(frozen=True)
class Update(UpdateHeader):
    """A decoded, authenticated adapter update: its header and its tensors (not yet judged)."""

    tensors: dict[str, np.ndarray[Any, Any]]  # read-only: views into the message, or decoded (lossy)
    wire_bytes: int


@dataclass(frozen=True)
class Evidence:
    """What a valid equivocation proof establishes (:func:`check_evidence`)."""

    accused: PeerId
    network: str
    round: int
    fingerprints: tuple[bytes, bytes]


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
    tensors: Mapping[str, np.ndarray[Any, Any] | codec.Encoded],
    wire_dtypes: Mapping[str, str] | None = None,
    limits: WireLimits | None = None,
    base: int | None = None,
    resync: Sequence[PeerId] = (),
) -> Unsigned:
    """Build the header and payload of an update. Raises LocalProtocolError on misuse.

    ``base`` (0 <= base < round) marks the tensors as a difference on top of
    the sender's message of that round (compressed gossip); None: a state.
    ``resync``: distinct peers whose chains this node lost, asked for a
    keyframe (at most ``limits.max_resync_peers``).

    ``wire_dtypes`` optionally casts tensors for transport (for example
    ``{"w": "bfloat16"}`` halves the bytes of a float32 tensor), or encodes
    float32 tensors lossily (``{"w": "q8"}``, ``{"w": "topk8_d16"}``;
    p2pfm/core/codec.py; ``codec.roundtrip`` gives what receivers decode).
    A tensor may also come encoded already (``codec.Encoded``, its encoding
    the tensor's wire dtype): its bytes travel as they are.
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
    if base is not None and (type(base) is not int or not 0 <= base < round):
        raise LocalProtocolError(f"base must be an int in [0, round), got {base!r} in round {round}")
    if len(tensors) > limits.max_tensors:
        raise LocalProtocolError(f"{len(tensors)} tensors exceed max_tensors={limits.max_tensors}")
    if len(resync) > limits.max_resync_peers or len(set(resync)) != len(resync):
        raise LocalProtocolError(f"resync must list at most {limits.max_resync_peers} distinct peers")
    entries: list[list[Any]] = []
    data: list[Buffer] = []
    payload_hash = blake3.blake3(max_threads=1)
    for name, array in tensors.items():
        wire_dtype = (wire_dtypes or {}).get(name) or (
            array.encoding if isinstance(array, codec.Encoded) else _wire_dtype_of(name, array)
        )
        if len(name.encode()) > limits.max_name_bytes or not name:
            raise LocalProtocolError(f"tensor name {name!r} must be 1..{limits.max_name_bytes} bytes")
        entries.append([name, wire_dtype, list(array.shape)])
        chunk = _to_wire_bytes(name, array, wire_dtype)
        payload_hash.update(chunk)
        data.append(chunk)
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
        "payload": payload_hash.digest(),
    }
    if base is not None:
        header["base"] = base
    if resync:
        header["resync"] = [peer.key for peer in resync]
    return Unsigned(msgpack.packb(header, use_bin_type=True), tuple(data))


def encode_proof(
    *, network: str, evidence: tuple[bytes, bytes], limits: WireLimits | None = None
) -> Unsigned:
    """Build an equivocation proof message (signed by whoever relays it)."""
    limits = limits or WireLimits()
    _check_network(network, limits, LocalProtocolError)
    if len(evidence) != 2 or not all(isinstance(e, bytes) for e in evidence):
        raise LocalProtocolError("evidence must be two signed heads (bytes)")
    header = {"kind": KIND_EQUIVOCATION, "network": network, "evidence": list(evidence)}
    return Unsigned(msgpack.packb(header, use_bin_type=True))


def sign(message: Unsigned, identity: Identity) -> bytes:
    """Sign the head and return the whole message as one buffer (one ZeroMQ frame)."""
    signed_prelude = MAGIC + bytes([WIRE_VERSION]) + identity.peer_id.key
    length = struct.pack("<I", len(message.header))
    signature = identity.sign(_head_digest(signed_prelude, length, message.header))
    # One copy of the tensor bytes into the message: the price of a single
    # frame, which is what lets the transport bound a whole message.
    return b"".join((signed_prelude, signature, length, message.header, *message.payload))


def _wire_dtype_of(name: str, array: np.ndarray[Any, Any]) -> str:
    try:
        return _NUMPY_TO_WIRE[array.dtype.newbyteorder("=")]
    except KeyError:
        raise LocalProtocolError(f"tensor {name!r} has unsupported dtype {array.dtype}") from None


def _to_wire_bytes(name: str, array: np.ndarray[Any, Any] | codec.Encoded, wire_dtype: str) -> memoryview:
    if isinstance(array, codec.Encoded):  # encoded by the caller (compression's error feedback)
        if array.encoding != wire_dtype:
            raise LocalProtocolError(
                f"tensor {name!r} is encoded as {array.encoding}, but its wire dtype is {wire_dtype}"
            )
        return array.data
    if wire_dtype in ENCODINGS:
        if array.dtype.kind != "f" or array.dtype.itemsize != 4:
            raise LocalProtocolError(
                f"tensor {name!r}: only float32 arrays can travel as {wire_dtype}, not {array.dtype}"
            )
        try:
            return codec.encode(wire_dtype, array)
        except LocalProtocolError as exc:
            raise LocalProtocolError(f"tensor {name!r}: {exc}") from None
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
    """Widen bfloat16 bit patterns to float32; exact. Keeps the shape, also of a 0-d array."""
    widened = np.array(bits, dtype="<u4")  # an array even for a scalar: `<<` on 0-d would give a scalar
    np.left_shift(widened, 16, out=widened)
    return widened.view("<f4")


# ------------------------------------------------------------ derived limits


def limits_for_schema(
    specs: Sequence[TensorSpec], *, network: str, base: WireLimits | None = None
) -> WireLimits:
    """Tight limits for a node whose updates have exactly ``specs``.

    A legitimate update of this schema cannot exceed them: the header bound
    is twice the header with every integer at its widest value, plus a full
    ``resync`` list, plus 1 KiB
    (writers must use msgpack's smallest encodings, docs/protocol.md), and
    the message bound is that plus the payload. Equivocation proofs of the
    same schema fit as well. Used for the transport's ``MAXMSGSIZE``, so
    that nobody (not even before the CurveZMQ handshake) makes the node
    buffer more than one legitimate message per connection. The decoded
    bound is the schema's tensors as dense float32 (4 bytes per element,
    whatever their dtype): the same for a schema and its float32 twin.
    """
    base = base or WireLimits()
    widest = encode_update(
        network=network, round=_MAX_INT, seq=_MAX_INT, ts_ms=_MAX_INT, fingerprint=bytes(FINGERPRINT_BYTES),
        degree=_MAX_DIM, samples=_MAX_INT, base=_MAX_INT - 1,
        tensors={s.name: np.zeros(0, np.float32) for s in specs},
        wire_dtypes={s.name: s.dtype for s in specs}, limits=base,
    ).header  # fmt: skip
    # The shapes above are [0]: add what the real shapes take, at most 9 bytes per dimension.
    header_bound = 2 * (len(widest) + sum(9 * len(s.shape) for s in specs)) + _resync_bytes(base) + 1024
    header_bound = min(header_bound, base.max_header_bytes)
    payload = sum(s.nbytes for s in specs)
    decoded = min(4 * sum(s.elements for s in specs), base.max_decoded_bytes)
    limits = dataclasses.replace(base, max_header_bytes=header_bound, max_decoded_bytes=decoded)
    biggest = HEAD_OVERHEAD_BYTES + max(header_bound + payload, limits.max_proof_header_bytes)
    return dataclasses.replace(limits, max_message_bytes=min(biggest, base.max_message_bytes))


def _resync_bytes(limits: WireLimits) -> int:
    """What a full ``resync`` entry adds to a header: its key and an array of max_resync_peers keys."""
    keys = [bytes([i % 256]) * PUBLIC_KEY_BYTES for i in range(limits.max_resync_peers)]
    return len(msgpack.packb({"resync": keys}, use_bin_type=True)) - 1  # less the map's own first byte


# --------------------------------------------------------------------- verify


def message_bytes(message: Buffer) -> int:
    """Size of a message, in bytes."""
    return memoryview(message).nbytes


def verify(message: Buffer, limits: WireLimits, known_senders: Container[PeerId] | None = None) -> Verified:
    """Bound sizes and check the head's signature; decode nothing. Raises RemoteProtocolError.

    ``known_senders``, when given, refuses unknown keys before any hashing.
    Only the head is hashed here (small); the payload is checked against the
    signed digest by :func:`decode_payload`.
    """
    view = _byte_view(message)
    total = view.nbytes
    if total > limits.max_message_bytes:
        raise MessageTooLarge(f"{total} bytes exceed max_message_bytes={limits.max_message_bytes}")
    if total < HEAD_OVERHEAD_BYTES or bytes(view[:4]) != MAGIC:
        raise MalformedMessage("message does not start with a p2pfm prelude")
    if view[4] != WIRE_VERSION:
        raise UnsupportedVersion(f"wire version {view[4]}; this node speaks {WIRE_VERSION}")
    (header_len,) = struct.unpack_from("<I", view, PRELUDE_BYTES)
    if header_len > max(limits.max_header_bytes, limits.max_proof_header_bytes):
        raise MessageTooLarge(f"header of {header_len} bytes exceeds the header bound")
    head_end = HEAD_OVERHEAD_BYTES + header_len
    if header_len == 0 or head_end > total:
        raise MalformedMessage(f"header length {header_len} does not fit a {total}-byte message")
    sender = PeerId(bytes(view[5:_SIGNED_PRELUDE_BYTES]))
    if known_senders is not None and sender not in known_senders:
        raise UnknownSender(f"sender {sender.short} is not a known peer")
    _check_signature(sender, view[:head_end])
    return Verified(
        sender=sender,
        head=view[:head_end],
        header=view[HEAD_OVERHEAD_BYTES:head_end],
        payload=view[head_end:],
        wire_bytes=total,
    )


def _check_signature(sender: PeerId, head: memoryview) -> None:
    digest = _head_digest(
        bytes(head[:_SIGNED_PRELUDE_BYTES]),
        head[PRELUDE_BYTES:HEAD_OVERHEAD_BYTES],
        head[HEAD_OVERHEAD_BYTES:],
    )
    try:
        _verify_key(sender.key).verify(digest, bytes(head[_SIGNED_PRELUDE_BYTES:PRELUDE_BYTES]))
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
        raise BadSignature(f"signature from {sender.short} does not verify") from None


@functools.lru_cache(maxsize=4096)
def _verify_key(key: bytes) -> nacl.signing.VerifyKey:
    """Decoding a public key costs a point decompression; peers are few, cache it."""
    return nacl.signing.VerifyKey(key)


def _byte_view(frame: Buffer) -> memoryview:
    view = memoryview(frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _head_digest(signed_prelude: bytes, length: Buffer, header: Buffer) -> bytes:
    """BLAKE3-256 of prelude[0:37] | u32le(H) | header: what Ed25519 signs."""
    hasher = blake3.blake3(max_threads=1)
    hasher.update(signed_prelude)
    hasher.update(length)
    hasher.update(header)
    return hasher.digest()


# --------------------------------------------------------------------- decode


def decode_header(message: Verified, limits: WireLimits) -> UpdateHeader | ProofHeader:
    """Parse and check an authenticated header. Raises RemoteProtocolError."""
    header = _unpack_header(message.header, limits)
    kind = header.get("kind")
    if kind == KIND_UPDATE:
        if message.header.nbytes > limits.max_header_bytes:
            raise MessageTooLarge(f"update header of {message.header.nbytes} bytes exceeds max_header_bytes")
        return _update_header(message.sender, header, limits)
    if kind == KIND_EQUIVOCATION:
        if set(header) != _PROOF_KEYS:
            raise MalformedMessage(f"proof header keys {sorted(header)} differ from {sorted(_PROOF_KEYS)}")
        if message.payload.nbytes:
            raise MalformedMessage("an equivocation proof carries no payload")
        _check_network(header["network"], limits, MalformedMessage)
        evidence = header["evidence"]
        if not (
            isinstance(evidence, tuple)
            and len(evidence) == 2
            and all(isinstance(e, bytes) and len(e) <= limits.max_head_bytes for e in evidence)
        ):
            raise MalformedMessage(f"evidence must be two signed heads of <= {limits.max_head_bytes} bytes")
        return ProofHeader(message.sender, header["network"], (evidence[0], evidence[1]))
    raise MalformedMessage(f"kind {kind!r} is not one of {KIND_UPDATE!r}, {KIND_EQUIVOCATION!r}")


def _update_header(sender: PeerId, header: Mapping[str, Any], limits: WireLimits) -> UpdateHeader:
    keys = set(header)
    if not _UPDATE_KEYS <= keys <= _UPDATE_KEYS | _OPTIONAL_UPDATE_KEYS:
        raise MalformedMessage(
            f"header keys {sorted(header)} differ from {sorted(_UPDATE_KEYS)} "
            f"(and optionally {', '.join(sorted(_OPTIONAL_UPDATE_KEYS))})"
        )
    _check_network(header["network"], limits, MalformedMessage)
    ints = {name: _field_int(header, name, _MAX_INT) for name in ("round", "seq", "ts_ms", "samples")}
    base = None
    if "base" in header:
        base = _field_int(header, "base", _MAX_INT)
        if base >= ints["round"]:
            raise MalformedMessage(f"base {base} must be below the round ({ints['round']})")
    degree = _field_int(header, "degree", _MAX_DIM)
    resync = _resync(header["resync"], limits) if "resync" in header else ()
    for name in ("fingerprint", "payload"):
        value = header[name]
        if not isinstance(value, bytes) or len(value) != 32:
            raise MalformedMessage(f"{name} must be 32 bytes of msgpack bin")
    return UpdateHeader(
        sender=sender,
        network=header["network"],
        round=ints["round"],
        seq=ints["seq"],
        ts_ms=ints["ts_ms"],
        fingerprint=header["fingerprint"],
        degree=degree,
        samples=ints["samples"],
        specs=_parse_specs(header["tensors"], limits),
        payload_digest=header["payload"],
        base=base,
        resync=resync,
    )


def _resync(value: Any, limits: WireLimits) -> tuple[PeerId, ...]:
    """An update's ``resync`` list: 1 .. max_resync_peers distinct 32-byte keys."""
    if not (
        isinstance(value, tuple)
        and 1 <= len(value) <= limits.max_resync_peers
        and all(isinstance(key, bytes) and len(key) == PUBLIC_KEY_BYTES for key in value)
    ):
        raise MalformedMessage(
            f"resync must be an array of 1..{limits.max_resync_peers} keys of {PUBLIC_KEY_BYTES} bytes"
        )
    if len(set(value)) != len(value):
        raise MalformedMessage("resync lists a peer twice")
    return tuple(PeerId(key) for key in value)


def decode_payload(message: Verified, header: UpdateHeader) -> dict[str, np.ndarray[Any, Any]]:
    """Check the payload against the signed digest and return read-only tensors.

    Raw dtypes are views into the message; bfloat16 and the lossy encodings
    are decoded to new float32 arrays (after the digest check). Raises
    MalformedMessage (wrong length, invalid lossy bytes) or BadSignature
    (bytes differ from what the sender signed).
    """
    payload = message.payload
    expected = sum(spec.nbytes for spec in header.specs)
    if payload.nbytes != expected:
        raise MalformedMessage(f"payload of {payload.nbytes} bytes; the header's tensors need {expected}")
    if blake3.blake3(payload, max_threads=1).digest() != header.payload_digest:
        raise BadSignature(f"payload from {header.sender.short} does not match its signed digest")
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for spec in header.specs:
        nbytes = spec.nbytes
        chunk = payload[offset : offset + nbytes]
        offset += nbytes
        storage = DTYPES.get(spec.dtype)
        if storage is None:  # a lossy encoding: checked and decoded to a new dense float32 array
            try:
                array = codec.decode(spec.dtype, spec.shape, chunk)
            except MalformedMessage as exc:
                raise MalformedMessage(f"tensor {spec.name!r}: {exc}") from None
        else:
            array = np.frombuffer(chunk, dtype=storage).reshape(spec.shape)
            if spec.dtype == "bfloat16":
                array = bfloat16_bits_to_float32(array)
        array.flags.writeable = False
        tensors[spec.name] = array
    return tensors


def decode_update(message: Verified, limits: WireLimits) -> Update:
    """decode_header() then decode_payload() for a message that must be an update."""
    header = decode_header(message, limits)
    if not isinstance(header, UpdateHeader):
        raise MalformedMessage(f"expected an update, got kind {KIND_EQUIVOCATION!r}")
    return update_of(header, decode_payload(message, header), message.wire_bytes)


def update_of(header: UpdateHeader, tensors: dict[str, np.ndarray[Any, Any]], wire_bytes: int) -> Update:
    fields = {name: getattr(header, name) for name in _HEADER_FIELDS}
    return Update(**fields, tensors=tensors, wire_bytes=wire_bytes)


def open_update(
    message: Buffer, limits: WireLimits, known_senders: Container[PeerId] | None = None
) -> Update:
    """verify() then decode_update(): the whole receive path of the wire layer."""
    return decode_update(verify(message, limits, known_senders), limits)


def check_evidence(first: bytes, second: bytes, limits: WireLimits) -> Evidence:
    """Check an equivocation proof: two different update heads, validly signed by
    one sender, for one network and one round. Raises MalformedMessage otherwise.

    Needs nothing but the two heads: anyone can check a proof file.
    """
    if first == second:
        raise MalformedMessage("evidence: the two heads are identical")
    headers = []
    for head in (first, second):
        try:
            verified = verify(head, limits)
            header = decode_header(verified, limits)
        except (MalformedMessage, MessageTooLarge, BadSignature, UnsupportedVersion, UnknownSender) as exc:
            raise MalformedMessage(f"evidence: a head does not check ({exc})") from None
        if verified.payload.nbytes or not isinstance(header, UpdateHeader):
            raise MalformedMessage("evidence must be the signed heads of two updates, without payload")
        headers.append(header)
    a, b = headers
    if a.sender != b.sender or a.network != b.network or a.round != b.round:
        raise MalformedMessage("evidence: the heads differ in sender, network or round")
    return Evidence(a.sender, a.network, a.round, (a.fingerprint, b.fingerprint))


def _unpack_header(frame: memoryview, limits: WireLimits) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            use_list=False,  # arrays as tuples: hashable, so a header's tensor list can key a cache
            object_pairs_hook=unique_keys,
            max_str_len=max(limits.max_name_bytes, limits.max_network_id_bytes, 16),
            max_bin_len=max(limits.max_head_bytes, DIGEST_BYTES),
            max_array_len=max(limits.max_tensors, limits.max_ndim, 3),
            max_map_len=_MAX_MAP_KEYS,
            max_ext_len=0,
        )
    # msgpack raises many exception types on hostile input (ValueError,
    # TypeError, ExtraData, StackError, UnicodeDecodeError...): all are the
    # peer's fault, none may escape as anything but MalformedMessage.
    except Exception as exc:  # noqa: BLE001
        raise MalformedMessage(f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise MalformedMessage("header is not a msgpack map")
    return header


def unique_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map with a repeated key is refused: which value wins would be up to the parser."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a map repeats a key")
    return out


def _field_int(header: Mapping[str, Any], name: str, top: int) -> int:
    value = header[name]
    if type(value) is not int or not 0 <= value <= top:
        raise MalformedMessage(f"{name} must be an integer in [0, {top}]")
    return value


def _check_network(network: object, limits: WireLimits, error: type[Exception]) -> None:
    if not isinstance(network, str) or not 1 <= len(network.encode()) <= limits.max_network_id_bytes:
        raise error(f"network id must be a string of 1..{limits.max_network_id_bytes} UTF-8 bytes")


def _parse_specs(raw: object, limits: WireLimits) -> tuple[TensorSpec, ...]:
    """The header's tensor list as specs; every neighbour sends the same list each round, so it is cached.

    Only lists that parsed are cached (an exception is never cached), and
    the cache is small and bounded: a peer varying its list only makes us
    parse again.
    """
    try:
        return _parse_specs_cached(raw, limits)
    except TypeError:  # unhashable (a map inside): not a valid list anyway; the parser says why
        return _parse_specs_uncached(raw, limits)


@functools.lru_cache(maxsize=64)
def _parse_specs_cached(raw: object, limits: WireLimits) -> tuple[TensorSpec, ...]:
    return _parse_specs_uncached(raw, limits)


def _parse_specs_uncached(raw: object, limits: WireLimits) -> tuple[TensorSpec, ...]:
    if not isinstance(raw, tuple) or len(raw) > limits.max_tensors:
        raise MalformedMessage(f"tensors must be a list of at most {limits.max_tensors} entries")
    specs: list[TensorSpec] = []
    names: set[str] = set()
    decoded = 0  # bytes of the dense float32 arrays of the lossy tensors so far
    for entry in raw:
        if not (isinstance(entry, tuple) and len(entry) == 3):
            raise MalformedMessage("each tensor entry must be [name, dtype, shape]")
        name, dtype, shape = entry
        if not isinstance(name, str) or not name or name in names:
            raise MalformedMessage(f"tensor name {name!r} is empty, not a string or repeated")
        if len(name.encode()) > limits.max_name_bytes:
            raise MalformedMessage(f"tensor name longer than {limits.max_name_bytes} bytes")
        if not isinstance(dtype, str) or dtype not in limits.dtypes or dtype not in _WIRE_DTYPE_SET:
            raise MalformedMessage(f"tensor {name!r}: dtype {dtype!r} is not allowed")
        if (
            not isinstance(shape, tuple)
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
        if dtype in _ENCODING_SET:
            decoded += 4 * math.prod(shape)
            if decoded > limits.max_decoded_bytes:
                raise MessageTooLarge(
                    f"tensor {name!r}: lossy tensors decode to more than max_decoded_bytes="
                    f"{limits.max_decoded_bytes}"
                )
        names.add(name)
        specs.append(TensorSpec(name, dtype, shape))
    return tuple(specs)
