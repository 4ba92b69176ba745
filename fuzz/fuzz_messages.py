"""Fuzz the wire decoder and the gossip protocol with random and mutated messages.

Why: every byte a node parses comes from peers it does not control. The
decoder (``wire.open_update``) may raise nothing but ``RemoteProtocolError``;
``GossipProtocol.receive`` must never raise, never accept bytes that the
sender's key did not sign, and judge every message quickly.

Usage::

    python fuzz/fuzz_messages.py [--messages 100000] [--seed 0] [--json] [--replay INDEX]

Generators (mixed 45/40/15): ``mutated`` damages messages validly signed by a
neighbour; ``insider`` signs hostile or well-formed headers with an insider
key, for a receiver that has the insider as a neighbour (even messages) or
not (odd: any acceptance is a forgery); ``random`` makes random frame lists.
Message ``i`` comes from ``random.Random(f"{seed}:{i}")``: ``--replay i``
rebuilds a reproducer from (seed, i) alone.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
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

from p2pfm import wire
from p2pfm.errors import RemoteProtocolError
from p2pfm.identity import Identity
from p2pfm.protocol import Accepted, GossipProtocol, ProtocolConfig, Rejected
from p2pfm.wire import TensorSpec, Unsigned, WireLimits

ALICE, OTHER = Identity(bytes([0xA1]) * 32), Identity(bytes([0xB2]) * 32)
INSIDER, RECEIVER = Identity(bytes([0x1D]) * 32), Identity(bytes([0xEC]) * 32)
NETWORK, FINGERPRINT = "fuzznet", blake3.blake3(b"fuzz adapter").digest()
SCHEMA = (TensorSpec("lora_A", "float32", (2, 8)), TensorSpec("lora_B", "bfloat16", (8, 2)),
          TensorSpec("bias", "float16", (3,)))  # fmt: skip
CONFIG = ProtocolConfig(NETWORK, FINGERPRINT, round_timeout_s=10.0, schema=SCHEMA)
START_ROUND, RESET_EVERY, FLOOD, SLOW_MS, HANG_S, KEEP = 5, 500, 120, 50.0, 5.0, 5
TS_MS = 1_795_000_000_000  # the senders' wall clock in milliseconds (2026-11-18)
# receive() gained a wall clock for its timestamp gate; pass it where it exists.
_WALL_CLOCK = "wall_time_ms" in inspect.signature(GossipProtocol.receive).parameters
GENERATORS = ("mutated", "insider", "random")
_HUGE = memoryview(bytes(200 * 2**20))  # zero pages mapped lazily: views make huge frames for free
_FIELDS = ("kind", "network", "round", "seq", "ts_ms", "fingerprint", "degree", "samples", "tensors")
_EDGE_INTS = (0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**28 + 1)
_DTYPES = (*wire.DTYPES, "complex64", "float8", "", "FLOAT32", "float32 ", "bfloat16\x00", 4, None)
_FINITE = bytes(b & 0x3F for b in range(256))
_INF = {"float32": b"\x00\x00\x80\x7f", "bfloat16": b"\x80\x7f", "float16": b"\x00\x7c"}
_WIDE_STR, _WIDE_BIN = ((b"\xda", ">H"), (b"\xdb", ">I")), ((b"\xc5", ">H"), (b"\xc6", ">I"))
_WIDE_INT = ((b"\xcc", "B", 2**8), (b"\xcd", ">H", 2**16), (b"\xce", ">I", 2**32), (b"\xcf", ">Q", 2**64))


class FuzzHang(BaseException):
    """Raised by the watchdog; a BaseException so that ``except Exception`` cannot swallow it."""


@dataclass
class Case:
    index: int
    generator: str
    desc: str
    frames: list[Any]
    insider_signed: bool = False

    @property
    def insider_known(self) -> bool:
        return self.index % 2 == 0


@dataclass
class Report:
    seed: int
    messages: int = 0
    by_generator: Counter[str] = field(default_factory=Counter)
    decoder_opened: Counter[str] = field(default_factory=Counter)  # genuine / insider-signed
    decoder_reasons: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # genuine / insider as neighbour
    reasons: Counter[str] = field(default_factory=Counter)  # protocol rejections
    reasons_by_generator: dict[str, Counter[str]] = field(default_factory=dict)
    crashes: int = 0
    crash_kinds: Counter[str] = field(default_factory=Counter)  # exception type and message
    forgeries: int = 0
    reproducers: list[dict[str, Any]] = field(default_factory=list)
    slowest_ms: float = 0.0
    slowest: str = ""
    over_slow: int = 0
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(self).items()}
        out["reasons_by_generator"] = {k: dict(v) for k, v in self.reasons_by_generator.items()}
        return {**out, "messages_per_s": round(self.messages / max(self.wall_s, 1e-9), 1)}

    def summary(self) -> str:
        def counts(counter: Counter[str], sep: str = "  ") -> str:
            return sep.join(f"{k} {v}" for k, v in sorted(counter.items())) or "none"

        ok = self.crashes == 0 and self.forgeries == 0
        return "\n".join([
            f"p2pfm message fuzzer: seed {self.seed}, {self.messages} messages, each to decoder and protocol",
            f"  generators        {counts(self.by_generator)}",
            f"  decoder opened    {sum(self.decoder_opened.values())} ({counts(self.decoder_opened, ', ')})",
            f"  protocol accepted {sum(self.accepted.values())} ({counts(self.accepted, ', ')})",
            f"  protocol rejected {counts(self.reasons)}",
            f"  crashes {self.crashes} ({len(self.crash_kinds)} distinct)"
            f"   accepted forgeries {self.forgeries}",
            f"  slowest message {self.slowest_ms:.1f} ms ({self.slowest})",
            f"  messages over {SLOW_MS:.0f} ms (the target): {self.over_slow}",
            f"  wall time {self.wall_s:.1f} s -> {self.messages / max(self.wall_s, 1e-9):.0f} messages/s",
            *(f"  FAILURE {r}" for r in self.reproducers),
            "PASS" if ok else "FAIL",
        ])  # fmt: skip


def frames_digest(frames: Sequence[Any]) -> bytes:
    """BLAKE3 of a frame list with its boundaries: equal digests mean byte-equal messages."""
    hasher = blake3.blake3(struct.pack("<I", len(frames)))
    for frame in frames:
        hasher.update(struct.pack("<Q", memoryview(frame).nbytes))
        hasher.update(frame)
    return hasher.digest()


def _tensors(specs: Sequence[TensorSpec], rng: random.Random, fill: str = "finite") -> list[bytes]:
    """Data frames of the exact length the specs imply: finite values, random bits (NaN and Inf
    included), all-NaN or all-Inf."""
    if fill in ("finite", "random"):  # bytes <= 0x3f never make an all-ones float exponent
        return [rng.randbytes(s.nbytes).translate(_FINITE if fill == "finite" else None) for s in specs]
    if fill == "nan":  # all-ones bits are a NaN in every float format
        return [b"\xff" * s.nbytes for s in specs]
    return [_INF[s.dtype] * (s.nbytes // len(_INF[s.dtype])) for s in specs]


def _header(round_: int, seq: int, specs: Sequence[TensorSpec] = SCHEMA, **override: Any) -> dict[str, Any]:
    header: dict[str, Any] = {
        "kind": "update", "network": NETWORK, "round": round_, "seq": seq, "ts_ms": TS_MS,
        "fingerprint": FINGERPRINT, "degree": 3, "samples": 64,
        "tensors": [[s.name, s.dtype, list(s.shape)] for s in specs],
    }  # fmt: skip
    return {**header, **override}


def genuine_pool(seed: int) -> list[list[bytes]]:
    """Valid messages signed by Alice (and a few by the insider and Other): the mutation seeds."""
    rng = random.Random(f"{seed}:pool")
    variants: list[tuple[Identity, tuple[TensorSpec, ...], dict[str, Any]]] = [
        (ALICE, SCHEMA, {}), (ALICE, SCHEMA, {}), (ALICE, SCHEMA, {"network": "othernet"}),
        (ALICE, SCHEMA, {"fingerprint": bytes(32)}), (ALICE, (), {}),
        (ALICE, (TensorSpec("x", "int8", (5,)), TensorSpec("y", "float32", ())), {}),
        (INSIDER, SCHEMA, {}), (OTHER, SCHEMA[:1], {}),
    ]  # fmt: skip
    pool = []
    for seq, (identity, specs, override) in enumerate(variants * 3, start=1):
        header = _header(rng.randrange(START_ROUND - 1, START_ROUND + 3), seq, specs, **override)
        body = (msgpack.packb(header, use_bin_type=True), *_tensors(specs, rng))
        pool.append([bytes(f) for f in wire.sign(Unsigned(body), identity)])
    return pool


def _mutate_prelude(prelude: bytearray, pool: list[list[bytes]], rng: random.Random) -> str:
    what = rng.choice(("version", "magic", "key", "sig", "size"))
    if what == "version" and len(prelude) > 4:
        prelude[4] = rng.choice((0, 2, 255))
    elif what == "magic":
        prelude[: rng.randrange(1, 5)] = b"p2fm"[: rng.randrange(1, 5)]
    elif what == "key" and len(prelude) >= 37:
        key = rng.choice((INSIDER, OTHER, RECEIVER)).peer_id.key
        prelude[5:37] = key if rng.random() < 0.7 else rng.randbytes(32)
    elif what == "sig" and len(prelude) >= 101:
        prelude[37:101] = rng.choice(pool)[0][37:101]
    else:
        prelude[len(prelude) - 1 :] = b"" if rng.random() < 0.5 else b"\0\0"
    return f"prelude {what}"


def _mutate(frames: list[Any], pool: list[list[bytes]], rng: random.Random) -> str:
    """Apply one random structural mutation in place; return what it did."""
    if not frames:
        frames.append(b"")
        return "add an empty frame"
    n, k = len(frames), rng.randrange(len(frames))
    j, data = rng.randrange(n), bytearray(frames[k])
    cut = rng.randrange(len(data) + 1)
    op = rng.choice(("flip", "flip", "byte", "truncate", "extend", "drop", "dup", "swap", "split", "join",
                     "foreign", "empty", "lenclaim", "prelude"))  # fmt: skip
    if op in ("flip", "byte") and data:
        pos = rng.randrange(len(data))
        data[pos] = data[pos] ^ (1 << rng.randrange(8)) if op == "flip" else rng.randrange(256)
        op = f"{op} byte {pos} of"
    elif op in ("truncate", "extend"):
        data = data[:cut] if op == "truncate" else data + rng.randbytes(rng.choice((1, 7, 64, 1000)))
    elif op == "foreign":
        donor = rng.choice(pool)
        j = min(k, len(donor) - 1) if rng.random() < 0.7 else rng.randrange(len(donor))
        data, op = bytearray(donor[j]), f"put frame {j} of another message as"
    elif op == "lenclaim" and len(data) > 6:
        pos = rng.randrange(len(data) - 5)
        data[pos : pos + 5] = rng.choice((b"\xdb", b"\xc6", b"\xdd", b"\xdf")) + b"\xff\xff\xff\xff"
        op = f"4 GiB msgpack length claim at byte {pos} of"
    elif op == "prelude":
        data, k = bytearray(frames[0]), 0
        op = _mutate_prelude(data, pool, rng) + ":"
    else:  # frame-list edits
        edits = {"drop": (k, k + 1, []), "dup": (j, j, [frames[k]]), "empty": (k, k, [b""]),
                 "split": (k, k + 1, [bytes(data[:cut]), bytes(data[cut:])]),
                 "join": (k, k + 2, [bytes(data) + bytes(frames[k + 1] if k + 1 < n else b"")])}  # fmt: skip
        op = op if op in edits or op == "swap" else "empty"  # flip/lenclaim of a too-short frame
        if op == "swap":
            frames[j], frames[k] = frames[k], frames[j]
        else:
            start, stop, new = edits[op]
            frames[start:stop] = new
        return f"{op} frame {k} (j={j}, cut={cut})"
    frames[k] = bytes(data)
    return f"{op} frame {k}"


def gen_mutated(index: int, rng: random.Random, pool: list[list[bytes]]) -> Case:
    frames: list[Any] = list(rng.choice(pool))
    if rng.random() < 0.02:
        return Case(index, "mutated", "unmodified genuine copy", frames)
    desc = [_mutate(frames, pool, rng) for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    if rng.random() < 0.03 and len(frames) > 1:  # last, so no later mutation copies a huge frame
        size, copies = rng.choice(((2**20 + 1, 1), (2**20, 1), (len(_HUGE), 3)))  # 3 x 200 MiB > limit
        frames[1:2] = [_HUGE[:size]] * copies
        desc.append(f"frame 1 := {copies} x {size} zero bytes")
    return Case(index, "mutated", "; ".join(desc), frames)


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
        return rng.choice((*_FIELDS, *wire.DTYPES, "update", NETWORK))
    if kind == 8:
        return [random_tree(rng, depth - 1) for _ in range(rng.randrange(6))]
    keys = [rng.choice((*_FIELDS, "x")) if rng.random() < 0.8 else random_tree(rng, 0) for _ in range(6)]
    return {k: random_tree(rng, depth - 1) for k in keys[: rng.randrange(7)] if isinstance(k, (str, int))}


def pack_wide(obj: Any, rng: random.Random) -> bytes:
    """Valid msgpack in randomly chosen, often non-minimal widths (readers must accept any)."""
    if isinstance(obj, int):  # non-negative: all a well-formed header holds
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


def _hostile_tensors(rng: random.Random) -> tuple[list[Any], list[bytes], str]:
    """A tensors list with one hostile property, and data frames that fit it (or not)."""
    big = 2**31 - 1
    shapes = {"overflow": [big, big, big], "over-limit": [2**16, 2**16], "zero-first": [0, big, big, big],
              "zero-last": [big, 0], "scalar": [], "ndim9": [1] * 9, "negative": [-2], "bool": [True, 2],
              "float": [2.0], "nested": [[2]], "u64": [2**64 - 1]}  # fmt: skip
    what = rng.choice((*shapes, "dtype", "dup-names", "names", "entry", "many", "too-many", "data", "data"))
    if what in shapes:
        entries: list[Any] = [["t", rng.choice(list(wire.DTYPES)), shapes[what]]]
        return entries, [b"", b"\0" * 8][: rng.randrange(1, 3)], f"shape {what}"
    if what == "dtype":
        return [["t", rng.choice(_DTYPES), [2]]], [b"\0" * 8], "dtype"
    if what in ("dup-names", "names"):
        name = rng.choice(("", "n" * 256, "n" * 257, "é" * 128, 7, b"t", None)) if what == "names" else "t"
        return [[name, "float32", [1]], ["t", "float32", [1]]], [b"\0" * 4] * 2, what
    if what == "entry":
        entry = rng.choice((["t", "float32"], ["t", "float32", [1], 0], {"t": 1}, "t", None))
        return [entry], [b"\0" * 4], "tensor entry shape"
    if what in ("many", "too-many"):
        count = rng.choice((1000, 4096)) if what == "many" else 4097
        return [[f"t{i}", "uint8", [1]] for i in range(count)], [b"\x01"] * count, f"{count} tensors"
    data = _tensors(SCHEMA, rng)
    j = rng.randrange(len(data))
    data[j] = rng.choice((data[j][:-1], data[j] + b"\0", b""))
    data = data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data
    return [[s.name, s.dtype, list(s.shape)] for s in SCHEMA], data, "data lengths"


def gen_insider(index: int, rng: random.Random) -> Case:
    """A validly signed insider message with hostile (or, sometimes, well-formed) content."""
    header: Any = _header(rng.randrange(START_ROUND - 1, START_ROUND + 3), index)
    data = _tensors(SCHEMA, rng)
    what = rng.choice(
        ("tree", "tree", "field", "field", "tensors", "tensors", "bytes", "good", "wide", "gate")
    )
    if what == "tree":
        tree = random_tree(rng, 4)
        header = {**header, **tree} if isinstance(tree, dict) and rng.random() < 0.5 else tree
        desc = "random msgpack tree"
    elif what == "field":
        key = rng.choice(_FIELDS)
        header[key] = rng.choice((random_tree(rng, 2), rng.choice(_EDGE_INTS), "", "n" * 65, "é" * 33, b"x"))
        if rng.random() < 0.1:
            header["extra" if rng.random() < 0.5 else key] = 1
        desc = f"field {key}"
    elif what == "tensors":
        header["tensors"], data, desc = _hostile_tensors(rng)
    elif what == "gate":
        gate = rng.choice(("network", "fingerprint", "schema", "stale"))
        wrong = {"network": "othernet", "fingerprint": bytes(32), "round": START_ROUND - 3,
                 "tensors": [["lora_A", "float32", [8, 2]], *header["tensors"][1:]]}  # fmt: skip
        key = {"schema": "tensors", "stale": "round"}.get(gate, gate)
        header[key], desc = wrong[key], f"well-formed, wrong {gate}"
    else:
        fill = rng.choice(("finite", "finite", "random", "nan", "inf"))
        data, desc = _tensors(SCHEMA, rng, fill), f"well-formed ({what} msgpack, {fill} payload)"
    raw = pack_wide(header, rng) if what == "wide" else msgpack.packb(header, use_bin_type=True)
    if what == "bytes":
        body = bytearray(raw)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(body))
            body[pos : pos + rng.randrange(3)] = rng.choice((b"\xdb\xff\xff\xff\xff", b"\xc1", b"\x91", b""))
        raw, desc = bytes(body) or b"\x80", "signed byte-mutated header"
    return Case(index, "insider", desc, wire.sign(Unsigned((raw, *data)), INSIDER), insider_signed=True)


def gen_random(index: int, rng: random.Random) -> Case:
    if rng.random() < 0.2:
        return Case(index, "random", "one raw random frame", [rng.randbytes(rng.randrange(300))])
    frames = [rng.randbytes(rng.choice((0, 1, 8, 100, 101, 102, 2000))) for _ in range(rng.randrange(21))]
    if frames and rng.random() < 0.5:  # a prelude-like first frame gets past the framing checks
        frames[0] = b"P2FM\x01" + rng.choice((ALICE.peer_id.key, rng.randbytes(32))) + rng.randbytes(64)
    return Case(index, "random", f"{len(frames)} random frames", frames)


def make_case(seed: int, index: int, pool: list[list[bytes]]) -> Case:
    rng = random.Random(f"{seed}:{index}")
    pick = rng.random()
    if pick < 0.45:
        return gen_mutated(index, rng, pool)
    return gen_insider(index, rng) if pick < 0.85 else gen_random(index, rng)


def receivers() -> dict[bool, GossipProtocol]:
    """Fresh receivers with the insider as a neighbour (True) or not (False); both know Alice and Other.

    Rebuilt every RESET_EVERY messages so that replay state never blocks the accept path for long.
    """
    insider = {True: [INSIDER.peer_id], False: []}
    out = {known: GossipProtocol(RECEIVER, [ALICE.peer_id, OTHER.peer_id, *insider[known]], CONFIG)
           for known in (True, False)}  # fmt: skip
    for proto in out.values():
        proto.start_round(START_ROUND, 0.0)
    return out


def _judge(case: Case, target: str, protos: dict[bool, GossipProtocol]) -> Any:
    """One target's answer to one message: its result, or whatever it raised."""
    try:
        if target == "decoder":
            return wire.open_update(case.frames, WireLimits(), known_senders=None)
        # The monotonic clock stands still for the first FLOOD messages after each reset (a
        # burst: the rate limit bites), then moves 1 s per message (the limit never bites).
        now_s = float(case.index - min(case.index % RESET_EVERY, FLOOD))
        extra = {"wall_time_ms": TS_MS + case.index} if _WALL_CLOCK else {}
        return protos[case.insider_known].receive(case.frames, now_s, **extra)
    except (Exception, FuzzHang) as exc:  # noqa: BLE001 -- _tally tells refusals from crashes
        return exc.with_traceback(None)  # no frame cycle to keep alive


def _fire(signum: int, frame: Any) -> None:
    raise FuzzHang(f"no answer within {HANG_S} s")


def run(messages: int = 100_000, seed: int = 0) -> Report:
    """Feed ``messages`` messages to both targets and tally the outcome.

    A SIGALRM watchdog (main thread only) turns a call still running after
    HANG_S into a FuzzHang crash, so even a hang in the code under test ends.
    The cyclic GC runs between blocks of messages, not inside a timed call:
    a full collection costs what the *process* holds (hundreds of ms under
    pytest with torch loaded), which would hide what a message costs.
    """
    pool = genuine_pool(seed)
    genuine = {frames_digest(f) for f in pool}
    report = Report(seed, reasons_by_generator={g: Counter() for g in GENERATORS})
    alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    old_handler = signal.signal(signal.SIGALRM, _fire) if alarm else None
    protos, start, gc_was_enabled = receivers(), time.perf_counter(), gc.isenabled()
    gc.disable()
    try:
        for index in range(messages):
            if index and index % RESET_EVERY == 0:
                protos = receivers()
                gc.collect(1)
            case = make_case(seed, index, pool)
            report.messages += 1
            report.by_generator[case.generator] += 1
            for target in ("decoder", "protocol"):
                t0 = time.perf_counter()
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, HANG_S)
                result = _judge(case, target, protos)
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                ms = (time.perf_counter() - t0) * 1e3
                if ms > report.slowest_ms:
                    report.slowest_ms, report.slowest = (
                        ms,
                        f"#{index} {case.generator}: {case.desc}; {target}",
                    )
                report.over_slow += ms > SLOW_MS
                _tally(report, case, target, result, genuine)
    finally:
        if gc_was_enabled:
            gc.enable()
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
    report.wall_s = time.perf_counter() - start
    return report


def _tally(report: Report, case: Case, target: str, result: Any, genuine: set[bytes]) -> None:
    """Classify one answer: a refusal, a legitimate acceptance, a forgery or a crash."""
    problem = None
    if isinstance(result, RemoteProtocolError) and target == "decoder":  # receive() must not raise
        report.decoder_reasons[result.reason.value] += 1
    elif isinstance(result, Rejected):
        report.reasons[result.reason.value] += 1
        report.reasons_by_generator[case.generator][result.reason.value] += 1
    elif isinstance(result, (Accepted, wire.Update)):
        legit = frames_digest(case.frames) in genuine
        who = "insider" if case.insider_signed else "genuine"
        if target == "decoder":  # no known_senders: a valid signature by any key is fine
            report.decoder_opened[who] += 1
            forged = not (case.insider_signed or legit)
        else:
            neighbours = {ALICE.peer_id, OTHER.peer_id} | ({INSIDER.peer_id} if case.insider_known else set())
            forged = result.sender not in neighbours or not (legit or case.insider_signed)
            report.accepted[who] += not forged
        report.forgeries += forged
        problem = f"accepted forgery (insider known: {case.insider_known})" if forged else None
    else:
        report.crashes += 1
        problem = repr(result)[:300]
        report.crash_kinds[f"{target}: {problem[:120]}"] += 1
    if problem and len(report.reproducers) < KEEP:
        report.reproducers.append(dict(index=case.index, generator=case.generator, mutation=case.desc,
                                       target=target, error=problem))  # fmt: skip


def replay(seed: int, index: int) -> str:
    """Rebuild message ``index`` and judge it on fresh receivers (protocol state is not replayed)."""
    case = make_case(seed, index, genuine_pool(seed))
    sizes = [memoryview(f).nbytes for f in case.frames]
    answers = [f"  {t}: {_judge(case, t, receivers())!r}"[:400] for t in ("decoder", "protocol")]
    return "\n".join([f"#{index} {case.generator}: {case.desc}; frame sizes {sizes}", *answers])


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
