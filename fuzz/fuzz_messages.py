"""Fuzz the wire decoder and the gossip protocol with random and mutated messages (wire version 2).

Why: every byte a node parses comes from peers it does not control. The
decoder (``wire.verify`` + ``wire.decode_header`` + ``wire.decode_payload``
or ``wire.check_evidence``) may raise nothing but ``RemoteProtocolError``;
``GossipProtocol.receive`` must never raise, never accept bytes that the
sender's key did not sign (head signature *and* payload digest), never take
as evidence heads that the accused did not sign, and judge every message
quickly.

Usage::

    python fuzz/fuzz_messages.py [--messages 100000] [--seed 0] [--json] [--replay INDEX]

A message is one buffer: prelude (101) | u32le header length | msgpack header
| payload. Generators (mixed 35/33/12/20):

- ``mutated`` damages messages validly signed by a neighbour (the pool): bit
  flips and byte edits in prelude / header length / header / payload, header
  length lies, truncation, extension, insertion, deletion, grafts from other
  messages, forged prelude fields, huge messages;
- ``insider`` signs hostile or well-formed headers with a neighbour's key
  (duplicate keys, wrong types, huge shapes, zero dims, wrong payload digest,
  payload length mismatch, random msgpack trees, proofs with hostile
  evidence, lossy tensors (q8, topk8_dN) whose bytes are valid or damaged
  under a correct digest: bitmap population and padding, scales, -128,
  length; a chain's ``base`` and ``resync``), for a receiver that has that key as a neighbour (even messages)
  or not (odd: any acceptance is a forgery);
- ``random`` makes random buffers, some with a prelude-like start;
- ``session`` plays a short script on a *fresh* receiver (setup messages,
  then the judged one): same-round different updates (EquivocationFound),
  equivocation proofs with hostile evidence, messages of a banned sender,
  replays, floods (rate limit), rounds out of range, link/signer mismatch.

The shared receivers are rebuilt every RESET_EVERY messages; every insider
message of a block is signed by its own key (``INSIDERS``), and every pool
message by its own key, so that no two messages of one block are two heads
of one sender for one round: nobody gets banned by accident and deep paths
stay reachable. What needs state across messages (bans, replays, floods)
runs in ``session`` cases on fresh receivers.

Message ``i`` comes from ``random.Random(f"{seed}:{i}")``: ``--replay i``
rebuilds a reproducer from (seed, i) alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import random
import signal
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import blake3
import msgpack
import numpy as np

from p2pfm.core import codec, wire
from p2pfm.core.errors import RemoteProtocolError
from p2pfm.core.identity import Identity, PeerId
from p2pfm.core.protocol import Accepted, EquivocationFound, GossipProtocol, ProtocolConfig, Rejected
from p2pfm.core.wire import Buffer, TensorSpec, Unsigned, WireLimits


def _identity(label: str) -> Identity:
    return Identity(blake3.blake3(f"p2pfm fuzz key: {label}".encode()).digest())


RESET_EVERY, START_ROUND, SLOW_MS, HANG_S, KEEP = 500, 5, 50.0, 5.0, 5
ALICE, OTHER, INSIDER = _identity("alice"), _identity("other"), _identity("insider")
RECEIVER, STRANGER, ACCUSED = _identity("receiver"), _identity("stranger"), _identity("accused")
POOL_SIGNERS = tuple(_identity(f"genuine {k}") for k in range(32))  # one per pool message
INSIDERS = tuple(_identity(f"insider {k}") for k in range(RESET_EVERY))  # one per message of a block
NETWORK, FINGERPRINT = "fuzznet", blake3.blake3(b"fuzz adapter").digest()
SCHEMA = (TensorSpec("lora_A", "float32", (2, 8)), TensorSpec("lora_B", "bfloat16", (8, 2)),
          TensorSpec("bias", "float16", (3,)))  # fmt: skip
# Lossy schemas (codec.py) for the pool: genuine messages that open-schema receivers decode.
LOSSY = (TensorSpec("lora_A", "q8", (2, 8)), TensorSpec("lora_B", "topk8_d4", (8, 2)),
         TensorSpec("bias", "float16", (3,)))  # fmt: skip
LOSSY_EDGES = (TensorSpec("a", "q8", (300,)), TensorSpec("b", "topk8_d64", ()),
               TensorSpec("c", "topk8_d16", (0,)), TensorSpec("d", "topk8_d8", (2, 129)),
               TensorSpec("e", "topk8_d32", (7,)))  # fmt: skip
_LOSSY_SHAPES = ((), (0,), (1,), (7,), (9,), (64,), (300,), (3, 257), (16, 16), (0, 5))
TS_MS = 1_795_000_000_000  # the senders' wall clock in milliseconds (2026-11-18)
GENERATORS = ("mutated", "insider", "random", "session")
DECODER_LIMITS = WireLimits()  # the decoder target: wire defaults, any schema
_FIELDS = ("kind", "network", "round", "seq", "ts_ms", "fingerprint", "degree", "samples", "tensors",
           "payload")  # fmt: skip
_EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**28 + 1)
_DTYPES = (*wire.WIRE_DTYPES, "complex64", "float8", "", "FLOAT32", "float32 ", "bfloat16\x00", 4, None,
           "q8 ", "topk8_d2", "topk8_d", "topk8_d128", "Q8")  # fmt: skip
_HOSTILE = {
    "kind": ("equivocation", "UPDATE", b"update", "", None, 1, ["update"]),
    "network": ("", "n" * 65, "é" * 33, b"fuzznet", 7, None, "othernet", "fuzznet\x00"),
    "round": (-1, 2**63, 2**64 - 1, "5", 5.0, True, None, 2**63 - 1),
    "seq": (-1, 2**63, 0, "1", 1.0, False, 2**63 - 1),
    "ts_ms": (-1, 0, 2**63 - 1, 2**63, 1.5, "x", TS_MS + 10**9),
    "fingerprint": (bytes(31), bytes(33), "f" * 32, None, [1] * 32, bytes(32)),
    "degree": (-1, 2**31, 2**31 - 1, 0, "3", 2**63),
    "samples": (-1, 2**63, 0, 2**63 - 1, 1.0, None),
    "tensors": ({}, "t", None, [], [[]], [["lora_A", "float32", [2, 8]]], {"lora_A": 1}),
    "payload": (bytes(31), bytes(33), "p" * 32, None, bytes(32), b"", [0] * 32),
}
_FINITE = bytes(b & 0x3F for b in range(256))
_INF = {"float32": b"\x00\x00\x80\x7f", "bfloat16": b"\x80\x7f", "float16": b"\x00\x7c"}
_WIDE_STR, _WIDE_BIN = ((b"\xda", ">H"), (b"\xdb", ">I")), ((b"\xc5", ">H"), (b"\xc6", ">I"))
_WIDE_INT = ((b"\xcc", "B", 2**8), (b"\xcd", ">H", 2**16), (b"\xce", ">I", 2**32), (b"\xcf", ">Q", 2**64))
TIGHT = wire.limits_for_schema(SCHEMA, network=NETWORK)  # as a node derives them (node.py)
CONFIG = ProtocolConfig(NETWORK, FINGERPRINT, round_timeout_s=10.0, schema=SCHEMA, limits=TIGHT)
OPEN_CONFIG = ProtocolConfig(NETWORK, FINGERPRINT, round_timeout_s=10.0)  # any schema, default limits


class FuzzHang(BaseException):
    """Raised by the watchdog; a BaseException so that ``except Exception`` cannot swallow it."""


def message_digest(message: Buffer) -> bytes:
    return blake3.blake3(message).digest()


def head_of(message: Buffer) -> bytes:
    """The signed head (prelude, header length, header) of a well-formed message."""
    (length,) = struct.unpack_from("<I", message, wire.PRELUDE_BYTES)
    return bytes(memoryview(message)[: wire.HEAD_OVERHEAD_BYTES + length])


@dataclass
class Ledger:
    """What the fuzzer signed: the oracle's ground truth."""

    heads: dict[bytes, bytes] = field(default_factory=dict)  # BLAKE3(head) -> signer's key
    authentic: set[bytes] = field(default_factory=set)  # BLAKE3(message) whose payload matches its digest

    def sign(
        self, identity: Identity, header: Any = None, payload: bytes = b"", *, raw: bytes | None = None
    ) -> bytes:
        """Sign ``header`` (packed here) or ``raw`` header bytes, with ``payload`` after the head."""
        if raw is None:
            raw = msgpack.packb(header, use_bin_type=True)
        else:
            try:
                header = msgpack.unpackb(raw, strict_map_key=False)
            except Exception:  # noqa: BLE001 -- garbage header bytes: not authentic, nothing more
                header = None
        message = wire.sign(Unsigned(raw, (payload,) if payload else ()), identity)
        self.heads[message_digest(message[: len(message) - len(payload)])] = identity.peer_id.key
        if isinstance(header, dict) and header.get("payload") == blake3.blake3(payload).digest():
            self.authentic.add(message_digest(message))
        return message

    def merge(self, other: Ledger) -> None:
        self.heads.update(other.heads)
        self.authentic |= other.authentic


@dataclass
class Case:
    index: int
    generator: str
    desc: str
    message: Buffer
    ledger: Ledger = field(default_factory=Ledger)
    link: PeerId | None = None  # the peer authenticated on the connection (None: insecure transport)
    setup: tuple[bytes, ...] | None = None  # session: messages a fresh receiver gets first

    @property
    def insider_known(self) -> bool:
        return self.index % 2 == 0

    @property
    def open_schema(self) -> bool:
        """Shared receivers: half accept any schema within the wire defaults (schema None)."""
        return self.index % 4 >= 2


@dataclass(frozen=True)
class OpenedProof:
    """What the decoder target returns for an equivocation proof it could check."""

    evidence: wire.Evidence
    heads: tuple[bytes, bytes]


@dataclass
class Report:
    seed: int
    messages: int = 0
    by_generator: Counter[str] = field(default_factory=Counter)
    decoder_opened: Counter[str] = field(default_factory=Counter)  # genuine / insider / session / proof
    decoder_reasons: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # genuine / insider / session
    reasons: Counter[str] = field(default_factory=Counter)  # protocol rejections
    reasons_by_generator: dict[str, Counter[str]] = field(default_factory=dict)
    found: Counter[str] = field(default_factory=Counter)  # EquivocationFound by how
    found_by_generator: dict[str, Counter[str]] = field(default_factory=dict)
    crashes: int = 0
    crash_kinds: Counter[str] = field(default_factory=Counter)  # exception type and message
    forgeries: int = 0
    forgery_kinds: Counter[str] = field(default_factory=Counter)  # update / evidence
    reproducers: list[dict[str, Any]] = field(default_factory=list)
    slowest_ms: float = 0.0
    slowest: str = ""
    over_slow: int = 0
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(self).items()}
        for name in ("reasons_by_generator", "found_by_generator"):
            out[name] = {k: dict(v) for k, v in getattr(self, name).items()}
        return {**out, "messages_per_s": round(self.messages / max(self.wall_s, 1e-9), 1)}

    def summary(self) -> str:
        def counts(counter: Counter[str], sep: str = "  ") -> str:
            return sep.join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        ok = self.crashes == 0 and self.forgeries == 0
        return "\n".join([
            f"p2pfm message fuzzer (wire v{wire.WIRE_VERSION}): seed {self.seed}, {self.messages} messages, "
            "each to decoder and protocol",
            f"  generators        {counts(self.by_generator)}",
            f"  decoder opened    {sum(self.decoder_opened.values())} ({counts(self.decoder_opened, ', ')})",
            f"  decoder refused   {counts(self.decoder_reasons)}",
            f"  protocol accepted {sum(self.accepted.values())} ({counts(self.accepted, ', ')})",
            f"  protocol rejected {counts(self.reasons)}",
            f"  equivocation found {sum(self.found.values())} ({counts(self.found, ', ')})",
            f"  crashes {self.crashes} ({len(self.crash_kinds)} distinct)"
            f"   accepted forgeries {self.forgeries}",
            f"  slowest message {self.slowest_ms:.1f} ms ({self.slowest})",
            f"  messages over {SLOW_MS:.0f} ms (the target): {self.over_slow}",
            f"  wall time {self.wall_s:.1f} s -> {self.messages / max(self.wall_s, 1e-9):.0f} messages/s",
            *(f"  FAILURE {r}" for r in self.reproducers),
            "PASS" if ok else "FAIL",
        ])  # fmt: skip


# ------------------------------------------------------------- building blocks


def _payload(specs: Sequence[TensorSpec], rng: random.Random, fill: str = "finite") -> bytes:
    """Tensor bytes of the exact length the specs imply: finite values, random bits (NaN and Inf
    included), all-NaN or all-Inf. A lossy tensor's finite fill is a valid encoding (codec.py) of
    random finite values; its other fills are (almost always) invalid bytes."""
    if fill == "nan":  # all-ones bits are a NaN in every float format (and a NaN scale)
        return b"\xff" * sum(s.nbytes for s in specs)
    return b"".join(_tensor_bytes(s, rng, fill) for s in specs)


def _tensor_bytes(spec: TensorSpec, rng: random.Random, fill: str) -> bytes:
    if spec.dtype in wire.ENCODINGS and fill == "finite":
        return bytes(codec.encode(spec.dtype, _random_float32(spec.shape, rng)))
    if fill in ("finite", "random"):  # bytes <= 0x3f never make an all-ones float exponent
        return rng.randbytes(spec.nbytes).translate(_FINITE if fill == "finite" else None)
    pattern = _INF.get(spec.dtype, _INF["float32"])  # inf: Inf scales for a lossy tensor
    return (pattern * (spec.nbytes // len(pattern) + 1))[: spec.nbytes]


def _random_float32(shape: tuple[int, ...], rng: random.Random) -> np.ndarray[Any, Any]:
    """Finite float32 values from ``rng`` alone: normal, of one random magnitude, sometimes with ties."""
    gen = np.random.default_rng(rng.randrange(2**32))
    if rng.random() < 0.2:  # small integers: many ties at the top-k threshold, zeros
        return gen.integers(-3, 4, shape).astype(np.float32)
    scale = 10.0 ** rng.choice((-40, -20, -3, 0, 3, 30, 38))
    return np.asarray(np.clip(gen.standard_normal(shape) * scale, -3e38, 3e38), dtype=np.float32)


def _header(
    round_: int, seq: int, data: bytes, specs: Sequence[TensorSpec] = SCHEMA, /, **override: Any
) -> dict[str, Any]:
    """An update header for tensor bytes ``data``; ``override`` replaces (or adds) any field."""
    header: dict[str, Any] = {
        "kind": "update", "network": NETWORK, "round": round_, "seq": seq, "ts_ms": TS_MS,
        "fingerprint": FINGERPRINT, "degree": 3, "samples": 64,
        "tensors": [[s.name, s.dtype, list(s.shape)] for s in specs],
        "payload": blake3.blake3(data).digest(),
    }  # fmt: skip
    return {**header, **override}


def _update(
    ledger: Ledger,
    identity: Identity,
    rng: random.Random,
    round_: int,
    seq: int,
    /,
    *,
    specs: Sequence[TensorSpec] = SCHEMA,
    fill: str = "finite",
    data: bytes | None = None,
    **override: Any,
) -> bytes:
    """A well-formed update (unless ``override`` says otherwise) with tensor bytes ``data``, signed."""
    data = _payload(specs, rng, fill) if data is None else data
    return ledger.sign(identity, _header(round_, seq, data, specs, **override), data)


def _proof(ledger: Ledger, relay: Identity, evidence: Any, override: dict[str, Any] | None = None) -> bytes:
    """An equivocation proof signed by ``relay``; ``override`` edits its header (_DROP removes a key)."""
    header = {"kind": wire.KIND_EQUIVOCATION, "network": NETWORK, "evidence": evidence, **(override or {})}
    return ledger.sign(relay, {k: v for k, v in header.items() if v is not _DROP})


_DROP = object()  # an override value that removes the key


@dataclass
class Pool:
    """Valid messages (mutation seeds), each signed by its own neighbour key."""

    messages: list[bytes]
    ledger: Ledger


def genuine_pool(seed: int) -> Pool:
    rng = random.Random(f"{seed}:pool")
    ledger = Ledger()
    variants: list[tuple[tuple[TensorSpec, ...], dict[str, Any]]] = [
        (SCHEMA, {}), (SCHEMA, {}), (SCHEMA, {"network": "othernet"}), (SCHEMA, {"fingerprint": bytes(32)}),
        ((), {}), ((TensorSpec("x", "int8", (5,)), TensorSpec("y", "float32", ())), {}), (SCHEMA[:1], {}),
        (SCHEMA, {"stranger": True}), (LOSSY, {}), (LOSSY_EDGES, {}),
    ]  # fmt: skip
    messages = []
    for k, (specs, fields) in enumerate(variants * 3):
        override = dict(fields)
        signer = STRANGER if override.pop("stranger", False) else POOL_SIGNERS[k]
        round_ = rng.randrange(START_ROUND - 1, START_ROUND + 4)
        messages.append(_update(ledger, signer, rng, round_, k + 1, specs=specs, **override))
    for k in range(2):  # two relayed proofs that ACCUSED (no neighbour) equivocated
        heads = [head_of(_update(ledger, ACCUSED, rng, START_ROUND + k, seq)) for seq in (1, 2)]
        messages.append(_proof(ledger, POOL_SIGNERS[len(variants) * 3 + k], heads))
    return Pool(messages, ledger)


# ---------------------------------------------------------------- mutations


def _regions(message: bytes | bytearray) -> dict[str, tuple[int, int]]:
    """Byte ranges of the four parts, as the header length field claims them (clipped)."""
    n = len(message)
    claimed = struct.unpack_from("<I", message, wire.PRELUDE_BYTES)[0] if n >= wire.HEAD_OVERHEAD_BYTES else 0
    head_end = min(n, wire.HEAD_OVERHEAD_BYTES + claimed)
    p, h = min(n, wire.PRELUDE_BYTES), min(n, wire.HEAD_OVERHEAD_BYTES)
    return {"prelude": (0, p), "length": (p, h), "header": (h, head_end), "payload": (head_end, n)}


def _mutate_prelude(message: bytearray, pool: Pool, rng: random.Random) -> str:
    what = rng.choice(("version", "magic", "key", "key", "sig", "sig"))
    if what == "version" and len(message) > 4:
        message[4] = rng.choice((0, 1, 3, 255))
    elif what == "magic":
        message[: rng.randrange(1, 5)] = b"p2fm"[: rng.randrange(1, 5)]
    elif what == "key" and len(message) >= 37:
        pick = rng.choice((POOL_SIGNERS[0], POOL_SIGNERS[1], STRANGER, RECEIVER, None))
        message[5:37] = pick.peer_id.key if pick else rng.choice((rng.randbytes(32), bytes(32), b"\xff" * 32))
    elif what == "sig" and len(message) >= 101:
        donor = rng.choice(pool.messages)
        message[37:101] = rng.choice((donor[37:101], bytes(64), b"\xff" * 64, rng.randbytes(64)))
    else:
        message[len(message) - 1 :] = b"" if rng.random() < 0.5 else b"\0\0"
    return f"prelude {what}"


def _mutate(message: bytearray, pool: Pool, rng: random.Random) -> tuple[bytearray, str]:
    """Apply one random mutation; return the message and what was done."""
    regions = _regions(message)
    present = [name for name, (a, b) in regions.items() if b > a]
    region = rng.choice(
        [p for p in present for _ in range(2 if p in ("header", "payload") else 1)] or ["prelude"]
    )
    a, b = regions[region]
    op = rng.choice(("flip", "flip", "flip", "byte", "byte", "truncate", "extend", "lenlie", "lenlie",
                     "insert", "delete", "graft", "prelude", "lenclaim"))  # fmt: skip
    if op in ("flip", "byte", "delete", "lenclaim") and b - a < (5 if op == "lenclaim" else 1):
        op = "extend"
    if op == "lenlie" and len(message) < wire.HEAD_OVERHEAD_BYTES:
        op = "truncate"
    if op in ("flip", "byte"):
        pos = rng.randrange(a, b)
        message[pos] = message[pos] ^ (1 << rng.randrange(8)) if op == "flip" else rng.randrange(256)
        return message, f"{op} byte {pos} ({region})"
    if op == "truncate":
        end = regions["header"][1]
        cut = rng.choice((rng.randrange(len(message) + 1), 0, 4, 5, 37, 100, 101, 104, 105, end - 1, end,
                          len(message) - 1))  # fmt: skip
        cut = min(max(cut, 0), len(message))
        return message[:cut], f"truncate to {cut} of {len(message)}"
    if op == "extend":
        size = rng.choice((1, 7, 64, 1000, TIGHT.max_message_bytes))
        tail = bytes(size) if rng.random() < 0.3 else rng.randbytes(size)
        return message + tail, f"extend by {size}"
    if op == "lenlie":
        (length,) = struct.unpack_from("<I", message, wire.PRELUDE_BYTES)
        n = len(message)
        lie = rng.choice((0, 1, length - 1, length + 1, n - 105, n - 104, n, 2**32 - 1, 2**31,
                          TIGHT.max_header_bytes + 1, TIGHT.max_proof_header_bytes + 1,
                          DECODER_LIMITS.max_header_bytes, DECODER_LIMITS.max_proof_header_bytes + 1,
                          rng.randrange(2**32)))  # fmt: skip
        lie = min(max(lie, 0), 2**32 - 1)
        struct.pack_into("<I", message, wire.PRELUDE_BYTES, lie)
        return message, f"header length {length} -> {lie}"
    if op == "insert":
        pos = rng.randrange(a, b + 1)
        message[pos:pos] = rng.randbytes(rng.choice((1, 2, 8)))
        return message, f"insert at {pos} ({region})"
    if op == "delete":
        pos = rng.randrange(a, b)
        count = rng.choice((1, 2, 8))
        del message[pos : pos + count]
        return message, f"delete {count} at {pos} ({region})"
    if op == "graft":
        donor = rng.choice(pool.messages)
        part = rng.choice(("payload", "header", "signature", "head"))
        ours, theirs = _regions(message), _regions(donor)
        if part == "signature":
            message[37:101] = donor[37:101]
        elif part == "head":  # another message's (validly signed) head over our payload
            message[: ours["header"][1]] = donor[: theirs["header"][1]]
        else:
            (x, y), (u, v) = ours[part], theirs[part]
            message[x:y] = donor[u:v]
        return message, f"graft {part} of another message"
    if op == "prelude":
        return message, _mutate_prelude(message, pool, rng)
    pos = rng.randrange(a, b - 4)  # lenclaim: a 4 GiB msgpack length claim inside the header
    message[pos : pos + 5] = rng.choice((b"\xdb", b"\xc6", b"\xdd", b"\xdf")) + b"\xff\xff\xff\xff"
    return message, f"4 GiB msgpack length claim at byte {pos}"


class _Big:
    """One lazily zeroed anonymous mapping for huge messages (only touched pages cost memory)."""

    buffer: mmap.mmap | None = None
    dirty = 0

    @classmethod
    def message(cls, prefix: bytes, size: int) -> memoryview:
        if cls.buffer is None:
            cls.buffer = mmap.mmap(-1, DECODER_LIMITS.max_message_bytes + 1)
        cls.buffer[: cls.dirty] = bytes(cls.dirty)  # deterministic: nothing of the last huge message stays
        cls.buffer[: len(prefix)] = prefix
        cls.dirty = len(prefix)
        return memoryview(cls.buffer)[:size]


def gen_mutated(index: int, rng: random.Random, pool: Pool) -> Case:
    source = rng.randrange(len(pool.messages))
    message = bytearray(pool.messages[source])
    link = _link(rng, bytes(message[5:37]), POOL_SIGNERS[:2])
    if rng.random() < 0.03:
        return Case(index, "mutated", f"unmodified genuine copy of #{source}", bytes(message), link=link)
    desc = [f"pool #{source}"]
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        message, what = _mutate(message, pool, rng)
        desc.append(what)
    if rng.random() < 0.01:  # huge: a genuine head, then zeros up to (or past) the bounds
        size = rng.choice((2**20, DECODER_LIMITS.max_message_bytes, DECODER_LIMITS.max_message_bytes + 1))
        desc.append(f"grown to {size} bytes")
        return Case(index, "mutated", "; ".join(desc), _Big.message(bytes(message), size), link=link)
    return Case(index, "mutated", "; ".join(desc), bytes(message), link=link)


def _link(rng: random.Random, signer: bytes, others: Sequence[Identity]) -> PeerId | None:
    """Mostly insecure (None); sometimes the signer's own link, sometimes another neighbour's."""
    pick = rng.random()
    if pick < 0.05 and len(signer) == 32:
        return PeerId(signer)
    if pick < 0.10:
        return next(o.peer_id for o in others if o.peer_id.key != signer)
    return None


# ------------------------------------------------------------ hostile headers


def random_tree(rng: random.Random, depth: int = 3) -> Any:
    """A random msgpack-able value: nested lists/maps of ints, strs, bins, floats, bools, None, ext."""
    kind = rng.randrange(11 if depth > 0 else 8)
    if kind == 0:
        return rng.choice(_EDGE_INTS) if rng.random() < 0.5 else rng.randrange(-1000, 100_000)
    if kind == 1:
        return rng.choice((float("nan"), float("inf"), -0.0, 1.5, rng.random(), True, False, None))
    if kind == 2:
        size = rng.choice((0, 1, 5, 40, 257))
        return "".join(
            chr(rng.choice((rng.randrange(32, 127), rng.randrange(0xA0, 0xD7FF)))) for _ in range(size)
        )
    if kind == 3:
        return rng.randbytes(rng.choice((0, 31, 32, 33, 200)))
    if kind == 4:
        return msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(9)))
    if kind < 8:
        return rng.choice((*_FIELDS, *wire.WIRE_DTYPES, "update", "equivocation", "evidence", NETWORK))
    if kind == 8:
        return [random_tree(rng, depth - 1) for _ in range(rng.randrange(6))]
    keys = [
        rng.choice((*_FIELDS, "evidence", "x")) if rng.random() < 0.8 else random_tree(rng, 0)
        for _ in range(6)
    ]
    return {k: random_tree(rng, depth - 1) for k in keys[: rng.randrange(7)] if isinstance(k, (str, int))}


def pack_wide(obj: Any, rng: random.Random) -> bytes:
    """Valid msgpack in randomly chosen, often non-minimal widths (readers must accept any)."""
    if (
        isinstance(obj, bool)
        or not isinstance(obj, (int, str, bytes, list, dict))
        or (isinstance(obj, int) and not 0 <= obj < 2**64)
    ):
        return msgpack.packb(obj, use_bin_type=True)  # None, floats, negative ints...: the usual width
    if isinstance(obj, int):
        prefix, fmt, _ = rng.choice([f for f in _WIDE_INT if obj < f[2]])
        return bytes([obj]) if obj < 128 and rng.random() < 0.3 else prefix + struct.pack(fmt, obj)
    if isinstance(obj, (str, bytes)):
        raw = obj.encode() if isinstance(obj, str) else obj
        prefix, fmt = rng.choice(_WIDE_STR if isinstance(obj, str) else _WIDE_BIN)
        return prefix + struct.pack(fmt, len(raw)) + raw
    if isinstance(obj, list):
        return b"\xdd" + struct.pack(">I", len(obj)) + b"".join(pack_wide(v, rng) for v in obj)
    items = b"".join(pack_wide(k, rng) + pack_wide(v, rng) for k, v in obj.items())
    return b"\xdf" + struct.pack(">I", len(obj)) + items


def pack_duplicate_key(header: dict[str, Any], rng: random.Random) -> tuple[bytes, str]:
    """A msgpack map that repeats one key (same or different value): which one wins is up to the parser."""
    pairs = list(header.items())
    key = rng.choice(list(header))
    value = header[key] if rng.random() < 0.4 else rng.choice(_HOSTILE.get(key, (1,)))
    pairs.insert(rng.randrange(len(pairs) + 1), (key, value))
    body = b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in pairs)
    return b"\xde" + struct.pack(">H", len(pairs)) + body, f"duplicate key {key}"


def _hostile_tensors(rng: random.Random) -> tuple[list[Any], bytes, str]:
    """A tensors list with one hostile property, and a payload that fits it (or not)."""
    big = 2**31 - 1
    shapes = {"overflow": [big, big, big], "over-limit": [2**16, 2**16], "zero-first": [0, big, big, big],
              "zero-last": [big, 0], "zero": [0], "zeros": [0, 0, 5], "scalar": [], "ndim9": [1] * 9,
              "negative": [-2], "bool": [True, 2], "float": [2.0], "nested": [[2]], "u64": [2**64 - 1],
              "huge-ok": [2**14, 2**14]}  # fmt: skip
    what = rng.choice((*shapes, "dtype", "dup-names", "names", "entry", "many", "too-many", "data", "data"))
    if what in shapes:
        dtype = rng.choice(wire.WIRE_DTYPES)
        return (
            [["t", dtype, shapes[what]]],
            rng.choice((b"", b"\0" * 8, b"\0" * 2)),
            f"shape {what} ({dtype})",
        )
    if what == "dtype":
        return [["t", rng.choice(_DTYPES), [2]]], b"\0" * 8, "dtype"
    if what in ("dup-names", "names"):
        name = rng.choice(("", "n" * 256, "n" * 257, "é" * 128, 7, b"t", None)) if what == "names" else "t"
        return [[name, "float32", [1]], ["t", "float32", [1]]], b"\0" * 8, what
    if what == "entry":
        entry = rng.choice((["t", "float32"], ["t", "float32", [1], 0], {"t": 1}, "t", None))
        return [entry], b"\0" * 4, "tensor entry shape"
    if what in ("many", "too-many"):
        count = rng.choice((1000, 4096)) if what == "many" else 4097
        return [[f"t{i}", "uint8", [1]] for i in range(count)], b"\x01" * count, f"{count} tensors"
    payload = bytearray(_payload(SCHEMA, rng))
    cut = rng.randrange(len(payload) + 1)
    payload = payload[:cut] if rng.random() < 0.5 else payload + rng.randbytes(rng.choice((1, 2, 64)))
    return [[s.name, s.dtype, list(s.shape)] for s in SCHEMA], bytes(payload), "payload length mismatch"


# An insider edit takes a well-formed header and its payload and returns
# (header or tree, payload, raw header bytes or None, description).
_Edited = tuple[Any, bytes, "bytes | None", str]


def _edit_tree(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    tree = random_tree(rng, 4)
    merged = isinstance(tree, dict) and rng.random() < 0.5
    return ({**header, **tree} if merged else tree), payload, None, "random msgpack tree"


def _edit_field(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    key, pick = rng.choice(_FIELDS), rng.random()
    if pick < 0.05:
        del header[key]
        desc = f"field {key} missing"
    else:
        value = rng.choice(_HOSTILE[key]) if pick < 0.6 else random_tree(rng, 2) if pick < 0.8 else None
        header[key] = rng.choice(_EDGE_INTS) if pick >= 0.8 else value
        desc = f"field {key} := {header[key]!r}"[:80]
    if rng.random() < 0.1:
        header["extra"] = 1
        desc += " + extra key"
    return header, payload, None, desc


def _edit_tensors(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    header["tensors"], payload, desc = _hostile_tensors(rng)
    header["payload"] = blake3.blake3(payload).digest()
    return header, payload, None, desc


def _edit_dupkeys(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    raw, desc = pack_duplicate_key(header, rng)
    return header, payload, raw, desc


def _edit_digest(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    """The right length, the wrong digest: the payload is not what was signed."""
    wrong = (bytes(32), blake3.blake3(payload + b"\0").digest(), header["payload"][::-1])
    header["payload"] = rng.choice(wrong)
    return header, payload, None, "wrong payload digest"


def _edit_paylen(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    payload = payload[: rng.randrange(len(payload))] if rng.random() < 0.5 else payload + b"\0"
    if rng.random() < 0.7:  # else the digest of the right-length payload
        header["payload"] = blake3.blake3(payload).digest()
    return (
        header,
        payload,
        None,
        f"payload of {len(payload)} bytes for the schema's {sum(s.nbytes for s in SCHEMA)}",
    )


def _edit_gate(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    """Well-formed, but refused by one of the protocol's gates."""
    gate = rng.choice(("network", "fingerprint", "schema", "stale", "stale", "future", "clock"))
    wrong = {"network": "othernet", "fingerprint": bytes(32), "stale": rng.choice((START_ROUND - 3, 0)),
             "future": rng.choice((START_ROUND + 4, START_ROUND + 100, 2**63 - 1)),
             "clock": TS_MS + rng.choice((-1, 1)) * 10**6,
             "schema": [["lora_A", "float32", [8, 2]], *header["tensors"][1:]]}  # fmt: skip
    key = {"schema": "tensors", "stale": "round", "future": "round", "clock": "ts_ms"}.get(gate, gate)
    header[key] = wrong[gate]
    return header, payload, None, f"well-formed, wrong {gate}"


def _edit_good(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    fill = rng.choice(("finite", "finite", "random", "nan", "inf"))
    payload = _payload(SCHEMA, rng, fill)
    header["payload"] = blake3.blake3(payload).digest()
    wide = rng.random() < 0.3
    raw = pack_wide(header, rng) if wide else None
    return header, payload, raw, f"well-formed ({'wide' if wide else 'minimal'} msgpack, {fill} payload)"


def _edit_lossy(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    """Lossy tensors (codec.py) under a correct payload digest: valid bytes, or bytes damaged in one
    of the ways a receiver must refuse (section 5.1 of docs/protocol.md) or may accept (a value byte)."""
    specs = [TensorSpec(f"t{i}", rng.choice(wire.ENCODINGS), rng.choice(_LOSSY_SHAPES))
             for i in range(rng.choice((1, 1, 2, 3)))]  # fmt: skip
    if rng.random() < 0.3:  # next to a raw tensor
        specs.insert(rng.randrange(len(specs) + 1), TensorSpec("raw", "float32", (3,)))
    chunks = [bytearray(_tensor_bytes(spec, rng, "finite")) for spec in specs]
    target = rng.randrange(len(specs))
    how = _damage(specs[target], chunks[target], rng) if specs[target].dtype in wire.ENCODINGS else "valid"
    data = b"".join(chunks)
    header["tensors"] = [[s.name, s.dtype, list(s.shape)] for s in specs]
    header["payload"] = blake3.blake3(data).digest()
    return header, data, None, f"lossy {', '.join(s.dtype for s in specs)}: {specs[target].dtype} {how}"


def _damage(spec: TensorSpec, data: bytearray, rng: random.Random) -> str:
    """Damage one lossy tensor's bytes in place; say how."""
    n = spec.elements
    k = codec.kept(spec.dtype, n)
    bitmap = 0 if spec.dtype == "q8" else -(-n // 8)
    scales = bitmap + 4 * -(-k // codec.BLOCK)
    what = rng.choice(("valid", "valid", "flip", "padding", "popcount", "scale", "-128", "length", "random"))
    if what == "flip" and data:
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        return f"bit flipped at {pos}"
    if what == "padding" and bitmap and n % 8:
        data[bitmap - 1] |= 1 << rng.randrange(n % 8, 8)
        return "padding bit set"
    if what == "popcount" and bitmap:
        want = rng.random() < 0.5  # toggle a set bit (one too few) or a clear one (one too many)
        bits = [i for i in range(n) if (data[i // 8] >> (i % 8) & 1) == want] or list(range(n))
        i = rng.choice(bits)
        data[i // 8] ^= 1 << (i % 8)
        return f"bitmap bit {i} toggled"
    if what == "scale" and scales > bitmap:
        at = bitmap + 4 * rng.randrange((scales - bitmap) // 4)
        bits = rng.choice((0x7FC00000, 0x7F800000, 0xFF800000, 0x80000000, 0xBF800000,
                           codec.MAX_SCALE_BITS + 1, 0xFFFFFFFF, codec.MAX_SCALE_BITS, 1, 0))  # fmt: skip
        struct.pack_into("<I", data, at, bits)
        return f"scale {bits:#010x}"
    if what == "-128" and len(data) > scales:
        data[rng.randrange(scales, len(data))] = 0x80
        return "a value of -128"
    if what == "length":
        if data and rng.random() < 0.5:
            del data[rng.randrange(len(data))]
            return "one byte short"
        data.insert(rng.randrange(len(data) + 1), rng.randrange(256))
        return "one byte long"
    if what == "random":
        data[:] = rng.randbytes(len(data))
        return "random bytes"
    return "valid"


def _edit_base(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    """A compressed difference's ``base`` (docs/protocol.md 4.2, 8.3): valid, or not below the round."""
    round_ = header["round"]
    value = rng.choice(
        (
            round_ - 1,
            0,
            round_ - 1,
            round_,
            round_ + 1,
            -1,
            2**63 - 1,
            2**64 - 1,
            -(2**63),
            "1",
            None,
            1.5,
            [1],
        )
    )
    header["base"] = value
    return header, payload, None, f"base := {value!r}"[:80]


def _edit_resync(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    """The keyframe requests of compressed gossip (docs/protocol.md 4.2, 8.3): valid, or any other shape."""
    keys = [who.peer_id.key for who in (RECEIVER, ALICE, STRANGER)]
    most = WireLimits().max_resync_peers
    value = rng.choice(
        (
            keys[: rng.randrange(1, 4)],
            [RECEIVER.peer_id.key],
            [],
            [keys[0], keys[0]],
            [rng.randbytes(32) for _ in range(most)],
            [rng.randbytes(32) for _ in range(most + 1)],
            [keys[0][:31]],
            [keys[0] + b"\0"],
            [keys[0].hex()],
            keys[0],
            [keys[0], [keys[1]]],
            None,
            7,
        )
    )
    header["resync"] = value
    shown = f"{len(value)} entries" if isinstance(value, list) and len(value) > 3 else repr(value)
    return header, payload, None, f"resync := {shown}"[:80]


def _edit_bytes(rng: random.Random, header: dict[str, Any], payload: bytes) -> _Edited:
    body = bytearray(msgpack.packb(header, use_bin_type=True))
    for _ in range(rng.randrange(1, 4)):
        pos = rng.randrange(len(body))
        body[pos : pos + rng.randrange(3)] = rng.choice((b"\xdb\xff\xff\xff\xff", b"\xc1", b"\x91", b""))
    return header, payload, bytes(body) or b"\x80", "signed byte-mutated header"


_INSIDER_EDITS = (
    *[_edit_tree] * 2, *[_edit_field] * 3, *[_edit_tensors] * 2, _edit_dupkeys, _edit_digest, _edit_paylen,
    _edit_bytes, *[_edit_good] * 3, *[_edit_gate] * 2, None,  # None: a proof with hostile evidence
)  # fmt: skip


def gen_insider(index: int, rng: random.Random) -> Case:
    """A message validly signed by a neighbour's key, with hostile (or, sometimes, well-formed) content.

    Each message of a block has its own insider key (INSIDERS): no two are
    heads of one sender for one round, so none gets the insider banned.
    """
    signer = INSIDERS[index % RESET_EVERY]
    case = Case(index, "insider", "", b"")
    edit = rng.choice(_INSIDER_EDITS)
    if edit is _edit_tree and rng.random() < 0.5:  # lossy tensors take half of the random trees' share
        edit = _edit_lossy  # (a draw of their own: the other edits' cases stay as they were)
    elif edit is _edit_field and rng.random() < 0.25:  # a chain's fields take a quarter of the fields' share
        edit = _edit_base if rng.random() < 0.5 else _edit_resync
    if edit is None:
        accused = rng.choice((signer, ACCUSED, STRANGER))
        evidence, desc = _evidence(case.ledger, rng, accused, signer if accused is not signer else ACCUSED)
        case.message, more = _proof_message(case.ledger, rng, signer, evidence)
        case.desc = f"proof by the insider: {desc}{more}"
    else:
        payload = _payload(SCHEMA, rng)
        header = _header(rng.randrange(START_ROUND - 1, START_ROUND + 3), index, payload)
        edited, payload, raw, case.desc = edit(rng, header, payload)
        case.message = case.ledger.sign(signer, edited, payload, raw=raw)
    case.link = _link(rng, signer.peer_id.key, POOL_SIGNERS)
    return case


# ------------------------------------------------------------------ evidence


def _evidence(ledger: Ledger, rng: random.Random, accused: Identity, other: Identity) -> tuple[Any, str]:
    """Evidence for a proof: two signed update heads of ``accused`` for one round, or something hostile."""
    r = rng.choice((START_ROUND - 1, START_ROUND, START_ROUND + 2, 0, 2**63 - 1))

    def head(who: Identity = accused, round_: int = r, **override: Any) -> bytes:
        return head_of(_update(ledger, who, rng, round_, rng.randrange(1, 2**20), **override))

    what = rng.choice(("valid", "valid", "valid", "identical", "senders", "rounds", "network", "fingerprint",
                       "payload", "truncated", "extended", "flipped", "garbage", "proof", "hostile", "lenlie",
                       "version", "oversized", "structure"))  # fmt: skip
    first = head()
    second: Any
    if what == "valid":
        second = head()
    elif what == "identical":
        second = first
    elif what == "senders":
        second = head(other)
    elif what == "rounds":
        second = head(round_=r - 1 if r else 1)
    elif what in ("network", "fingerprint"):
        override = {"network": "othernet"} if what == "network" else {"fingerprint": bytes(32)}
        first, second = head(**override), head(**override)
    elif what == "payload":  # a whole message, not just its head
        second = _update(ledger, accused, rng, r, 7)
    elif what == "truncated":
        second = head()
        second = second[: rng.randrange(len(second))]
    elif what == "extended":
        second = head() + rng.choice((b"\0", rng.randbytes(64)))
    elif what == "flipped":
        data = bytearray(head())
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        second, what = bytes(data), f"flipped byte {pos}"
    elif what == "garbage":
        second = rng.choice((b"", rng.randbytes(rng.choice((1, 104, 105, 300))),
                             b"P2FM\x02" + accused.peer_id.key + rng.randbytes(68)))  # fmt: skip
    elif what == "proof":  # the head of a signed proof: not an update
        second = head_of(_proof(ledger, accused, [first, head()]))
    elif what == "hostile":  # validly signed heads whose headers are garbage
        bad = rng.choice(_FIELDS)
        second = (
            head(**{bad: rng.choice(_HOSTILE[bad])})
            if rng.random() < 0.6
            else head_of(ledger.sign(accused, random_tree(rng, 3)))
        )
    elif what in ("lenlie", "version"):
        data = bytearray(head())
        if what == "lenlie":
            lie = rng.choice((0, len(data) - 104, len(data), 2**32 - 1))
            struct.pack_into("<I", data, wire.PRELUDE_BYTES, lie)
        else:
            data[4] = rng.choice((1, 3))
        second = bytes(data)
    elif what == "oversized":  # long tensor names: a head longer than the receiver's max_head_bytes
        specs = tuple(TensorSpec(f"{i:03d}" + "n" * 200, "uint8", (1,)) for i in range(rng.choice((9, 20))))
        first, second = head(specs=specs), head(specs=specs)
    else:  # structure: not a list of two byte strings
        other_head = head()
        return rng.choice(([first], [first, other_head, head()], [first, "x" * 10], first, {"a": first}, None,
                           [1, 2], [[first], [other_head]], [])), "evidence structure"  # fmt: skip
    pair = [first, second] if rng.random() < 0.5 else [second, first]
    return pair, f"evidence {what}"


def _proof_message(ledger: Ledger, rng: random.Random, relay: Identity, evidence: Any) -> tuple[bytes, str]:
    """A proof signed by ``relay``; sometimes with a hostile header edit or a payload."""
    edit = rng.choice(("", "", "", "", "extra", "missing", "othernet", "wide", "payload", "kind"))
    if edit == "wide":
        header = {"kind": wire.KIND_EQUIVOCATION, "network": NETWORK, "evidence": evidence}
        return ledger.sign(relay, raw=pack_wide(header, rng)), " (wide msgpack)"
    if edit == "payload":
        header = {"kind": wire.KIND_EQUIVOCATION, "network": NETWORK, "evidence": evidence}
        return ledger.sign(relay, header, rng.randbytes(rng.choice((1, 100)))), " + payload"
    override: dict[str, Any] = {
        "": {}, "extra": {"round": 5}, "missing": {"evidence": _DROP}, "othernet": {"network": "othernet"},
        "kind": {"kind": rng.choice(("update", "Equivocation", 1))},
    }[edit]  # fmt: skip
    return _proof(ledger, relay, evidence, override), f" ({edit})" if edit else ""


# ------------------------------------------------------------------- random


def gen_random(index: int, rng: random.Random) -> Case:
    if rng.random() < 0.3:
        return Case(index, "random", "raw random bytes", rng.randbytes(rng.randrange(300)))
    key = rng.choice((POOL_SIGNERS[0].peer_id.key, POOL_SIGNERS[1].peer_id.key, rng.randbytes(32)))
    version = rng.choice((2, 2, 2, 2, 1, 0, 3))
    rest = rng.randbytes(rng.choice((0, 1, 8, 100, 2000)))
    length = rng.choice((len(rest), len(rest), max(len(rest) - 10, 0), 0, rng.randrange(2**32)))
    message = b"P2FM" + bytes([version]) + key + rng.randbytes(64) + struct.pack("<I", length) + rest
    return Case(
        index, "random", f"prelude-like v{version}, header length {length}, {len(rest)} bytes", message
    )


# ------------------------------------------------------------------ sessions


@dataclass
class _Script:
    """A session being written: what a fresh receiver gets first, and the link of the judged message."""

    ledger: Ledger
    rng: random.Random
    r: int  # the round the scenario is about
    setup: list[bytes] = field(default_factory=list)
    link: PeerId | None = None

    def update(self, who: Identity = ALICE, round_: int | None = None, seq: int = 1, **kw: Any) -> bytes:
        return _update(self.ledger, who, self.rng, self.r if round_ is None else round_, seq, **kw)


def _session_equivocate(s: _Script) -> tuple[bytes, str]:
    """A first update of round r, then a second, different one (or, as controls, not quite)."""
    how = s.rng.choice(("seq", "payload", "ts", "wide", "resend", "othernet", "hostile", "future"))
    payload = _payload(SCHEMA, s.rng)
    first = s.update(seq=3, data=payload)
    s.setup, s.link = [first], s.rng.choice((None, ALICE.peer_id))
    if how == "seq":
        message = s.update(seq=4)
    elif how == "payload":  # same fields, other tensors
        message = s.update(seq=3)
    elif how == "ts":
        message = s.update(seq=3, data=payload, ts_ms=TS_MS + 1)
    elif how == "wide":  # the same header, encoded in other widths: other signed bytes
        message = s.ledger.sign(ALICE, raw=pack_wide(_header(s.r, 3, payload), s.rng), payload=payload)
    elif how == "resend":  # not equivocation: the same bytes again
        message = first
    elif how == "othernet":  # refused before the heads are compared
        message = s.update(seq=4, network="othernet")
    elif how == "hostile":
        tensors, bad, _ = _hostile_tensors(s.rng)
        message = s.update(seq=4, data=bad, tensors=tensors)
    else:  # both beyond max_rounds_ahead: refused, and not kept as heads
        s.setup = [s.update(round_=START_ROUND + 5, seq=3)]
        message = s.update(round_=START_ROUND + 5, seq=4)
    return message, f"equivocate in round {s.r}: {how}"


def _session_proof(s: _Script) -> tuple[bytes, str]:
    """A proof relayed by a neighbour (or not), with valid or hostile evidence."""
    if s.rng.random() < 0.5:
        s.setup = [s.update(round_=START_ROUND, seq=1)]
    relay = s.rng.choice((INSIDER, INSIDER, INSIDER, OTHER, ALICE, STRANGER))
    accused = s.rng.choice((ALICE, ALICE, OTHER, STRANGER, RECEIVER, relay))
    evidence, desc = _evidence(s.ledger, s.rng, accused, OTHER if accused is ALICE else ALICE)
    message, more = _proof_message(s.ledger, s.rng, relay, evidence)
    if s.rng.random() < 0.2:
        s.setup.append(message)  # the same proof twice: not new the second time
    s.link = s.rng.choice((None, None, relay.peer_id))
    return message, f"proof by {_name(relay)} against {_name(accused)}: {desc}{more}"


def _session_banned(s: _Script) -> tuple[bytes, str]:
    first, second = s.update(seq=1), s.update(seq=2)
    if s.rng.random() < 0.5:
        s.setup, how = [first, second], "seen"
    else:
        s.setup, how = [_proof(s.ledger, INSIDER, [head_of(first), head_of(second)])], "proven"
    again = s.rng.choice(("update", "same", "proof"))
    if again == "update":
        message = s.update(round_=START_ROUND + 1, seq=9)
    else:
        message = first if again == "same" else _proof(s.ledger, ALICE, [b"x", b"y"])
    return message, f"alice banned ({how}) sends again ({again})"


def _session_flood(s: _Script) -> tuple[bytes, str]:
    """The burst spent at one instant, then one more message on that link."""
    filler = _proof(s.ledger, INSIDER, [b"x", b"y"])  # well-formed, garbage evidence: costs a token
    s.setup = [filler] * CONFIG.message_burst
    for k in range(s.rng.randrange(3)):  # some of the burst spent on accepted updates
        s.setup[k] = s.update(INSIDER, round_=START_ROUND + k, seq=k + 1)
    last = s.rng.choice(("proof", "update"))
    message = filler if last == "proof" else s.update(INSIDER, round_=START_ROUND + 2, seq=50)
    return message, f"flood of {len(s.setup)} then one more {last}"


def _session_replay(s: _Script) -> tuple[bytes, str]:
    how = s.rng.choice(("lower round", "duplicate", "newer round, lower seq"))
    if how == "lower round":
        s.setup, message = [s.update(round_=START_ROUND + 1, seq=5)], s.update(round_=START_ROUND, seq=9)
    elif how == "duplicate":
        message = s.update(round_=START_ROUND, seq=5)
        s.setup = [message]
    else:  # not a replay: rounds order first
        s.setup, message = [s.update(round_=START_ROUND, seq=9)], s.update(round_=START_ROUND + 1, seq=3)
    return message, f"replay: {how}"


def _session_rounds(s: _Script) -> tuple[bytes, str]:
    k = s.rng.choice((-3, -2, -1, 0, 1, 3, 4, 5, 1000, 2**62))
    return s.update(round_=START_ROUND + k), f"round {START_ROUND}{k:+d}"


def _session_link(s: _Script) -> tuple[bytes, str]:
    """The connection's authenticated peer is not always the signer."""
    signer = s.rng.choice((ALICE, INSIDER))
    if s.rng.random() < 0.5:
        message = s.update(signer, round_=START_ROUND)
    else:
        message = _proof(s.ledger, signer, [head_of(s.update(OTHER, seq=q)) for q in (1, 2)])
    s.link = s.rng.choice((ALICE, OTHER, INSIDER, STRANGER)).peer_id
    return message, f"signed by {_name(signer)}, link {s.link.short}"


_SESSIONS = (
    *[_session_equivocate] * 2, *[_session_proof] * 3, _session_banned, _session_flood, _session_replay,
    _session_rounds, _session_link,
)  # fmt: skip


def gen_session(index: int, rng: random.Random) -> Case:
    """A short script on a fresh receiver (neighbours Alice, Other, Insider; round START_ROUND)."""
    script = _Script(
        Ledger(), rng, rng.choice((START_ROUND - 1, START_ROUND, START_ROUND + 1, START_ROUND + 3))
    )
    message, desc = rng.choice(_SESSIONS)(script)
    return Case(index, "session", desc, message, script.ledger, script.link, tuple(script.setup))


def _name(identity: Identity) -> str:
    names = {ALICE: "alice", OTHER: "other", INSIDER: "insider", STRANGER: "stranger", RECEIVER: "receiver"}
    return names.get(identity, identity.peer_id.short)


def make_case(seed: int, index: int, pool: Pool) -> Case:
    rng = random.Random(f"{seed}:{index}")
    pick = rng.random()
    if pick < 0.35:
        return gen_mutated(index, rng, pool)
    if pick < 0.68:
        return gen_insider(index, rng)
    return gen_random(index, rng) if pick < 0.80 else gen_session(index, rng)


# ------------------------------------------------------------------- targets


def receivers() -> dict[tuple[bool, bool], GossipProtocol]:
    """Shared receivers by (insider known, open schema); all know the pool's signers.

    Rebuilt every RESET_EVERY messages, so that replay state never blocks the accept path for long.
    """
    out = {}
    for known in (True, False):
        for open_schema in (True, False):
            neighbours = [s.peer_id for s in (*POOL_SIGNERS, *(INSIDERS if known else ()))]
            out[known, open_schema] = GossipProtocol(
                RECEIVER, neighbours, OPEN_CONFIG if open_schema else CONFIG
            )
    for proto in out.values():
        proto.start_round(START_ROUND, 0.0)
    return out


def session_receiver() -> GossipProtocol:
    proto = GossipProtocol(RECEIVER, [ALICE.peer_id, OTHER.peer_id, INSIDER.peer_id], CONFIG)
    proto.start_round(START_ROUND, 0.0)
    return proto


def open_message(message: Buffer, limits: WireLimits = DECODER_LIMITS) -> wire.Update | OpenedProof:
    """The wire layer alone, no protocol: verify, decode the header, then the payload or the evidence."""
    verified = wire.verify(message, limits)
    header = wire.decode_header(verified, limits)
    if isinstance(header, wire.UpdateHeader):
        return wire.update_of(header, wire.decode_payload(verified, header), verified.wire_bytes)
    return OpenedProof(wire.check_evidence(*header.evidence, limits), header.evidence)


def _clock(case: Case) -> tuple[float, int]:
    """(monotonic s, wall ms): sessions happen at one instant; shared receivers see 0.1 s per message."""
    if case.setup is not None:
        return 0.0, TS_MS
    return case.index * 0.1, TS_MS + case.index


def _judge(case: Case, target: str, proto: GossipProtocol | None, message: Buffer | None = None) -> Any:
    """One target's answer to the case's message (or to a setup ``message``): its result or exception."""
    try:
        if target == "decoder":
            return open_message(case.message)
        assert proto is not None
        now_s, wall_ms = _clock(case)
        link = case.link if message is None else None  # setup messages come insecure
        return proto.receive(case.message if message is None else message, now_s, wall_ms, link=link)
    except (Exception, FuzzHang) as exc:  # noqa: BLE001 -- _tally tells refusals from crashes
        return exc.with_traceback(None)  # no frame cycle to keep alive


def _fire(signum: int, frame: Any) -> None:
    raise FuzzHang(f"no answer within {HANG_S} s")


@dataclass
class _Run:
    """One fuzzing run: the report and the oracle's ledgers."""

    report: Report
    pool: Pool
    block: Ledger  # what the cases of this block signed (the shared receivers remember heads)
    alarm: bool

    def judge(
        self, case: Case, target: str, proto: GossipProtocol | None, message: Buffer | None = None
    ) -> Any:
        """_judge under the SIGALRM watchdog; returns (answer, milliseconds)."""
        t0 = time.perf_counter()
        if self.alarm:
            signal.setitimer(signal.ITIMER_REAL, HANG_S)
        try:
            result = _judge(case, target, proto, message)
        finally:
            if self.alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return result, (time.perf_counter() - t0) * 1e3


def run(messages: int = 100_000, seed: int = 0) -> Report:
    """Feed ``messages`` messages to both targets and tally the outcome.

    A SIGALRM watchdog (main thread only) turns a call still running after
    HANG_S into a FuzzHang crash, so even a hang in the code under test ends.
    The cyclic GC runs between blocks of messages, not inside a timed call:
    a full collection costs what the *process* holds (hundreds of ms under
    pytest with torch loaded), which would hide what a message costs.
    """
    pool = genuine_pool(seed)
    report = Report(seed, reasons_by_generator={g: Counter() for g in GENERATORS},
                    found_by_generator={g: Counter() for g in GENERATORS})  # fmt: skip
    alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    old_handler = signal.signal(signal.SIGALRM, _fire) if alarm else None
    state = _Run(report, pool, Ledger(), alarm)
    protos, start, gc_was_enabled = receivers(), time.perf_counter(), gc.isenabled()
    gc.disable()
    try:
        for index in range(messages):
            if index and index % RESET_EVERY == 0:
                protos, state.block = receivers(), Ledger()
                gc.collect(1)
            case = make_case(seed, index, pool)
            report.messages += 1
            report.by_generator[case.generator] += 1
            if case.setup is None:
                proto = protos[case.insider_known, case.open_schema]
                state.block.merge(case.ledger)
            else:  # a fresh receiver, fed the setup first (untimed: only the judged message counts)
                proto = session_receiver()
                for message in case.setup:
                    answer, _ = state.judge(case, "protocol", proto, message)
                    _tally(state, case, "protocol setup", answer, proto, message=message)
            for target in ("decoder", "protocol"):
                result, ms = state.judge(case, target, proto)
                if ms > report.slowest_ms:
                    report.slowest_ms, report.slowest = (
                        ms,
                        f"#{index} {case.generator}: {case.desc}; {target}",
                    )
                report.over_slow += ms > SLOW_MS
                _tally(state, case, target, result, proto, message=case.message)
    finally:
        if gc_was_enabled:
            gc.enable()
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
    report.wall_s = time.perf_counter() - start
    return report


def _signer_of(state: _Run, case: Case, head: bytes) -> bytes | None:
    digest = message_digest(head)
    for ledger in (case.ledger, state.block, state.pool.ledger):
        if digest in ledger.heads:
            return ledger.heads[digest]
    return None


def _evidence_problem(
    state: _Run, case: Case, accused: PeerId, heads: tuple[bytes, bytes], limits: WireLimits
) -> str | None:
    """None if ``heads`` are two different heads that ``accused`` really signed and that check."""
    if heads[0] == heads[1] or any(_signer_of(state, case, h) != accused.key for h in heads):
        return f"evidence that {accused.short} did not sign"
    try:
        facts = wire.check_evidence(*heads, limits)
    except RemoteProtocolError as exc:
        return f"evidence that does not check ({exc})"
    if facts.accused != accused:
        return f"evidence against {facts.accused.short} reported as against {accused.short}"
    return None


def _tally(
    state: _Run, case: Case, target: str, result: Any, proto: GossipProtocol | None, *, message: Buffer
) -> None:
    """Classify one answer: a refusal, a legitimate acceptance, a forgery or a crash.

    Answers to setup messages (target "protocol setup") are checked for
    crashes and forgeries but not counted.
    """
    report, problem, gen = state.report, None, case.generator
    count = int(target != "protocol setup")
    if isinstance(result, RemoteProtocolError) and target == "decoder":  # receive() must not raise
        report.decoder_reasons[result.reason.value] += count
    elif isinstance(result, Rejected):
        report.reasons[result.reason.value] += count
        report.reasons_by_generator[gen][result.reason.value] += count
    elif isinstance(result, (Accepted, wire.Update)):
        digest = message_digest(message)  # only for accepted messages: never a huge one
        who = "genuine" if digest in state.pool.ledger.authentic else gen
        legit = any(digest in ledger.authentic for ledger in (case.ledger, state.block, state.pool.ledger))
        if target == "decoder":  # no known senders: a message signed whole by any key is fine
            forged = not legit
            report.decoder_opened[who] += count
        else:
            assert proto is not None
            forged = not legit or result.sender not in proto.neighbours
            report.accepted[who] += count * (not forged)
        report.forgeries += forged
        report.forgery_kinds["update"] += forged
        problem = "accepted forgery (a message its sender did not sign whole)" if forged else None
    elif isinstance(result, OpenedProof):
        report.decoder_opened["proof"] += count
        problem = _evidence_problem(state, case, result.evidence.accused, result.heads, DECODER_LIMITS)
        report.forgeries += problem is not None
        report.forgery_kinds["evidence"] += problem is not None
    elif isinstance(result, EquivocationFound) and proto is not None:
        if result.reporter is None:
            how = "seen"
        elif not result.new:
            how = "proof known"
        else:
            how = "proof new" + ("" if result.accused in proto.neighbours else " (accused no neighbour)")
        report.found[how] += count
        report.found_by_generator[gen][how] += count
        problem = _evidence_problem(state, case, result.accused, result.evidence, proto.config.limits)
        report.forgeries += problem is not None
        report.forgery_kinds["evidence"] += problem is not None
    else:
        report.crashes += 1
        problem = repr(result)[:300]
        report.crash_kinds[f"{target}: {problem[:120]}"] += 1
    if problem and len(report.reproducers) < KEEP:
        report.reproducers.append(dict(index=case.index, generator=gen, mutation=case.desc,
                                       target=target, error=problem))  # fmt: skip


def replay(seed: int, index: int) -> str:
    """Rebuild message ``index`` and judge it on fresh receivers (shared protocol state is not replayed)."""
    case = make_case(seed, index, genuine_pool(seed))
    lines = [f"#{index} {case.generator}: {case.desc}; {wire.message_bytes(case.message)} bytes"]
    if case.setup is not None:
        proto = session_receiver()
        for k, message in enumerate(case.setup):
            lines.append(f"  setup {k}: {_judge(case, 'protocol', proto, message)!r}"[:400])
    else:
        proto = receivers()[case.insider_known, case.open_schema]
    lines += [f"  {t}: {_judge(case, t, proto)!r}"[:400] for t in ("decoder", "protocol")]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz the p2pfm wire decoder and gossip protocol.")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="rebuild and judge one message")
    args = parser.parse_args(argv)
    if args.replay is not None:
        print(replay(args.seed, args.replay))
        return 0
    report = run(args.messages, args.seed)
    print(json.dumps(report.to_json(), indent=1) if args.json else report.summary())
    return 0 if report.crashes == 0 and report.forgeries == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
