"""The simulator: real node loops on a topology, in-process, on virtual time.

Every vertex runs a real ``Node`` (p2pfm/node/loop.py) built by the same
``assemble_node`` as a networked one: wire encoding, Ed25519 signing and
verification, the protocol's gates and deadlines, the configured mixing
rule, the publishing strategy (honest, or an attack) and the fault wrappers
(lossy links, slow learners). Only two things are replaced: the transport is
in memory (p2pfm/net/memory.py) and time is virtual (p2pfm/lab/virtual.py).
So the simulator measures the code the network runs, under the same faults.

The learner is model-free (``QuadraticLearner``). With ``local_steps = 0``
(the default) nodes only gossip: they start from i.i.d. standard normal
vectors and their disagreement must shrink like lambda2^(2t). With local
steps, node i descends ``||x - c_i||^2 / 2`` and ``distance`` measures how
far it ends from the network's optimum (the mean of the c_i).

A caller's own learner (``learner``: node index -> a ``Learner``) replaces
the quadratic one: each node then trains it, ``step_s`` virtual seconds a
local step, and ``distance`` (which needs a known optimum) is NaN; its own
``evaluate`` is in ``SimResult.evaluations``.

Large runs are spread over worker processes (``workers``; by default one per
core for big networks), each running the nodes of one part of the graph.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import blake3
import numpy as np

from p2pfm.config.node_config import FaultSettings, GossipSettings, Peer
from p2pfm.core.compression import COMPRESSIONS, CompressionName
from p2pfm.core.consensus import MIX_RULES, MixRule
from p2pfm.core.errors import ArgumentError, LocalProtocolError
from p2pfm.core.identity import Identity
from p2pfm.core.schedule import PeerSchedule
from p2pfm.core.topology import Topology, parse_topology, spectral_stats
from p2pfm.lab.scenario import Faults, check_faults
from p2pfm.lab.sim_workers import run_parts
from p2pfm.lab.virtual import NodeOutcome, RoundTally, VirtualScheduler
from p2pfm.learn.learner import Array, Learner, LearnerWrapper, QuadraticLearner
from p2pfm.net.memory import Forward, MemoryNetwork
from p2pfm.node.attacks import ATTACKS
from p2pfm.node.clock import VirtualClock
from p2pfm.node.factory import assemble_node
from p2pfm.node.loop import Node, RoundPlan
from p2pfm.node.store import MemoryStore

SIM_NETWORK = "p2pfm-sim"
LearnerFactory = Callable[[int], Learner]  # node index -> that node's learner (a fresh one per call)
_BIG_NETWORK = 2_000_000  # nodes x dim from which a run is spread over worker processes


@dataclass(frozen=True)
class SimConfig:
    topology: str
    rounds: int
    dim: int = 1000
    seed: int = 0
    drop_prob: float = 0.0  # loss probability of every message (on top of the faults' drops)
    dtype: Literal["float32", "float64"] = "float32"  # the learners' (and the wire's) dtype
    rule: MixRule = "mean"  # gossip.rule: the same combination a node runs (docs/robust.md)
    trim: int = 1
    byzantine_weight: float = 0.25
    local_steps: int = 0  # 0: pure gossip averaging
    lr: float = 0.1  # local step size (local_steps > 0)
    noise: float = 0.0  # gradient noise (local_steps > 0)
    spread: float = 1.0  # how far apart the nodes' optima are (local_steps > 0)
    faults: Faults = field(default_factory=Faults)  # scenario faults: attack, crash, slow, drop
    round_timeout_s: float = 30.0  # virtual seconds
    deadline: Literal["adaptive", "fixed"] = "adaptive"  # gossip.deadline (core/deadline.py)
    step_s: float = 0.5  # virtual seconds per local step
    latency_s: float = 0.25  # virtual one-way latency of every link (receivers rate-limit: 10 messages/s)
    max_rounds_ahead: int = 3
    workers: int | None = None  # processes; None: one per core for big networks, else 1
    keep_states: bool = False  # keep every node's first and last state in the result
    overlap: bool = False  # gossip.overlap: exchange beside the next round's local steps
    compression: CompressionName = "none"  # gossip.compression (p2pfm/core/compression.py)
    compression_step: float = 1.0  # gossip.compression_step
    keyframe_every: int = 50  # gossip.keyframe_every

    def __post_init__(self) -> None:
        """Every range checked here, once (``p2pfm.simulate`` checks the types); errors name the field."""
        checks = (
            ("rounds", self.rounds >= 0, f"must be >= 0, got {self.rounds}"),
            ("dim", self.dim >= 1, f"must be >= 1, got {self.dim}"),
            ("drop_prob", 0.0 <= self.drop_prob <= 1.0, f"must be in [0, 1], got {self.drop_prob}"),
            (
                "dtype",
                self.dtype in ("float32", "float64"),
                f"must be float32 or float64, got {self.dtype!r}",
            ),
            ("local_steps", self.local_steps >= 0, f"must be >= 0, got {self.local_steps}"),
            ("round_timeout_s", self.round_timeout_s > 0, f"must be > 0 s, got {self.round_timeout_s}"),
            ("step_s", self.step_s >= 0, f"must be >= 0 s, got {self.step_s}"),
            ("latency_s", self.latency_s > 0, f"must be > 0 s, got {self.latency_s}"),
            ("max_rounds_ahead", self.max_rounds_ahead >= 1, f"must be >= 1, got {self.max_rounds_ahead}"),
            ("workers", self.workers is None or self.workers >= 1, f"must be >= 1, got {self.workers}"),
            ("compression", self.compression in COMPRESSIONS, f"unknown compression {self.compression!r}"),
            (
                "compression",
                self.compression == "none" or self.dtype == "float32",
                f"{self.compression!r} needs dtype float32, got {self.dtype}",
            ),
            (
                "compression_step",
                0 < self.compression_step <= 1,
                f"must be in (0, 1], got {self.compression_step}",
            ),
            ("keyframe_every", self.keyframe_every >= 1, f"must be >= 1, got {self.keyframe_every}"),
            ("rule", self.rule in MIX_RULES, f"{self.rule!r} is not one of {', '.join(MIX_RULES)}"),
            (
                "deadline",
                self.deadline in ("adaptive", "fixed"),
                f"{self.deadline!r} is not adaptive or fixed",
            ),
            ("lr", 0 < self.lr <= 1, f"must be in (0, 1], got {self.lr}"),
            ("noise", self.noise >= 0, f"must be >= 0, got {self.noise}"),
            ("spread", self.spread >= 0, f"must be >= 0, got {self.spread}"),
            ("trim", self.trim >= 0, f"must be >= 0, got {self.trim}"),
            (
                "byzantine_weight",
                0 <= self.byzantine_weight < 1,
                f"must be in [0, 1), got {self.byzantine_weight}",
            ),
        )
        for name, ok, problem in checks:
            if not ok:
                raise ArgumentError(name, problem)
        for attack in self.faults.attack:
            if attack.kind not in ATTACKS:
                raise ArgumentError("faults", f"unknown attack {attack.kind!r}; valid: {', '.join(ATTACKS)}")


@dataclass(frozen=True)
class RoundStats:
    round: int
    consensus_distance: float
    messages: int  # messages sent this round (lost ones included)
    bytes: int  # wire bytes of the messages that went on a link
    delivered: int  # neighbours' updates that arrived in time and were mixed
    nodes: int = 0  # nodes whose state this round's distance measures (crashed ones are missing)


@dataclass(frozen=True)
class SimNode:
    name: str
    rounds_completed: int
    rounds_trained: int
    distance: float  # ||x - optimum|| / ||optimum|| after the last round
    rejected: dict[str, int]
    banned: list[str]
    attack: str  # "" when honest
    crashes: int


@dataclass(frozen=True)
class SimResult:
    topology: str
    nodes: int
    lambda2: float
    rounds: tuple[RoundStats, ...]
    rejected: int  # messages the protocol refused (0 unless something is wrong, or under attack)
    node_results: tuple[SimNode, ...] = ()
    initial_states: tuple[dict[str, Any], ...] = field(repr=False, default=())
    final_states: tuple[dict[str, Any], ...] = field(repr=False, default=())
    workers: int = 1
    virtual_time_s: float = 0.0  # when the last node finished, in virtual seconds
    evaluations: tuple[dict[str, float], ...] = field(repr=False, default=())  # per node: its last evaluate()
    train_losses: tuple[float | None, ...] = field(repr=False, default=())  # per round: mean loss of trainers

    def as_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "nodes": self.nodes,
            "lambda2": self.lambda2,
            "rounds": [asdict(r) for r in self.rounds],
            "rejected": self.rejected,
            "node_results": [asdict(n) for n in self.node_results],
            "workers": self.workers,
            "virtual_time_s": self.virtual_time_s,
        }


def sim_identity(seed: int, node: int) -> Identity:
    """Deterministic keys for simulated node ``node`` (never for real networks)."""
    return Identity(blake3.blake3(f"p2pfm-sim-key/{seed}/{node}".encode()).digest())


def node_name(index: int) -> str:
    return f"node{index}"


def simulate(
    config: SimConfig, *, learner: LearnerFactory | None = None, topology: Topology | None = None
) -> SimResult:
    """Run ``config.rounds`` rounds of real node loops; return per-round and per-node statistics.

    ``learner`` builds node i's learner (default: the quadratic one of the
    module docstring); ``topology`` is the graph to run (default: parsed
    from ``config.topology``).
    """
    topology = parse_topology(config.topology) if topology is None else topology
    n = topology.n_nodes
    for fault in (*config.faults.attack, *config.faults.crash, *config.faults.slow):
        if not 0 <= fault.node < n:
            raise LocalProtocolError(f"fault names node {fault.node}; the topology has nodes 0..{n - 1}")
    check_faults(config.faults, topology)  # the bounds a scenario file's faults get (ConfigError)
    workers = _workers(config, n) if learner is None or config.workers is not None else 1
    if workers == 1:
        scheduler = build_part(config, topology, list(range(n)), learner=learner)
        scheduler.run_until()
        outcomes, tallies = scheduler.outcomes(), scheduler.tallies
    else:
        peers = {sim_identity(config.seed, i).peer_id: i for i in range(n)}
        outcomes, tallies = run_parts(
            functools.partial(build_part, config, topology, learner=learner), partition(n, workers), peers,
            latency_s=config.latency_s,
        )  # fmt: skip
    return _result(config, topology, outcomes, tallies, workers)


def partition(n: int, parts: int) -> list[list[int]]:
    """Contiguous blocks of node indices, as even as possible."""
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [list(range(bounds[k], bounds[k + 1])) for k in range(parts)]


def build_part(
    config: SimConfig,
    topology: Topology,
    indices: list[int],
    forward: Forward | None = None,
    *,
    learner: LearnerFactory | None = None,
) -> VirtualScheduler:
    """A scheduler holding the real nodes ``indices`` of the simulated network."""
    n = topology.n_nodes
    peers = {i: sim_identity(config.seed, i) for i in range(n)}
    starts, centres, optimum = _problem(config, n, indices) if learner is None else ({}, {}, np.zeros(0))
    stores = {i: MemoryStore(node=node_name(i)) for i in indices}
    slow = {s.node: s.factor for s in config.faults.slow}
    attacks = {a.node: a for a in config.faults.attack}
    gossip = GossipSettings(
        rounds=config.rounds, round_timeout_s=config.round_timeout_s, rule=config.rule, trim=config.trim,
        byzantine_weight=config.byzantine_weight, max_rounds_ahead=config.max_rounds_ahead,
        eval_every=max(1, config.rounds), deadline=config.deadline, overlap=config.overlap,
        compression=config.compression, compression_step=config.compression_step,
        keyframe_every=config.keyframe_every,
    )  # fmt: skip
    plan = RoundPlan(
        rounds=config.rounds, local_steps=config.local_steps, samples_per_round=max(1, config.local_steps),
        eval_every=gossip.eval_every, overlap=config.overlap,
    )  # fmt: skip
    schedule = topology.schedule

    def make_node(i: int, clock: VirtualClock, network: MemoryNetwork, resume: bool) -> Node:
        neighbours = topology.neighbours(i)
        drop = {node_name(j): _drop(config, i, j) for j in neighbours}
        attack = attacks.get(i)
        faults = FaultSettings(
            slow_factor=slow.get(i, 1.0), drop={k: p for k, p in drop.items() if p > 0.0},
            attack=attack.kind if attack else "", attack_factor=attack.factor if attack else None,
        )  # fmt: skip
        timed: Learner = (
            TimedQuadratic(
                centres[i], optimum, lr=config.lr, noise=config.noise, start=starts[i],
                seed=config.seed * 1_000_003 + i, dtype=config.dtype, clock=clock, step_s=config.step_s,
            )
            if learner is None
            else TimedLearner(learner(i), clock=clock, step_s=config.step_s, node=i)
        )  # fmt: skip
        return assemble_node(
            identity=peers[i],
            name=node_name(i),
            network=SIM_NETWORK,
            peers=[Peer(peers[j].peer_id, f"memory://{j}", node_name(j)) for j in neighbours],
            gossip=gossip,
            faults=faults,
            plan=plan
            if schedule is None
            else dataclasses.replace(
                plan, partners=PeerSchedule(schedule, i, {j: peers[j].peer_id for j in neighbours})
            ),
            learner=timed,
            transport=network.attach(peers[i].peer_id, [peers[j].peer_id for j in neighbours]),
            clock=clock,
            store=stores[i],
            seed=config.seed * 1_000_003 + i,
            resume=resume,
        )

    crashes = {c.node: (c.round, c.restart_after_s) for c in config.faults.crash}
    return VirtualScheduler(
        indices,
        {i: peers[i].peer_id for i in range(n)},
        make_node,
        links={i: topology.neighbours(i) for i in indices},
        latency_s=config.latency_s,
        crashes={i: crashes[i] for i in indices if i in crashes},
        forward=forward,
        keep_states=config.keep_states,
    )


class TimedQuadratic(QuadraticLearner):
    """A quadratic learner whose local steps take ``step_s`` virtual seconds each.

    A round without local steps (pure gossip) takes one step's time too: a
    real node always spends some time between two rounds, and with none a node
    whose neighbours are all absent would run through every round at once.
    """

    def __init__(self, *args: Any, clock: VirtualClock, step_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.step_s = clock, step_s

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        self.clock.sleep(max(steps, 1) * self.step_s)  # a pure-gossip round still computes a while
        return super().train_steps(steps, correction)


class TimedLearner(LearnerWrapper):
    """A caller's learner in the simulator: its local steps take ``step_s`` virtual seconds each.

    The same time ``TimedQuadratic`` takes (a round without steps one
    step's), spent before the learner's own steps. Everything else, and any
    attribute the node loop looks for (``snapshot``, ``shared_start``), is
    the learner's (``LearnerWrapper``).
    """

    _REQUIRED = (
        "schema", "fingerprint", "describe", "train_steps", "evaluate", "get_state", "set_state",
        "state_dict", "load_state_dict", "save",
    )  # fmt: skip

    def __init__(self, inner: Learner, *, clock: VirtualClock, step_s: float, node: int) -> None:
        missing = [name for name in self._REQUIRED if not hasattr(inner, name)]
        if missing:
            raise LocalProtocolError(
                f"learner: the factory gave node {node} a {type(inner).__name__}, which lacks "
                f"{', '.join(missing)} (the Learner protocol, p2pfm/learn/learner.py)"
            )
        super().__init__(inner)
        self.clock, self.step_s = clock, step_s

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        self.clock.sleep(max(steps, 1) * self.step_s)
        return self.inner.train_steps(steps, correction)


def _problem(
    config: SimConfig, n: int, indices: Sequence[int]
) -> tuple[dict[int, Array], dict[int, Array], Array]:
    """Per-node start and centre (from the node's own seed: any partition draws the same) and the optimum."""
    dtype = np.float64 if config.dtype == "float64" else np.float32
    shared = np.random.default_rng([config.seed, 0x5EED]).standard_normal(config.dim)
    wanted = set(indices)
    starts: dict[int, Array] = {}
    centres: dict[int, Array] = {}
    total = np.zeros(config.dim)
    for i in range(n):  # every node's draw, for the optimum; kept only for this part's nodes
        rng = np.random.default_rng([config.seed, i])
        start = rng.standard_normal(config.dim).astype(dtype)
        centre = start
        if config.local_steps:
            centre = (shared + config.spread * rng.standard_normal(config.dim)).astype(dtype)
        total += centre
        if i in wanted:
            starts[i], centres[i] = start, centre
    return starts, centres, (total / n).astype(dtype)


def _drop(config: SimConfig, i: int, j: int) -> float:
    prob = config.drop_prob
    for drop in config.faults.drop:
        if not drop.link or set(drop.link) == {i, j}:
            prob = max(prob, drop.prob)
    return prob


def _workers(config: SimConfig, n: int) -> int:
    if config.workers is not None:
        return min(config.workers, n)
    if n * config.dim < _BIG_NETWORK or n < 64:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), n // 32))


def _result(
    config: SimConfig,
    topology: Topology,
    outcomes: list[NodeOutcome],
    tallies: dict[int, RoundTally],
    workers: int,
) -> SimResult:
    outcomes = sorted(outcomes, key=lambda o: o.index)
    attacks = {a.node: a.kind for a in config.faults.attack}
    rounds = []
    for r in range(config.rounds + 1):
        tally = tallies.get(r, RoundTally())
        rounds.append(
            RoundStats(r, tally.consensus_distance, tally.messages, tally.bytes, tally.delivered, tally.nodes)
        )
    nodes = tuple(
        SimNode(
            name=node_name(o.index),
            rounds_completed=o.result.rounds_completed,
            rounds_trained=o.result.rounds_trained,
            distance=o.result.final_eval.get("distance", math.nan),
            rejected=o.rejected,
            banned=o.banned,
            attack=attacks.get(o.index, ""),
            crashes=o.crashes,
        )
        for o in outcomes
    )
    keep = config.keep_states
    return SimResult(
        topology=config.topology,
        nodes=topology.n_nodes,
        lambda2=(
            spectral_stats(topology).lambda2 if topology.schedule is None else topology.schedule.lambda2
        ),
        rounds=tuple(rounds),
        rejected=sum(sum(o.rejected.values()) for o in outcomes),
        node_results=nodes,
        initial_states=tuple(o.initial or {} for o in outcomes) if keep else (),
        final_states=tuple(o.final or {} for o in outcomes) if keep else (),
        workers=workers,
        virtual_time_s=max((o.finished_s for o in outcomes), default=0.0),
        evaluations=tuple(dict(o.result.final_eval) for o in outcomes),
        train_losses=tuple(tallies.get(r, RoundTally()).train_loss for r in range(config.rounds + 1)),
    )


def fit_decay_rate(distances: Sequence[float], *, upper: float = 1e-3, floor: float = 1e-20) -> float:
    """Per-round decay factor of the consensus distance, fitted in log space.

    Uses the rounds whose distance lies in (floor, upper]: below ``upper``
    the slower-decaying eigenvector dominates and the normaliser has settled;
    above ``floor`` float rounding has not yet taken over. Least-squares
    slope of log(distance) against round, returned as exp(slope), so it is
    directly comparable with lambda2^2.
    """
    points = [(t, math.log(d)) for t, d in enumerate(distances) if floor < d <= upper]
    if len(points) < 3:
        raise LocalProtocolError(
            f"need >= 3 rounds with distance in ({floor:g}, {upper:g}] to fit, got {len(points)}"
        )
    t = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    slope = float(np.polyfit(t, y, 1)[0])
    return math.exp(slope)


def float_floor(dtype: str) -> float:
    """A consensus-distance level safely above float rounding noise for ``dtype``."""
    eps = float(np.finfo(np.float32 if dtype == "float32" else np.float64).eps)
    return 1e4 * eps * eps
