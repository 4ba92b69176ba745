"""Wire-layer throughput: does encoding and signing keep up with the network?

Run::

    python benchmarks/wire.py [--mib 64] [--repeats 5] [--small-messages 2000] [--json]

What is measured, all in one run so that a noisy machine affects every
figure alike (wire format version 2: one message = one buffer = one ZeroMQ
frame, prelude | u32le header length | msgpack header | payload):

(a) **Pipeline** -- the whole p2pfm wire path for one adapter update of
    ``--mib`` MiB: ``wire.encode_update`` (header, BLAKE3 of the payload) +
    ``wire.sign`` (Ed25519 over the head's digest, then ONE copy of the
    tensor bytes into the single-buffer message: ``b"".join``) on the
    sender, ``wire.verify`` (the head's signature only) +
    ``wire.decode_update`` (BLAKE3 of the payload against the signed
    digest, read-only views) on the receiver; each stage timed separately
    with ``time.perf_counter`` and the total end to end. The update is a
    LoRA-like adapter: float32 ``lora_A`` (r, 4096) and ``lora_B`` (4096, r)
    on q/k/v/o of every layer, r=16 (r=8 when ``--mib`` is odd), as many
    layers as make exactly ``--mib`` MiB (64 MiB = 32 layers, r=16, the
    attention adapter of a 7B model).

(b) **ZeroMQ** -- the same signed message pushed PUSH -> PULL over loopback
    TCP with ``copy=False``, sender and receiver each with its own
    ``zmq.Context`` (own I/O thread, as two nodes have), the receiver in a
    background thread; the time runs from the send to the receiver holding
    the whole message.

(b') **CurveZMQ** -- (b) with CURVE on, keyed as p2pfm/net/zmq_transport.py keys
    its sockets: X25519 keys from ``Identity.curve_keypair`` /
    ``curve_public_key``, the PULL socket the CURVE server, and a ZAP
    handler that admits the sender's key. This is what a node's links run
    (plaintext needs the explicit ``insecure`` setting).

    (a), (b) and (b') run interleaved (a, b, b', a, b, b', ...) after one
    warm-up each; medians are reported. The ratio pipeline GB/s / ZeroMQ
    GB/s is the figure of merit: >= 1.0 means encoding and signing never
    slow the network down (PASS). The ratio pipeline / CurveZMQ is printed
    too: against the encrypted links that nodes really use.

(c) **Simulator scale** -- the cost of one small message as the simulator
    sends it (one float32 tensor of 1000 elements): encode + sign, and
    verify + decode, averaged over ``--small-messages`` messages; and the
    wall time of ``simulate(SimConfig("torus:4x4", rounds=50, dim=1000))``
    as signed messages per second. Their ratio (sim msgs/s x per-message
    sign+verify cost) says how close the simulator gets to the crypto bound.
    It can exceed 1: the simulator signs each node's update once and every
    neighbour verifies it, so also printed is the share of its wall time
    that its real wire work (signs x encode+sign + messages x
    verify+decode) takes.

(d) **Context** -- plain Ed25519 (nacl ``SigningKey.sign`` /
    ``VerifyKey.verify``) over the whole payload, once each, against BLAKE3
    (best of 3) of the same bytes: ``max_threads=AUTO`` and single-threaded
    (wire.py's setting) over one buffer (what ``decode_payload`` checks),
    single-threaded fed tensor by tensor (what ``encode_update`` does;
    checked to give the header's payload digest); and the copy that a
    single-frame message costs (``b"".join`` of the tensors, as
    ``wire.sign`` does: a new buffer, whose pages the kernel maps on first
    write) next to the same copy into a reused buffer whose pages are
    already mapped (what is memcpy, what is page faults). Ed25519 runs SHA-512 over its whole input (twice to
    sign), which is why wire.py hashes with BLAKE3 and signs a digest.

Throughputs are decimal GB/s (1e9 bytes per second) of the message's wire
bytes (prelude and header included), the same numerator for (a), (b) and
(b').
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import blake3
import nacl.signing
import numpy as np
import zmq
import zmq.auth.thread
from zmq.utils import z85

from p2pfm.core import wire
from p2pfm.core.identity import Identity, curve_public_key
from p2pfm.lab.sim import SimConfig, simulate

MIB = 2**20
HIDDEN = 4096
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
NETWORK = "p2pfm-bench"
FINGERPRINT = bytes(range(32))
RECV_TIMEOUT_MS = 10_000
SIM_TOPOLOGY = "torus:4x4"
SIM_ROUNDS = 50
SMALL_DIM = 1000
TARGET_RATIO = 1.0


# ------------------------------------------------------------------ the update


@dataclass(frozen=True)
class Layout:
    layers: int
    rank: int
    hidden: int

    @property
    def tensors(self) -> int:
        return self.layers * len(MODULES) * 2

    def describe(self) -> str:
        return (
            f"{self.tensors} float32 tensors: {self.layers} layers x {len(MODULES)} modules "
            f"({'/'.join(m.split('_')[0] for m in MODULES)}) x "
            f"lora_A ({self.rank}, {self.hidden}) + lora_B ({self.hidden}, {self.rank})"
        )


def layout_for(mib: int) -> Layout:
    """Layers and rank so that the adapter is exactly ``mib`` MiB of float32."""
    # One (A, B) pair is 2 * rank * HIDDEN * 4 bytes = rank * 32 KiB; a layer
    # has len(MODULES) pairs, so layers * rank = mib * 8.
    rank = 16 if mib % 2 == 0 else 8
    layers = mib * MIB // (len(MODULES) * 2 * rank * HIDDEN * 4)
    layout = Layout(layers, rank, HIDDEN)
    if layout.tensors * rank * HIDDEN * 4 != mib * MIB:  # pragma: no cover - arithmetic above
        raise ValueError(f"no LoRA layout of exactly {mib} MiB")
    return layout


def make_adapter(layout: Layout, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    prefix = "base_model.model.model.layers"
    for layer in range(layout.layers):
        for module in MODULES:
            name = f"{prefix}.{layer}.self_attn.{module}"
            lora_a = rng.standard_normal((layout.rank, layout.hidden), dtype=np.float32)
            lora_b = rng.standard_normal((layout.hidden, layout.rank), dtype=np.float32)
            tensors[f"{name}.lora_A.weight"] = lora_a * np.float32(0.01)
            tensors[f"{name}.lora_B.weight"] = lora_b * np.float32(0.001)
    return tensors


def encode(tensors: dict[str, np.ndarray[Any, Any]], seq: int) -> wire.Unsigned:
    return wire.encode_update(
        network=NETWORK,
        round=1,
        seq=seq,
        ts_ms=1_700_000_000_000 + seq,
        fingerprint=FINGERPRINT,
        degree=4,
        samples=1000,
        tensors=tensors,
    )


# ------------------------------------------------------------- (a) pipeline


@dataclass(frozen=True)
class PipelineRun:
    encode_s: float
    sign_s: float
    verify_s: float
    decode_s: float
    total_s: float
    wire_bytes: int


def run_pipeline(
    tensors: dict[str, np.ndarray[Any, Any]], identity: Identity, limits: wire.WireLimits, seq: int
) -> PipelineRun:
    known = {identity.peer_id}
    t0 = time.perf_counter()
    unsigned = encode(tensors, seq)
    t1 = time.perf_counter()
    message = wire.sign(unsigned, identity)  # includes the one copy of the payload into the message
    t2 = time.perf_counter()
    verified = wire.verify(message, limits, known)
    t3 = time.perf_counter()
    update = wire.decode_update(verified, limits)
    t4 = time.perf_counter()
    # Outside the timed region: prove the result is real and complete.
    if len(update.tensors) != len(tensors) or update.seq != seq:
        raise RuntimeError("decoded update does not match what was sent")
    last = next(reversed(tensors))
    if not np.array_equal(update.tensors[last], tensors[last]) or float(
        update.tensors[last].sum(dtype=np.float64)
    ) != float(tensors[last].sum(dtype=np.float64)):
        raise RuntimeError("decoded tensor differs from the original")
    return PipelineRun(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, update.wire_bytes)


# ------------------------------------------------------ (b) ZeroMQ, (b') CurveZMQ


class _Admit:
    """ZAP credentials provider admitting one CurveZMQ client key (the node transport admits its peers')."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


class ZmqLoopback:
    """PUSH -> PULL over tcp://127.0.0.1, one context per side, receiver in a background thread.

    With ``curve`` (sender, receiver) identities, CURVE is on as p2pfm.net.zmq_transport
    sets it up: the PULL socket is the CURVE server with the receiver's keys,
    the PUSH socket knows the server's public key, a ZAP handler admits the
    sender's key.
    """

    def __init__(self, messages: int, curve: tuple[Identity, Identity] | None = None) -> None:
        self.send_ctx, self.recv_ctx = zmq.Context(), zmq.Context()
        self.auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self.push = self.send_ctx.socket(zmq.PUSH)
        self.pull = self.recv_ctx.socket(zmq.PULL)
        for sock in (self.push, self.pull):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
        if curve is not None:
            sender, receiver = curve
            sender_public, sender_secret = sender.curve_keypair()
            receiver_public, receiver_secret = receiver.curve_keypair()
            self.auth = zmq.auth.thread.ThreadAuthenticator(self.recv_ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", _Admit(z85.encode(sender_public)))
            self.pull.curve_server = True
            self.pull.curve_publickey, self.pull.curve_secretkey = (
                z85.encode(receiver_public),
                z85.encode(receiver_secret),
            )
            self.push.curve_serverkey = z85.encode(curve_public_key(receiver.peer_id))
            self.push.curve_publickey, self.push.curve_secretkey = (
                z85.encode(sender_public),
                z85.encode(sender_secret),
            )
        self.push.setsockopt(zmq.SNDTIMEO, RECV_TIMEOUT_MS)
        self.pull.setsockopt(zmq.RCVTIMEO, RECV_TIMEOUT_MS)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.push.connect(f"tcp://127.0.0.1:{port}")
        self.results: queue.Queue[tuple[float, int] | str] = queue.Queue()
        self.thread = threading.Thread(target=self._receive, args=(messages,), daemon=True)
        self.thread.start()

    def _receive(self, messages: int) -> None:
        for _ in range(messages):  # bounded: exactly the messages the main thread sends
            try:
                frame = self.pull.recv(copy=False)
            except zmq.ZMQError as exc:  # zmq.Again on RCVTIMEO
                self.results.put(f"receive failed: {exc}")
                return
            done = time.perf_counter()
            more = self.pull.getsockopt(zmq.RCVMORE)
            self.results.put((done, len(frame)) if not more else "a multipart message arrived")

    def transfer(self, message: wire.Buffer) -> tuple[float, int]:
        """Send one single-frame message; return (seconds, bytes received)."""
        start = time.perf_counter()
        self.push.send(message, copy=False)
        got = self.results.get(timeout=RECV_TIMEOUT_MS / 1000 + 5)
        if isinstance(got, str):
            raise RuntimeError(got)
        done, nbytes = got
        return done - start, nbytes

    def close(self) -> None:
        self.thread.join(timeout=RECV_TIMEOUT_MS / 1000 + 5)
        self.push.close(linger=0)
        self.pull.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.send_ctx.term()
        self.recv_ctx.term()


# --------------------------------------------------------- (c) small messages


def small_message_cost(identity: Identity, limits: wire.WireLimits, count: int) -> dict[str, float]:
    rng = np.random.default_rng(1)
    tensors = {"x": rng.standard_normal(SMALL_DIM, dtype=np.float32)}
    known = {identity.peer_id}
    for seq in range(20):  # warm-up (key cache, allocator)
        wire.decode_update(wire.verify(wire.sign(encode(tensors, seq), identity), limits, known), limits)
    t0 = time.perf_counter()
    outgoing = [wire.sign(encode(tensors, seq), identity) for seq in range(count)]
    t1 = time.perf_counter()
    decoded = [wire.decode_update(wire.verify(m, limits, known), limits) for m in outgoing]
    t2 = time.perf_counter()
    if len(decoded) != count or not np.array_equal(decoded[-1].tensors["x"], tensors["x"]):
        raise RuntimeError("small-message round trip failed")
    sign_s, verify_s = (t1 - t0) / count, (t2 - t1) / count
    return {
        "messages": count,
        "wire_bytes": wire.message_bytes(outgoing[0]),
        "encode_sign_us": sign_s * 1e6,
        "verify_decode_us": verify_s * 1e6,
        "sign_verify_us": (sign_s + verify_s) * 1e6,
        "crypto_bound_msgs_per_s": 1 / (sign_s + verify_s),
    }


def simulator_rate(repeats: int) -> dict[str, Any]:
    config = SimConfig(SIM_TOPOLOGY, rounds=SIM_ROUNDS, dim=SMALL_DIM)
    times: list[float] = []
    messages = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = simulate(config)
        times.append(time.perf_counter() - t0)
        messages = sum(r.messages for r in result.rounds)
        if result.rejected:
            raise RuntimeError(f"simulator rejected {result.rejected} messages")
    wall = statistics.median(times)
    return {
        "topology": SIM_TOPOLOGY,
        "rounds": SIM_ROUNDS,
        "dim": SMALL_DIM,
        "nodes": result.nodes,
        "messages": messages,
        "wall_s": wall,
        "wall_s_runs": times,
        "runs": repeats,
        "msgs_per_s": messages / wall,
    }


# ------------------------------------------------------------- (d) context


def time_once(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of(fn: Callable[[], object], n: int = 3) -> float:
    return min(time_once(fn) for _ in range(n))


def hash_context(
    message: bytes, tensors: dict[str, np.ndarray[Any, Any]], identity: Identity
) -> dict[str, Any]:
    """Ed25519 over the raw payload vs BLAKE3 (as decode_payload and encode_update run it), and the copy."""
    limits = wire.WireLimits()
    verified = wire.verify(message, limits)
    header = wire.decode_header(verified, limits)
    assert isinstance(header, wire.UpdateHeader)
    chunks = [np.ascontiguousarray(t).reshape(-1).view(np.uint8).data for t in tensors.values()]
    payload = bytes(verified.payload)  # the concatenated tensor bytes, built outside the timings
    n = len(payload)
    key = nacl.signing.SigningKey(identity.seed)  # the same key wire.sign uses
    signed: list[Any] = []
    sign_s = time_once(lambda: signed.append(key.sign(payload)))
    verify_s = time_once(lambda: key.verify_key.verify(signed[0]))

    def b3_whole(threads: int) -> bytes:
        return blake3.blake3(payload, max_threads=threads).digest()

    def b3_per_tensor() -> bytes:  # encode_update's digest: one update per tensor, one thread
        hasher = blake3.blake3(max_threads=1)
        for chunk in chunks:
            hasher.update(chunk)
        return hasher.digest()

    reused = bytearray(n)  # written once below, so its pages are mapped before the timing

    def copy_into_reused() -> None:
        view, offset = memoryview(reused), 0
        for chunk in chunks:
            view[offset : offset + chunk.nbytes] = chunk
            offset += chunk.nbytes

    copy_into_reused()
    auto = blake3.blake3.AUTO
    if not b3_whole(auto) == b3_whole(1) == b3_per_tensor() == header.payload_digest:
        raise RuntimeError("the replicated digests differ from the header's payload digest")
    figures = {
        "ed25519_sign_s": sign_s,
        "ed25519_verify_s": verify_s,
        "blake3_auto_whole_s": best_of(lambda: b3_whole(auto)),
        "blake3_1thread_whole_s": best_of(lambda: b3_whole(1)),
        "blake3_1thread_per_tensor_s": best_of(b3_per_tensor),
        "join_copy_s": best_of(lambda: b"".join(chunks)),
        "copy_reused_s": best_of(copy_into_reused),
    }
    out: dict[str, Any] = {"payload_bytes": n, "tensors": len(chunks), "tensor_bytes": chunks[0].nbytes}
    for name, seconds in figures.items():
        out[name] = seconds
        out[name[:-2] + "_gbps"] = n / seconds / 1e9
    return out


# ------------------------------------------------------------------- driver


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def run(mib: int, repeats: int, small_messages: int) -> dict[str, Any]:
    started = time.perf_counter()
    layout = layout_for(mib)
    tensors = make_adapter(layout)
    identity, receiver = Identity(bytes(32)), Identity(bytes([1]) * 32)
    limits = wire.WireLimits()
    message = wire.sign(encode(tensors, 0), identity)  # what ZeroMQ carries: the real signed message
    wire_bytes = wire.message_bytes(message)
    header_bytes = wire.verify(message, limits).header.nbytes

    pipeline: list[PipelineRun] = []
    transfers: dict[str, list[float]] = {"zmq": [], "curve": []}
    links = {"zmq": ZmqLoopback(repeats + 1), "curve": ZmqLoopback(repeats + 1, curve=(identity, receiver))}

    def transfer(kind: str) -> float:
        seconds, got_bytes = links[kind].transfer(message)
        if got_bytes != wire_bytes:
            raise RuntimeError(f"{kind}: delivered {got_bytes} of {wire_bytes} bytes")
        return seconds

    try:
        run_pipeline(tensors, identity, limits, seq=1)  # warm-ups (and CURVE handshake), not recorded
        for kind in links:
            transfer(kind)
        for i in range(repeats):  # interleaved: a, b, b', a, b, b', ...
            pipeline.append(run_pipeline(tensors, identity, limits, seq=2 + i))
            for kind, times in transfers.items():
                times.append(transfer(kind))
    finally:
        for link in links.values():
            link.close()

    pipe_s = median([p.total_s for p in pipeline])
    pipe_gbps = wire_bytes / pipe_s / 1e9
    nets = {}
    for kind, times in transfers.items():
        seconds = median(times)
        nets[kind] = {"s": seconds, "s_runs": times, "gbps": wire_bytes / seconds / 1e9}
    nets["zmq"]["transport"] = "tcp://127.0.0.1 PUSH->PULL, plaintext"
    nets["curve"]["transport"] = "tcp://127.0.0.1 PUSH->PULL, CURVE (X25519 keys of the Ed25519 identities)"
    ratio = pipe_gbps / nets["zmq"]["gbps"]
    ratio_curve = pipe_gbps / nets["curve"]["gbps"]

    small = small_message_cost(identity, limits, small_messages)
    sim = simulator_rate(max(1, min(repeats, 3)))
    sim_ratio = sim["msgs_per_s"] / small["crypto_bound_msgs_per_s"]
    # The simulator signs once per node and round but verifies once per message
    # (degree times as often): the wire work it really does, at (c)'s unit costs.
    signs = sim["nodes"] * sim["rounds"]
    sim_wire_s = (signs * small["encode_sign_us"] + sim["messages"] * small["verify_decode_us"]) / 1e6
    sim["signs"] = signs
    sim["wire_work_s"] = sim_wire_s
    sim["wire_work_fraction"] = sim_wire_s / sim["wall_s"]
    context = hash_context(message, tensors, identity)

    return {
        "machine": {"python": sys.version.split()[0], "zmq": zmq.zmq_version(), "pyzmq": zmq.__version__},
        "update": {
            "mib": mib,
            "layout": layout.describe(),
            "tensors": layout.tensors,
            "tensor_bytes": layout.rank * layout.hidden * 4,
            "payload_bytes": mib * MIB,
            "wire_bytes": wire_bytes,
            "wire_version": wire.WIRE_VERSION,
            "frames": 1,
            "prelude_bytes": wire.PRELUDE_BYTES,
            "header_bytes": header_bytes,
        },
        "repeats": repeats,
        "pipeline": {
            "encode_s": median([p.encode_s for p in pipeline]),
            "sign_s": median([p.sign_s for p in pipeline]),
            "verify_s": median([p.verify_s for p in pipeline]),
            "decode_s": median([p.decode_s for p in pipeline]),
            "total_s": pipe_s,
            "total_s_runs": [p.total_s for p in pipeline],
            "gbps": pipe_gbps,
        },
        "zmq": nets["zmq"],
        "curve": nets["curve"],
        "ratio": ratio,
        "ratio_curve": ratio_curve,
        "target": TARGET_RATIO,
        "pass": ratio >= TARGET_RATIO,
        "pass_curve": ratio_curve >= TARGET_RATIO,
        "small_message": small,
        "simulator": sim,
        "simulator_vs_crypto_bound": sim_ratio,
        "context": context,
        "elapsed_s": time.perf_counter() - started,
    }


def report(r: dict[str, Any]) -> str:
    u, p, z, cz, s, sim, c = (
        r[k] for k in ("update", "pipeline", "zmq", "curve", "small_message", "simulator", "context")
    )
    ms = 1e3

    def stage(name: str, what: str) -> str:
        seconds = p[f"{name}_s"]
        return f"    {name:<7}{seconds * ms:9.2f} ms  {seconds / p['total_s'] * 100:5.1f} %  {what}"

    def verdict(ratio: float) -> str:
        return "PASS" if ratio >= r["target"] else "FAIL"

    def context(label: str, key: str) -> str:
        return f"    {label:<42}{c[key + '_gbps']:6.2f} GB/s ({c[key + '_s'] * ms:8.1f} ms)"

    lines = [
        f"p2pfm wire benchmark  (python {r['machine']['python']}, libzmq {r['machine']['zmq']}, "
        f"pyzmq {r['machine']['pyzmq']}; medians of {r['repeats']} interleaved runs)",
        f"update: {u['mib']} MiB = {u['layout']}",
        f"        wire v{u['wire_version']}: 1 frame of {u['wire_bytes']} bytes "
        f"(prelude {u['prelude_bytes']} B, header {u['header_bytes']} B, payload {u['payload_bytes']} B)",
        "",
        "(a) pipeline  encode_update + sign + verify + decode_update",
        stage("encode", "header + BLAKE3 of the payload"),
        stage("sign", "Ed25519 of the head digest + one copy of the payload"),
        stage("verify", "the head's signature"),
        stage("decode", "BLAKE3 of the payload vs the signed digest + views"),
        f"    total  {p['total_s'] * ms:9.2f} ms  -> {p['gbps']:6.2f} GB/s",
        f"(b) ZeroMQ    {z['transport']}, copy=False, send -> whole message received",
        f"    total  {z['s'] * ms:9.2f} ms  -> {z['gbps']:6.2f} GB/s",
        f"(b') CurveZMQ {cz['transport']}",
        f"    total  {cz['s'] * ms:9.2f} ms  -> {cz['gbps']:6.2f} GB/s",
        f"ratio pipeline/ZeroMQ throughput   = {r['ratio']:.2f}  (target >= {r['target']:.1f}: "
        f"encoding and signing never slow the network down) -> {verdict(r['ratio'])}",
        f"ratio pipeline/CurveZMQ throughput = {r['ratio_curve']:.2f}  (the encrypted links nodes run) "
        f"-> {verdict(r['ratio_curve'])}",
        "",
        f"(c) small message ({SMALL_DIM} float32, {s['wire_bytes']} wire bytes, mean of {s['messages']})",
        f"    encode+sign   {s['encode_sign_us']:8.1f} us",
        f"    verify+decode {s['verify_decode_us']:8.1f} us",
        f"    sign+verify   {s['sign_verify_us']:8.1f} us  -> crypto bound "
        f"{s['crypto_bound_msgs_per_s']:,.0f} msgs/s",
        f"    simulate({sim['topology']}, rounds={sim['rounds']}, dim={sim['dim']}): {sim['messages']} "
        f"messages in {sim['wall_s'] * ms:.1f} ms (median of {sim['runs']})",
        f"    -> {sim['msgs_per_s']:,.0f} msgs/s",
        f"    simulator / crypto bound = {r['simulator_vs_crypto_bound']:.2f}  (bound: one sign + one verify "
        "per message)",
        f"    but the simulator signs only {sim['signs']} times (once per node and round) for "
        f"{sim['messages']} verifies:",
        f"    that wire work costs {sim['wire_work_s'] * ms:.1f} ms = "
        f"{sim['wire_work_fraction'] * 100:.0f} % of the simulator's wall time",
        "",
        f"(d) context: {c['payload_bytes']} payload bytes ({c['tensors']} tensors of {c['tensor_bytes']} B); "
        "Ed25519 once each, the rest best of 3",
        context("Ed25519 sign (SHA-512, whole payload)", "ed25519_sign"),
        context("Ed25519 verify (whole payload)", "ed25519_verify"),
        context("BLAKE3 AUTO threads, one buffer", "blake3_auto_whole"),
        context("BLAKE3 1 thread, one buffer (decode)", "blake3_1thread_whole"),
        context("BLAKE3 1 thread, per tensor (encode)", "blake3_1thread_per_tensor"),
        context("copy into a new buffer (sign's b''.join)", "join_copy"),
        context("copy into a reused, mapped buffer", "copy_reused"),
        "",
        f"elapsed {r['elapsed_s']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=64, help="adapter size in MiB (1..500, default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs of (a), (b), (b') (default 5)")
    parser.add_argument(
        "--small-messages", type=int, default=2000, help="messages averaged in (c) (default 2000)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if not 1 <= args.mib <= 500:  # WireLimits.max_message_bytes is 512 MiB, headers included
        parser.error("--mib must be in 1..500")
    if not 1 <= args.repeats <= 100:
        parser.error("--repeats must be in 1..100")
    if not 1 <= args.small_messages <= 100_000:
        parser.error("--small-messages must be in 1..100000")
    result = run(args.mib, args.repeats, args.small_messages)
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
