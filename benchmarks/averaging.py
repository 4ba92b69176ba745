"""One exact average of N peers' states over real node processes (issue 13 item 3).

Run::

    python benchmarks/averaging.py [--peers 4] [--mib 64] [--repeats 5] [--stages]
                                   [--glibc-default] [--hivemind-python PATH] [--json]

N node processes on ``complete:N`` over loopback (``tcp://127.0.0.1``, free
ports: every node binds port 0 and is then told the others' addresses), each
holding ``--mib`` MiB of float32 (one vector, standard normal, seeded and
distinct per peer, in a ``QuadraticLearner``). Each node is built by
``p2pfm.node.factory.assemble_node`` with the real ``ZmqTransport``,
``gossip.rule = "mean"`` and no local steps, so one round of the node loop
(``Node.train``, ``Node.exchange``, ``Node.mix``) is the real code path:
``get_state``, ``wire.encode_update`` (BLAKE3 of the payload), ``wire.sign``
(Ed25519, one copy into the message), ``ZmqTransport.send`` to every
neighbour, CurveZMQ in libzmq's I/O threads, ``GossipProtocol.receive``
(signature, header gates, BLAKE3 check, NaN/Inf gate), ``RoundComplete.mix``
(Metropolis weights: 1/N each on complete:N, so one round is the exact
average), ``set_state``.

One step runs from every peer starting its exchange (all released by one
barrier) to every peer holding the mixed state: max(end) - min(start) over
the peers, on the shared monotonic clock. Before each step every peer goes
back to its initial state, so every step computes the same average; after
it each peer compares its state with the float64 mean of all initial states
(max abs error; it must be within one float32 ulp of the largest mean value).

Two networks run side by side in the same run: one with CurveZMQ (as nodes
run by default) and one with ``transport.insecure`` (plaintext), each
warmed up with one round (connections, CURVE handshakes), then the steps
interleaved (CurveZMQ, plaintext, CurveZMQ, ...). The figure is the
CurveZMQ median against the issue's target, 0.85 s (4 peers, 64 MiB, on the
2-core machine).

``--stages`` times the stages of each step inside every node: per wrapped
function (``get_state``, ``wire.encode_update``, ...) its wall time and the
CPU time of the thread that ran it, summed over the step's calls; per thread
(the Python main thread, libzmq's I/O thread, the rest) its CPU time, kernel
share, time spent runnable but waiting for a core, and minor page faults
(``/proc/self/task``). It prints their means over nodes and repeats, and the
CPU of all nodes per step over the cores: the step's floor when it is
CPU-bound.

Memory: every node process holds about 20 times ``--mib`` at its peak (its
state, the mean it checks against, three received messages and the previous
round's, the float64 mix); both networks run at once, so 64 MiB takes about
10 GB.

``--glibc-default`` builds the nodes without the transport's allocator
settings (``zmq_transport.keep_large_buffers``): what a step cost before.

``--hivemind-python PATH`` also runs ../shared/anchors/hivemind_averaging.py
(hivemind's DecentralizedAverager, the anchor measurement) with that
interpreter after ours, with the same peers, size and repeats, and prints
its median beside ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from p2pfm.config.node_config import FaultSettings, GossipSettings, Peer
from p2pfm.config.settings import TransportSettings
from p2pfm.core.identity import Identity
from p2pfm.core.wire import WireLimits
from p2pfm.learn.learner import QuadraticLearner
from p2pfm.net import zmq_transport
from p2pfm.net.zmq_transport import ZmqTransport
from p2pfm.node.clock import SystemClock
from p2pfm.node.factory import assemble_node
from p2pfm.node.loop import Node, RoundPlan
from p2pfm.node.store import MemoryStore

MIB = 2**20
NETWORK = "p2pfm-averaging-bench"
TARGET_S = 0.85  # issue 13: 4 peers, 64 MiB, encryption on, 2-core machine
ROUND_TIMEOUT_S = 120.0  # the protocol's deadline: far above a step, so a step never times out
ANCHOR = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "hivemind_averaging.py"
MODES = ("curve", "plaintext")
MODE_LABELS = {"curve": "CurveZMQ (default)", "plaintext": "plaintext (insecure)"}


def _step_timeout_s(mib: int, peers: int) -> float:
    """How long the coordinator waits for one step of every peer (generous: the machine may be busy)."""
    return 60.0 + 0.05 * mib * peers * peers


def identity_of(index: int) -> Identity:
    return Identity(bytes([index + 1]) * 32)


def initial_state(index: int, mib: int, seed: int) -> np.ndarray[Any, Any]:
    """Peer ``index``'s vector: ``mib`` MiB of standard normal float32, distinct per peer and seed."""
    rng = np.random.default_rng([seed, index])
    return rng.standard_normal(mib * MIB // 4, dtype=np.float32)


def exact_mean(peers: int, mib: int, seed: int) -> np.ndarray[Any, Any]:
    """The float64 mean of every peer's initial state (what one exact average must give)."""
    total = np.zeros(mib * MIB // 4, dtype=np.float64)
    for j in range(peers):
        total += initial_state(j, mib, seed)
    total /= peers
    return total


def float32_bound(mean: np.ndarray[Any, Any]) -> float:
    """One float32 ulp at the largest |mean|: rounding the exact mean to float32 costs at most half."""
    return float(np.spacing(np.float32(np.max(np.abs(mean)))))


# ------------------------------------------------------------------ per-node stages


@dataclass
class Stages:
    """Per instrumented function, summed over one step's calls: its wall time, and the CPU time of
    the thread that ran it (on an oversubscribed machine the wall time includes waiting for a core)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    cpu_seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def clear(self) -> None:
        self.seconds.clear()
        self.cpu_seconds.clear()

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.cpu_seconds[name] += time.thread_time() - cpu_started

        setattr(owner, attr, timed)


# Functions timed by --stages, in the order of a step: (label, what it does).
STAGE_LABELS = {
    "get_state": "learner.get_state: copy of the state",
    "encode": "wire.encode_update: header + BLAKE3 of the payload",
    "sign": "wire.sign: Ed25519 of the head + one copy into the message",
    "send": "ZmqTransport.send: queue to each neighbour (zero-copy)",
    "receive": "ZmqTransport.receive: waiting for frames (poll)",
    "verify": "wire.verify: bounds + head signature",
    "decode_header": "wire.decode_header: msgpack + checks",
    "decode_payload": "wire.decode_payload: BLAKE3 check + views",
    "content_gate": "protocol NaN/Inf gate (np.isfinite)",
    "mix": "RoundComplete.mix: mean in float64",
    "aggregation": "Node: LoRA aggregation diagnostic",
    "set_state": "learner.set_state: isfinite + copy",
}


def _instrument(node: Node, stages: Stages) -> None:
    import p2pfm.core.events as events  # noqa: PLC0415  only --stages patches these
    import p2pfm.core.wire as wire  # noqa: PLC0415

    stages.wrap(wire, "encode_update", "encode")
    stages.wrap(wire, "sign", "sign")
    stages.wrap(wire, "verify", "verify")
    stages.wrap(wire, "decode_header", "decode_header")
    stages.wrap(wire, "decode_payload", "decode_payload")
    stages.wrap(events, "robust_mix", "mix")
    stages.wrap(node.protocol, "_content_gate", "content_gate")
    stages.wrap(node.learner, "get_state", "get_state")
    stages.wrap(node.learner, "set_state", "set_state")
    assert node.transport is not None
    stages.wrap(node.transport, "send", "send")
    stages.wrap(node.transport, "receive", "receive")
    stages.wrap(node, "_measure_aggregation", "aggregation")


MAIN_THREAD = "python main thread"


def _thread_cpu() -> dict[str, tuple[float, float, float, int]]:
    """Per thread group of this process: seconds on a CPU, of which in the kernel, seconds runnable
    but waiting for a CPU (schedstat, stat), and minor page faults."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    pid = os.getpid()
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            run_ns, wait_ns, _ = (task / "schedstat").read_text().split()
            stat = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, ValueError):  # the thread ended meanwhile
            continue
        if int(task.name) == pid:
            group = MAIN_THREAD
        elif comm.startswith("ZMQbg/IO"):
            group = "libzmq I/O thread"
        else:
            group = "other threads"
        totals = out[group]
        totals[0] += int(run_ns) / 1e9
        totals[1] += int(stat[12]) * tick_s  # stime (field 15 of stat; 13th after the comm)
        totals[2] += int(wait_ns) / 1e9
        totals[3] += int(stat[7])  # minflt (field 10)
    return {k: (v[0], v[1], v[2], int(v[3])) for k, v in out.items()}


# ------------------------------------------------------------------ the node process


@dataclass(frozen=True)
class WorkerSpec:
    index: int
    peers: int
    mib: int
    seed: int
    secure: bool
    stages: bool
    rounds: int
    command_timeout_s: float
    keep_buffers: bool = True


def _build_node(spec: WorkerSpec, start: np.ndarray[Any, Any]) -> tuple[Node, list[ZmqTransport]]:
    me = identity_of(spec.index)
    others = [j for j in range(spec.peers) if j != spec.index]
    made: list[ZmqTransport] = []

    def transport(limits: WireLimits) -> ZmqTransport:
        link = ZmqTransport(
            "tcp://127.0.0.1:*",
            {},  # neighbours' addresses come once every node has bound its port (set_peers)
            TransportSettings(insecure=not spec.secure),
            identity=me,
            allowed=[identity_of(j).peer_id for j in others],
            max_message_bytes=limits.max_message_bytes,
        )
        made.append(link)
        return link

    # A fixed deadline far above a step: the adaptive one (recent delays + 1 s) could end a step on a
    # busy machine before every update arrived, and the average would not be exact.
    gossip = GossipSettings(
        rounds=spec.rounds,
        round_timeout_s=ROUND_TIMEOUT_S,
        deadline="fixed",
        rule="mean",
        eval_every=spec.rounds,
    )
    stop_event = threading.Event()
    node = assemble_node(
        identity=me,
        name=f"n{spec.index}",
        network=NETWORK,
        # The address of a Peer is not used by assemble_node (the transport is built here).
        peers=[Peer(identity_of(j).peer_id, "tcp://127.0.0.1:1", f"n{j}") for j in others],
        gossip=gossip,
        faults=FaultSettings(),
        plan=RoundPlan(rounds=spec.rounds, local_steps=0, samples_per_round=1, eval_every=spec.rounds),
        learner=QuadraticLearner(start, start, start=start),
        transport=transport,
        clock=SystemClock(stop_event),
        store=MemoryStore(),
        seed=spec.index,
        stop=stop_event,
    )
    return node, made


def _worker(spec: WorkerSpec, conn: Connection, barrier: Barrier) -> None:
    """One node: build, report its address, connect, then run the steps the coordinator asks for."""
    node: Node | None = None
    try:
        if not spec.keep_buffers:  # --glibc-default: the allocator as it was before the transport tuned it
            zmq_transport.keep_large_buffers = lambda: False
        start = initial_state(spec.index, spec.mib, spec.seed)
        expected = exact_mean(spec.peers, spec.mib, spec.seed)
        node, made = _build_node(spec, start)
        transport = made[0]
        conn.send(("address", transport.listen_address))
        addresses: dict[int, str] = _command(conn, spec)[1]
        transport.set_peers({identity_of(j).peer_id: a for j, a in addresses.items() if j != spec.index})
        stages = Stages()
        if spec.stages:
            _instrument(node, stages)
        conn.send(("ready",))
        while True:
            command = _command(conn, spec)
            if command[0] == "stop":
                break
            round_ = int(command[1])
            node.learner.set_state({"x": start})  # every step averages the same initial states
            stages.clear()
            barrier.wait(timeout=spec.command_timeout_s)
            cpu_before = _thread_cpu() if spec.stages else {}
            started = time.perf_counter()
            node.train(round_)
            done = node.exchange(round_)
            if done is not None:
                node.mix(done)
            ended = time.perf_counter()
            cpu_ended = _thread_cpu() if spec.stages else {}
            step_stages = {k: (v, stages.cpu_seconds[k]) for k, v in stages.seconds.items()}
            mixed = node.learner.get_state()["x"]
            error = float(np.max(np.abs(mixed.astype(np.float64) - expected)))
            heard = 0 if done is None else len(done.updates)
            timed_out = done is None or done.timed_out
            rejected = {r.value: n for r, n in node.protocol.rejections.items()}
            conn.send(("step", started, ended, error, heard, timed_out, rejected, step_stages))
            if spec.stages:
                # The I/O thread may still be sending after this node mixed: read its CPU once the
                # coordinator says every peer is done; the main thread's at the end of the step
                # (the exactness check above is not part of it).
                _command(conn, spec)
                after = {**_thread_cpu(), MAIN_THREAD: cpu_ended[MAIN_THREAD]}
                zero = (0.0, 0.0, 0.0, 0)
                cpu = {
                    g: tuple(a - b for a, b in zip(after[g], cpu_before.get(g, zero), strict=True))
                    for g in after
                }
                conn.send(("cpu", cpu))
    except BaseException:  # noqa: BLE001  reported to the coordinator, which fails the run
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if node is not None:
            node.close()
        conn.close()


def _command(conn: Connection, spec: WorkerSpec) -> tuple[Any, ...]:
    """The coordinator's next command; a coordinator silent this long is gone: stop."""
    if not conn.poll(spec.command_timeout_s):
        raise TimeoutError("no command from the coordinator")
    command: tuple[Any, ...] = conn.recv()
    return command


# ------------------------------------------------------------------ the coordinator


@dataclass
class Network:
    """The N node processes of one mode, and the pipes to them."""

    mode: str
    processes: list[multiprocessing.process.BaseProcess]
    pipes: list[Connection]
    timeout_s: float
    next_round: int = 1

    def expect(self, kind: str) -> list[tuple[Any, ...]]:
        """One message of ``kind`` from every node (bounded wait; a worker's error ends the run)."""
        out = []
        deadline = time.monotonic() + self.timeout_s
        for i, pipe in enumerate(self.pipes):
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"{self.mode} node {i}: no {kind!r} within {self.timeout_s:.0f} s")
            message: tuple[Any, ...] = pipe.recv()
            if message[0] == "error":
                raise RuntimeError(f"{self.mode} node {i} failed:\n{message[1]}")
            if message[0] != kind:
                raise RuntimeError(f"{self.mode} node {i}: expected {kind!r}, got {message[0]!r}")
            out.append(message)
        return out

    def send(self, command: tuple[Any, ...]) -> None:
        for pipe in self.pipes:
            pipe.send(command)

    def step(self, stages: bool) -> dict[str, Any]:
        round_ = self.next_round
        self.next_round += 1
        self.send(("round", round_))
        reports = self.expect("step")
        started = min(r[1] for r in reports)
        ended = max(r[2] for r in reports)
        result: dict[str, Any] = {
            "s": ended - started,
            "round": round_,
            "max_abs_error": max(r[3] for r in reports),
            "heard": [r[4] for r in reports],
            "timed_out": any(r[5] for r in reports),
            "rejected": [r[6] for r in reports],
            "node_s": [r[2] - r[1] for r in reports],
            "start_spread_s": max(r[1] for r in reports) - started,
        }
        if stages:
            result["stages"] = [r[7] for r in reports]
            self.send(("collect",))
            result["cpu"] = [r[1] for r in self.expect("cpu")]
        return result

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for process in self.processes:
            process.join(timeout=10)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for pipe in self.pipes:
            pipe.close()


def start_network(
    mode: str, peers: int, mib: int, seed: int, repeats: int, stages: bool, keep_buffers: bool = True
) -> Network:
    ctx = multiprocessing.get_context("spawn")  # no inherited zmq state, like real node processes
    timeout_s = _step_timeout_s(mib, peers)
    barrier = ctx.Barrier(peers)
    network = Network(mode, [], [], timeout_s)
    try:
        for i in range(peers):
            ours, theirs = ctx.Pipe()
            spec = WorkerSpec(
                i, peers, mib, seed, mode == "curve", stages, repeats + 1, timeout_s * 2, keep_buffers
            )
            process = ctx.Process(target=_worker, args=(spec, theirs, barrier), name=f"averaging-{mode}-{i}")
            process.start()
            theirs.close()
            network.processes.append(process)
            network.pipes.append(ours)
        addresses = {i: m[1] for i, m in enumerate(network.expect("address"))}
        network.send(("peers", addresses))
        network.expect("ready")
    except BaseException:
        network.close()
        raise
    return network


def run_hivemind(python: str, script: Path, peers: int, mib: int, repeats: int) -> dict[str, Any]:
    """The anchor: hivemind's DecentralizedAverager, run by ``python`` (a venv with hivemind)."""
    command = [python, str(script), str(peers), str(mib), str(repeats)]
    started = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120 + 30 * repeats * max(1, mib // 16), check=False
    )
    found = re.search(r"median_step_s=([0-9.]+) max_abs_err_vs_mean=([0-9.e+-]+)", done.stdout)
    steps = [float(s) for s in re.findall(r"step \d+: ([0-9.]+)s", done.stdout)]
    if done.returncode != 0 or found is None:
        raise RuntimeError(
            f"hivemind anchor failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        )
    return {
        "python": python,
        "script": str(script),
        "median_s": float(found.group(1)),
        "max_abs_error": float(found.group(2)),
        "s_runs": steps,
        "wall_s": time.perf_counter() - started,
    }


def _mean_stages(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage: the means over nodes and steps of each node's wall and CPU seconds; per thread group
    the same of CPU seconds, kernel seconds, seconds waiting for a CPU and minor page faults."""
    stage_sums: dict[str, float] = defaultdict(float)
    stage_cpu_sums: dict[str, float] = defaultdict(float)
    thread_sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    samples = 0
    for step in steps:
        for node_stages, node_threads in zip(step["stages"], step["cpu"], strict=True):
            samples += 1
            for name, (seconds, cpu_seconds) in node_stages.items():
                stage_sums[name] += seconds
                stage_cpu_sums[name] += cpu_seconds
            for group, values in node_threads.items():
                for k, value in enumerate(values):
                    thread_sums[group][k] += value
    keys = ("cpu_s", "kernel_s", "runqueue_wait_s", "minor_faults")
    return {
        "node_steps": samples,
        "stages_s": {k: stage_sums.get(k, 0.0) / samples for k in STAGE_LABELS},
        "stages_cpu_s": {k: stage_cpu_sums.get(k, 0.0) / samples for k in STAGE_LABELS},
        "threads": {
            g: {key: v / samples for key, v in zip(keys, values, strict=True)}
            for g, values in sorted(thread_sums.items())
        },
    }


def run(
    peers: int,
    mib: int,
    repeats: int,
    seed: int,
    stages: bool,
    hivemind: str | None,
    anchor: Path,
    keep_buffers: bool = True,
) -> dict[str, Any]:
    wall_started = time.perf_counter()
    load_before = os.getloadavg()
    mean = exact_mean(peers, mib, seed)
    bound = float32_bound(mean)
    del mean
    networks: dict[str, Network] = {}
    steps: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    warmups: dict[str, dict[str, Any]] = {}
    try:
        for mode in MODES:
            networks[mode] = start_network(mode, peers, mib, seed, repeats, stages, keep_buffers)
        for mode in MODES:  # connections and CURVE handshakes, first-touch of the buffers
            warmups[mode] = networks[mode].step(stages)
        for _ in range(repeats):
            for mode in MODES:
                steps[mode].append(networks[mode].step(stages))
    finally:
        for network in networks.values():
            network.close()
    load_after = os.getloadavg()

    results: dict[str, Any] = {}
    for mode in MODES:
        runs = steps[mode]
        times = [s["s"] for s in runs]
        error = max(s["max_abs_error"] for s in [*runs, warmups[mode]])
        complete = all(h == peers - 1 for s in runs for h in s["heard"]) and not any(
            s["timed_out"] for s in runs
        )
        results[mode] = {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "max_s": max(times),
            "s_runs": times,
            "warmup_s": warmups[mode]["s"],
            "max_abs_error": error,
            "exact": error <= bound and complete,
            "every_peer_heard_all": complete,
            "rejected": [s["rejected"] for s in runs][-1],
            "start_spread_s": statistics.median(s["start_spread_s"] for s in runs),
        }
        if stages:
            results[mode]["profile"] = _mean_stages(runs)
    curve = results["curve"]["median_s"]
    anchor_result = None if hivemind is None else run_hivemind(hivemind, anchor, peers, mib, repeats)
    return {
        "machine": {
            "python": sys.version.split()[0],
            "zmq": zmq.zmq_version(),
            "pyzmq": zmq.__version__,
            "curve": zmq.has("curve"),
            "cores": len(os.sched_getaffinity(0)),
            "load_before": load_before,
            "load_after": load_after,
        },
        "peers": peers,
        "topology": f"complete:{peers}",
        "mib": mib,
        "values_per_peer": mib * MIB // 4,
        "repeats": repeats,
        "seed": seed,
        "keep_buffers": keep_buffers,
        "float32_bound": bound,
        "curve": results["curve"],
        "plaintext": results["plaintext"],
        "curve_over_plaintext": curve / results["plaintext"]["median_s"],
        "target_s": TARGET_S,
        "ratio_to_target": curve / TARGET_S,
        "pass": curve <= TARGET_S,
        "exact": results["curve"]["exact"] and results["plaintext"]["exact"],
        "hivemind": anchor_result,
        "elapsed_s": time.perf_counter() - wall_started,
    }


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"p2pfm averaging benchmark  (python {m['python']}, libzmq {m['zmq']}, pyzmq {m['pyzmq']}, "
        f"{m['cores']} cores; load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} after)",
        f"{r['peers']} node processes on {r['topology']} over tcp://127.0.0.1, {r['mib']} MiB float32 each "
        f"({r['values_per_peer']:,} values, seed {r['seed']}); "
        f"one exact average (rule mean, W = 1/{r['peers']})",
        f"one step = every peer starts its exchange -> every peer holds the mix; "
        f"{r['repeats']} interleaved repeats after 1 warm-up",
        "allocator: "
        + (
            "large buffers kept (zmq_transport.keep_large_buffers)"
            if r["keep_buffers"]
            else "glibc defaults (--glibc-default)"
        ),
        "",
        f"    {'':22}{'median':>9}{'min':>9}{'max':>9}   runs (s)",
    ]
    for mode in MODES:
        x = r[mode]
        runs = " ".join(f"{s:.3f}" for s in x["s_runs"])
        lines.append(
            f"    {MODE_LABELS[mode]:22}{x['median_s']:8.3f}s{x['min_s']:8.3f}s{x['max_s']:8.3f}s   {runs}"
        )
    lines.append(f"    CurveZMQ / plaintext = {r['curve_over_plaintext']:.2f}")
    h = r["hivemind"]
    if h is not None:
        runs = " ".join(f"{s:.3f}" for s in h["s_runs"])
        lines.append(f"    {'hivemind (anchor)':22}{h['median_s']:8.3f}s{'':18}   {runs}")
        lines.append(f"    p2pfm CurveZMQ / hivemind = {r['curve']['median_s'] / h['median_s']:.2f}")
    lines.append("")
    exact = "exact" if r["exact"] else "NOT EXACT"
    errors = ", ".join(f"{MODE_LABELS[mode]} {r[mode]['max_abs_error']:.2e}" for mode in MODES)
    lines.append(f"exactness: max abs error vs the float64 mean: {errors}")
    heard = all(r[mode]["every_peer_heard_all"] for mode in MODES)
    lines.append(
        f"           (bound: one float32 ulp of the largest mean value, {r['float32_bound']:.2e}; "
        f"every peer heard every other: {heard}) -> {exact}"
    )
    if h is not None:
        lines.append(f"           hivemind: {h['max_abs_error']:.2e}")
    verdict = "PASS" if r["pass"] else "FAIL"
    lines.append(
        f"target: CurveZMQ median {r['curve']['median_s']:.3f} s / {r['target_s']:.2f} s = "
        f"{r['ratio_to_target']:.2f} (target <= 1.00) -> {verdict}"
    )
    for mode in MODES:
        profile = r[mode].get("profile")
        if profile is None:
            continue
        lines += [
            "",
            f"stages, {MODE_LABELS[mode]}: per node and step (mean of {profile['node_steps']}), "
            "CPU of the calling thread and wall",
        ]
        for name, label in STAGE_LABELS.items():
            cpu, wall = profile["stages_cpu_s"][name], profile["stages_s"][name]
            lines.append(f"    {cpu:7.3f} s CPU {wall:7.3f} s wall  {label}")
        lines.append("  per node and step, by thread: CPU (of which kernel), waiting for a core, page faults")
        for group, t in profile["threads"].items():
            lines.append(
                f"    {t['cpu_s']:7.3f} s CPU ({t['kernel_s']:.3f} s kernel), "
                f"waited {t['runqueue_wait_s']:.3f} s, {t['minor_faults']:8.0f} minor faults  {group}"
            )
        total = r["peers"] * sum(t["cpu_s"] for t in profile["threads"].values())
        lines.append(
            f"  all {r['peers']} nodes: {total:.2f} CPU-seconds per step = {total / m['cores']:.2f} s on "
            f"{m['cores']} cores with nothing else running (measured median {r[mode]['median_s']:.2f} s)"
        )
    lines += ["", f"elapsed {r['elapsed_s']:.1f} s"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--peers", type=int, default=4, help="node processes on complete:N (default 4)")
    parser.add_argument("--mib", type=int, default=64, help="float32 state per peer in MiB (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per mode (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", action="store_true", help="time each stage inside every node")
    parser.add_argument("--hivemind-python", help="an interpreter with hivemind: run the anchor beside ours")
    parser.add_argument("--hivemind-script", type=Path, default=ANCHOR, help=f"the anchor (default {ANCHOR})")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="nodes leave glibc's malloc settings alone (no zmq_transport.keep_large_buffers): the before",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if not 2 <= args.peers <= 16:
        parser.error("--peers must be in 2..16")
    if not 1 <= args.mib <= 256:
        parser.error("--mib must be in 1..256")
    if not 1 <= args.repeats <= 100:
        parser.error("--repeats must be in 1..100")
    result = run(
        args.peers,
        args.mib,
        args.repeats,
        args.seed,
        args.stages,
        args.hivemind_python,
        args.hivemind_script,
        keep_buffers=not args.glibc_default,
    )
    print(json.dumps(result, indent=2) if args.json else report(result))
    return 0 if result["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
