"""Attack a live p2pfm network's transport from outside (no key) and watch the target node.

Why: a node's listen address is public. Everything an outsider can send
(greetings, frame headers, CurveZMQ handshake commands, bare connections)
reaches libzmq before any authentication, so it must cost the node neither
memory nor descriptors nor rounds. This starts a small live network (a tiny
random BERT, many short rounds), runs a campaign of the raw-socket attacks of
``fuzz/zmtp.py`` against one node's listen address (plus a hostile
"neighbour" answering its PUSH socket, and one roster insider's multipart
bomb), and records before/after each attack the target's RSS, open
descriptors and latest round (and the peaks, sampled every 20 ms during it);
at the end, whether every node finished all its rounds (``done`` event with
``stopped`` false and ``rounds_trained == gossip.rounds``) and exited 0.
Crash = a node process died or exited non-zero. The exit status is 0 only if
every node finished cleanly.

Topology: complete:3 on 127.0.0.1, node0 (the target, started under a soft
RLIMIT_NOFILE of 1024) and node1 running, node2 "down": its port is held by
a listening socket of ours (the hostile neighbour answers there) and its
roster key is the insider's.

Usage::

    python fuzz/fuzz_transport.py [--seconds 60] [--seed 0] [--out report.json] [--rounds N] [--workdir DIR]

Every process it starts is stopped by pid before it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

_HERE = Path(__file__).resolve().parent
_ROOT = _HERE.parent
for _path in (str(_HERE), str(_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import zmtp  # noqa: E402  (fuzz/ is not a package)

from p2pfm.config.toml import read_toml  # noqa: E402
from p2pfm.core.identity import load_key_file  # noqa: E402
from p2pfm.lab.scenario import load_scenario, stop_processes, write_node_configs  # noqa: E402
from p2pfm.node.metrics import read_metrics  # noqa: E402

MiB = 2**20


# ------------------------------------------------------------ the network


@dataclass
class NodeProc:
    name: str
    config: Path
    folder: Path
    listen: tuple[str, int]
    key: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def metrics_path(self) -> Path:
        return self.folder / "metrics.jsonl"

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    def records(self) -> list[dict[str, Any]]:
        return list(read_metrics(self.metrics_path))

    def rounds(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == "round"]

    def latest_round(self) -> int:
        """The newest completed round (-1: none yet); reads only the file's tail."""
        for record in reversed(self._tail()):
            if record.get("event") in ("round", "done"):
                return int(record.get("round", record.get("rounds_completed", -1)))
        return max((int(r["round"]) for r in self.rounds()), default=-1)

    def _tail(self, nbytes: int = 32 * 1024) -> list[dict[str, Any]]:
        try:
            with self.metrics_path.open("rb") as handle:
                size = handle.seek(0, os.SEEK_END)
                handle.seek(max(0, size - nbytes))
                lines = handle.read().splitlines()[1 if size > nbytes else 0 :]
        except OSError:
            return []
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def last_counters(self) -> dict[str, Any]:
        """The transport/protocol counters of the newest round (or done) event."""
        for record in reversed(self._tail() or self.records()):
            if record.get("event") in ("round", "done") and "connections_accepted" in record:
                return dict(record)
        return {}

    def event(self, kind: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r.get("event") == kind), None)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class LiveNetwork:
    """Node configs from a scenario (complete topology on 127.0.0.1); some nodes started, others "down".

    Nodes not in ``start`` are never started: their listen port stays bound
    by a listening socket of ours (``listeners[name]``), so their neighbours'
    PUSH sockets dial us there (an :class:`zmtp.OversizedFrameServer` can
    answer them), and their keys are real roster members nobody else uses.
    ``nofile_soft`` starts the node named ``limit_node`` under that soft
    RLIMIT_NOFILE (the node is expected to raise it itself).
    """

    def __init__(
        self,
        workdir: Path,
        model_dir: Path,
        *,
        nodes: int = 3,
        start: tuple[int, ...] = (0, 1),
        rounds: int = 40,
        local_steps: int = 4,
        round_timeout_s: float = 3.0,
        examples: int = 240,
        nofile_soft: int | None = None,
        limit_node: int = 0,
        node_rounds: dict[int, int] | None = None,
    ) -> None:
        self.workdir = workdir
        self.model_dir = model_dir
        self.n, self.start_ids = nodes, start
        self.rounds, self.local_steps, self.round_timeout_s = rounds, local_steps, round_timeout_s
        self.examples = examples
        self.nofile_soft, self.limit_node = nofile_soft, limit_node
        self.node_rounds = dict(node_rounds or {})  # per-node gossip.rounds overrides
        self.nodes: list[NodeProc] = []
        self.listeners: dict[str, socket.socket] = {}
        self.started_at = 0.0

    def _scenario(self) -> Path:
        from tests.conftest import tiny_classifier_toml, topic_examples, write_jsonl  # noqa: PLC0415

        data = write_jsonl(self.workdir / "data.jsonl", topic_examples(self.examples, seed=5))
        path = self.workdir / "scenario.toml"
        path.write_text(
            f"""
name = "outsider"
topology = "complete:{self.n}"
{tiny_classifier_toml(self.model_dir, data)}

[train]
batch_size = 8
max_length = 16
threads = 1
local_steps = {self.local_steps}

[gossip]
rounds = {self.rounds}
round_timeout_s = {self.round_timeout_s}
snapshot_every = 0
"""
        )
        return path

    def start(self) -> LiveNetwork:
        scenario = load_scenario(self._scenario())
        out = self.workdir / "run"
        procs = write_node_configs(scenario, out)
        for i, proc in enumerate(procs):
            doc = read_toml(proc.config, "config")
            if i in self.node_rounds:
                doc["gossip"]["rounds"] = self.node_rounds[i]
                proc.config.write_text(tomli_w.dumps(doc))
            host, port = doc["node"]["listen"].removeprefix("tcp://").rsplit(":", 1)
            self.nodes.append(
                NodeProc(
                    proc.name, proc.config, proc.config.parent, (host, int(port)), Path(doc["node"]["key"])
                )
            )
        for i, node in enumerate(self.nodes):
            if i not in self.start_ids:
                listener = socket.socket()
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(node.listen)
                listener.listen(128)
                self.listeners[node.name] = listener
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.started_at = time.monotonic()
        for i in self.start_ids:
            node = self.nodes[i]
            args = [sys.executable, "-m", "p2pfm", "node", "--config", str(node.config)]
            preexec = None
            if self.nofile_soft is not None and i == self.limit_node:
                preexec = _soft_nofile(self.nofile_soft)
            with (node.folder / "log.txt").open("ab") as log:
                node.popen = subprocess.Popen(
                    args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=_ROOT,
                    preexec_fn=preexec,  # noqa: PLW1509  (setrlimit only: async-signal-safe enough)
                )
        return self

    def node(self, index: int) -> NodeProc:
        return self.nodes[index]

    @property
    def running(self) -> list[NodeProc]:
        return [self.nodes[i] for i in self.start_ids]

    def wait_round(self, index: int, round_: int, timeout_s: float) -> bool:
        """Wait until node ``index`` completed ``round_`` (True), or died / timed out (False)."""
        node = self.nodes[index]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node.latest_round() >= round_:
                return True
            if not node.alive():
                return node.latest_round() >= round_
            time.sleep(0.1)
        return False

    def wait_exit(self, timeout_s: float, only: tuple[int, ...] | None = None) -> dict[str, int | None]:
        """Wait for the started nodes (or those in ``only``) to exit by themselves; codes (None: alive)."""
        deadline = time.monotonic() + timeout_s
        nodes = self.running if only is None else [self.nodes[i] for i in only]
        for node in nodes:
            assert node.popen is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        return {node.name: (node.popen.poll() if node.popen else None) for node in nodes}

    def rounds_of(self, node: NodeProc) -> int:
        return self.node_rounds.get(self.nodes.index(node), self.rounds)

    def finished(self, node: NodeProc) -> dict[str, Any]:
        """Did ``node`` finish every round and exit 0? (from its ``done`` event and exit code)."""
        done = node.event("done")
        code = node.popen.poll() if node.popen else None
        ok = (
            done is not None
            and done.get("stopped") is False
            and done.get("rounds_trained") == self.rounds_of(node)
            and code == 0
        )
        return {
            "name": node.name,
            "exit_code": code,
            "done": done is not None,
            "stopped": None if done is None else done.get("stopped"),
            "rounds_trained": None if done is None else done.get("rounds_trained"),
            "io_errors": None if done is None else done.get("io_errors"),
            "ok": ok,
        }

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, every node still running (by pid); close our listeners."""
        stop_processes([n.popen for n in self.running if n.popen is not None])
        for listener in self.listeners.values():
            listener.close()
        self.listeners.clear()

    def __enter__(self) -> LiveNetwork:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _soft_nofile(soft: int) -> Callable[[], None]:
    """A preexec_fn: start the child under a soft RLIMIT_NOFILE of ``soft`` (hard limit unchanged)."""

    def preexec() -> None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return preexec


def raise_own_open_files(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to at least ``want`` (up to the hard limit); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# --------------------------------------------------------- measurements


def probe(node: NodeProc) -> dict[str, Any]:
    """The node's RSS (MiB), open descriptors and latest round; None fields if it is gone."""
    try:
        rss, fds = round(zmtp.rss_mib(node.pid), 1), zmtp.fd_count(node.pid)
    except (OSError, LookupError):
        rss, fds = None, None
    return {"rss_mib": rss, "fds": fds, "round": node.latest_round(), "alive": node.alive()}


def settled_rss(node: NodeProc, samples: int = 5, interval_s: float = 0.2) -> float:
    """The median of a few RSS samples (MiB)."""
    values = []
    for _ in range(samples):
        values.append(zmtp.rss_mib(node.pid))
        time.sleep(interval_s)
    return sorted(values)[len(values) // 2]


@contextlib.contextmanager
def watching(node: NodeProc) -> Iterator[zmtp.Sampler]:
    with zmtp.Sampler(node.pid) as sampler:
        yield sampler


def insider_bomb(
    network: LiveNetwork,
    sender: int,
    target: int,
    *,
    frames: int,
    frame_bytes: int,
    seconds: float = 8.0,
) -> zmtp.AttackResult:
    """A roster member (``sender``'s key, over a real CurveZMQ link) sends one multipart of ``frames`` frames.

    Returns when the message is out (or the link dropped and ``seconds`` passed);
    notes say whether the node dropped the connection (socket monitor).
    """
    import zmq  # noqa: PLC0415
    from zmq.utils import z85  # noqa: PLC0415
    from zmq.utils.monitor import recv_monitor_message  # noqa: PLC0415

    from p2pfm.core.identity import curve_public_key  # noqa: PLC0415

    me = load_key_file(network.node(sender).key)
    server = load_key_file(network.node(target).key).peer_id
    host, port = network.node(target).listen
    result = zmtp.AttackResult("insider_multipart", notes={"frames": frames, "frame_bytes": frame_bytes})
    started = time.monotonic()
    context = zmq.Context()
    try:
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.setsockopt(zmq.RECONNECT_IVL, 10_000)  # one connection: no second try within the attack
        public, secret = me.curve_keypair()
        sock.curve_serverkey = z85.encode(curve_public_key(server))
        sock.curve_publickey, sock.curve_secretkey = z85.encode(public), z85.encode(secret)
        monitor = sock.get_monitor_socket()
        sock.connect(f"tcp://{host}:{port}")
        events: list[str] = []
        handshake = _wait_event(monitor, events, zmq.EVENT_HANDSHAKE_SUCCEEDED, 5.0, recv_monitor_message)
        result.connections = 1
        result.notes["handshake"] = handshake
        payload = memoryview(bytes(frame_bytes))
        sent_all = True
        for i in range(frames):
            try:
                sock.send(payload, flags=zmq.SNDMORE if i < frames - 1 else 0, copy=False)
            except zmq.ZMQError:
                sent_all = False
                break
        result.bytes_sent = frames * frame_bytes if sent_all else 0
        dropped = _wait_event(monitor, events, zmq.EVENT_DISCONNECTED, seconds, recv_monitor_message)
        result.closed_by_peer = int(dropped)
        result.notes["events"] = events
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
    finally:
        context.destroy(linger=0)
    result.seconds = time.monotonic() - started
    return result


def _wait_event(monitor: Any, seen: list[str], want: int, timeout_s: float, recv: Callable[..., Any]) -> bool:
    import zmq  # noqa: PLC0415

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if monitor.poll(50):
            event = recv(monitor)
            seen.append(_EVENT_NAMES.get(event["event"], str(event["event"])))
            if event["event"] == want:
                return True
            if want == zmq.EVENT_HANDSHAKE_SUCCEEDED and event["event"] in _FAILED:
                return False
    return False


def _event_names() -> tuple[dict[int, str], set[int]]:
    import zmq  # noqa: PLC0415

    names = {
        int(getattr(zmq, n)): n.removeprefix("EVENT_").lower() for n in dir(zmq) if n.startswith("EVENT_")
    }
    failed = {
        int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL),
        int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL),
        int(zmq.EVENT_HANDSHAKE_FAILED_AUTH),
    }
    return names, failed


_EVENT_NAMES, _FAILED = _event_names()


# ------------------------------------------------------------- campaign


@dataclass
class Step:
    attack: str
    before: dict[str, Any]
    after: dict[str, Any]
    peak_rss_mib: float
    peak_fds: int
    result: dict[str, Any]
    counters_before: dict[str, Any] = field(default_factory=dict)
    counters_after: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "before": self.before,
            "after": self.after,
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "peak_fds": self.peak_fds,
            "result": self.result,
            "connections_accepted": [
                self.counters_before.get("connections_accepted"),
                self.counters_after.get("connections_accepted"),
            ],
            "handshake_failures_after": self.counters_after.get("handshake_failures"),
            "rejected_after": self.counters_after.get("rejected"),
        }


CURVE_MESSAGE_OVERHEAD = 33  # a CurveZMQ MESSAGE command around a frame: name, nonce, flags, tag


def _hostile_neighbour(network: LiveNetwork, target: int, listener: socket.socket) -> zmtp.AttackResult:
    """The target's PUSH socket dials a down neighbour's address: answer it with a 700 MiB frame.

    Afterwards, listen 6 s more for the target dialling that address again
    (``target_redialled``): libzmq gives up on an outbound link after a
    protocol error, so the real neighbour would never be reached again.
    """
    pid = network.node(target).pid
    server = zmtp.OversizedFrameServer(
        listener,
        announce=700 * MiB,
        stream=700 * MiB,
        max_connections=12,
        max_bytes=1536 * MiB,
        watch_pid=pid,
    )
    server.serve(seconds=8.0)
    deadline = time.monotonic() + 8.0
    while time.monotonic() < deadline and not server.from_watched:
        time.sleep(0.1)
    time.sleep(0.5)
    result = server.stop()
    result.notes["target_redialled"] = _redials(listener, pid, seconds=6.0)
    return result


def _redials(listener: socket.socket, pid: int, seconds: float) -> bool:
    """Does process ``pid`` open a new connection to ``listener`` within ``seconds``? (closed at once)"""
    deadline = time.monotonic() + seconds
    listener.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            sock, peer = listener.accept()
        except TimeoutError:
            continue
        try:
            if peer[1] in zmtp.local_ports_of(pid):
                return True
        finally:
            sock.close()
    return False


def _attacks(
    network: LiveNetwork, target: int, rng: random.Random, first_pass: bool
) -> list[tuple[str, Callable[[], zmtp.AttackResult]]]:
    address = network.node(target).listen
    absent = next(i for i in range(network.n) if i not in network.start_ids)
    listener = network.listeners[network.node(absent).name]
    max_bytes = int((network.node(target).event("start") or {}).get("max_message_bytes", MiB))
    held = min(1000, raise_own_open_files(4096) - 128)

    def partial_x3() -> zmtp.AttackResult:
        one = lambda: zmtp.partial_frame(address, announce=300 * MiB, stream=300 * MiB)  # noqa: E731
        return zmtp.parallel([one, one, one], "partial_frame_300MiB_x3")

    attacks: list[tuple[str, Callable[[], zmtp.AttackResult]]] = [
        ("bad_greetings", lambda: zmtp.bad_greetings(address, rng, count=26, wait_s=0.5)),
        ("handshake_garbage", lambda: zmtp.handshake_garbage(address, rng, count=22, wait_s=0.5)),
        ("partial_frame_300MiB_x3", partial_x3),
        (
            "partial_command_2GiB",
            lambda: zmtp.partial_frame(address, announce=2 * 2**30, stream=256 * MiB, command_frame=True),
        ),
        (
            "partial_frame_NULL_mech",
            lambda: zmtp.partial_frame(address, announce=300 * MiB, stream=128 * MiB, mechanism=b"NULL"),
        ),
        (
            "multipart_bomb_outsider",
            lambda: zmtp.multipart_bomb(address, frames=64, frame_bytes=4 * MiB, max_bytes=256 * MiB),
        ),
        (
            "small_frames_outsider",
            lambda: zmtp.multipart_bomb(address, frames=2000, frame_bytes=200, max_bytes=4 * MiB),
        ),
        ("connection_flood", lambda: zmtp.connection_flood(address, count=1500, seconds=4.0)),
        (
            "connection_flood_greeting",
            lambda: zmtp.connection_flood(address, count=800, seconds=3.0, rst=False, send_greeting=True),
        ),
        (f"bare_connects_{held}", lambda: zmtp.bare_connects(address, held, hold_s=6.0)),
        (
            "insider_multipart_max",
            lambda: insider_bomb(
                network,
                absent,
                target,
                frames=12,
                frame_bytes=max_bytes - CURVE_MESSAGE_OVERHEAD,
                seconds=1.5,
            ),
        ),
        (
            "insider_multipart_64MiB",
            lambda: insider_bomb(network, absent, target, frames=12, frame_bytes=64 * MiB),
        ),
    ]
    if first_pass:  # after it the target never dials that address again (see _hostile_neighbour)
        attacks.append(("hostile_neighbour_700MiB", lambda: _hostile_neighbour(network, target, listener)))
    return attacks


def campaign(network: LiveNetwork, target: int, *, seconds: float, seed: int, margin: int = 15) -> list[Step]:
    """Each attack once, in order, then again with fresh randomness, while ``seconds`` last.

    Stops early when the target is within ``margin`` rounds of its last one
    (an attack on a node that has finished shows nothing).
    """
    rng = random.Random(seed)
    node = network.node(target)
    steps: list[Step] = []
    deadline = time.monotonic() + seconds
    last = network.rounds_of(node) - margin
    for pass_ in range(4):
        for name, attack in _attacks(network, target, rng, first_pass=pass_ == 0):
            if time.monotonic() >= deadline or not node.alive() or node.latest_round() >= last:
                return steps
            before, counters_before = probe(node), node.last_counters()
            with watching(node) as sampler:
                result = attack()
                time.sleep(0.3)
            after, counters_after = probe(node), node.last_counters()
            steps.append(
                Step(name, before, after, sampler.peak_rss_mib, sampler.peak_fds, result.as_dict(),
                     counters_before, counters_after)
            )  # fmt: skip
            print(_row(steps[-1]), flush=True)
    return steps


_HEADER = (
    f"{'attack':<28} {'conns':>6} {'sent MiB':>9} {'closed':>6} {'RSS MiB before/peak/after':>27} "
    f"{'fds b/peak/a':>16} {'round b/a':>10}"
)


def _row(step: Step) -> str:
    r = step.result
    rss = f"{step.before['rss_mib']}/{step.peak_rss_mib:.1f}/{step.after['rss_mib']}"
    fds = f"{step.before['fds']}/{step.peak_fds}/{step.after['fds']}"
    rounds = f"{step.before['round']}/{step.after['round']}"
    return (
        f"{step.attack:<28} {r['connections']:>6} {r['bytes_sent'] / MiB:>9.1f} {r['closed_by_peer']:>6} "
        f"{rss:>27} {fds:>16} {rounds:>10}"
    )


def run(
    *, seconds: float, seed: int, rounds: int | None = None, workdir: Path | None = None, target: int = 0
) -> dict[str, Any]:
    """Start the network, run the campaign, wait for the end; the report as a dict."""
    from tests.conftest import make_tiny_bert  # noqa: PLC0415  (imports torch)

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-transport-")))
        model = make_tiny_bert(workdir / "tiny-bert")
        # Rounds: enough to outlast the campaign at ~0.1 s a round (rounds are faster on an idle
        # machine; the campaign stops 15 rounds before the end if it must).
        rounds = rounds or int(seconds / 0.1) + 40
        network = LiveNetwork(
            workdir,
            model,
            rounds=rounds,
            local_steps=8,
            round_timeout_s=2.0,
            nofile_soft=1024,
            limit_node=target,
        )
        started = time.monotonic()
        report: dict[str, Any] = {
            "seed": seed,
            "seconds": seconds,
            "rounds": rounds,
            "target": f"node{target}",
        }
        try:
            network.start()
            node = network.node(target)
            if not network.wait_round(target, 2, timeout_s=120):
                raise RuntimeError(f"{node.name} did not reach round 2: see {node.folder / 'log.txt'}")
            start = node.event("start") or {}
            report["max_message_bytes"] = start.get("max_message_bytes")
            report["open_files_limit"] = start.get("open_files_limit")
            report["baseline_rss_mib"] = round(settled_rss(node), 1)
            print(_HEADER, flush=True)
            began = time.monotonic()
            steps = campaign(network, target, seconds=seconds, seed=seed)
            report["campaign_s"] = round(time.monotonic() - began, 1)
            report["steps"] = [s.as_dict() for s in steps]
            left = (rounds - node.latest_round()) * 1.0 + 60
            codes = network.wait_exit(timeout_s=left)
            report["exit_codes"] = codes
            report["nodes"] = [network.finished(n) for n in network.running]
        finally:
            network.stop()
            report["wall_s"] = round(time.monotonic() - started, 1)
    steps_done = report.get("steps", [])
    base = report.get("baseline_rss_mib") or 0.0
    report["worst_rss_growth_mib"] = round(
        max((st["peak_rss_mib"] - base for st in steps_done), default=0.0), 1
    )
    report["peak_fds"] = max((st["peak_fds"] for st in steps_done), default=0)
    report["crashes"] = sum(1 for n in report.get("nodes", []) if n["exit_code"] not in (0, None))
    report["ok"] = bool(report.get("nodes")) and all(n["ok"] for n in report["nodes"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="campaign length (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="randomness of the attacks")
    parser.add_argument("--rounds", type=int, help="gossip rounds (default: enough to outlast the campaign)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("--workdir", type=Path, help="keep the network's files here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    report = run(seconds=args.seconds, seed=args.seed, rounds=args.rounds, workdir=args.workdir)
    print(
        f"\nbaseline RSS {report['baseline_rss_mib']} MiB, worst peak +{report['worst_rss_growth_mib']} MiB, "
        f"peak fds {report['peak_fds']}; max_message_bytes {report['max_message_bytes']}, "
        f"open_files_limit {report['open_files_limit']}; campaign {report.get('campaign_s')} s"
    )
    for step in report.get("steps", []):
        if "target_redialled" in step["result"]:
            redialled = step["result"]["target_redialled"]
            print(f"after {step['attack']}: the target dialled that address again: {redialled}")
    for node in report.get("nodes", []):
        print(
            f"{node['name']}: exit {node['exit_code']} done={node['done']} stopped={node['stopped']} "
            f"rounds_trained={node['rounds_trained']}/{report['rounds']} io_errors={node['io_errors']}"
        )
    print(f"crashes: {report['crashes']}  ok: {report['ok']}  wall {report['wall_s']} s")
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
