"""``p2pfm.simulate(...)``: the simulator as a Python API, for scripts, notebooks and tests.

It runs the simulator of p2pfm/lab/sim.py -- one real node loop per
vertex (wire encoding, signatures, gates, deadlines, the mixing rule, fault
wrappers, attacks) on the in-memory transport and virtual time -- with
keyword arguments instead of a ``SimConfig``, your own learner if you
give one, and a typed result: per round (``SimulationResult.rounds``, also
what iterating the result gives) and per node (``SimulationResult.nodes``).

Every bad argument raises :class:`p2pfm.core.errors.ArgumentError` (a
``LocalProtocolError`` and a ``ValueError``) naming it. docs/testing.md is
the reference; the pytest plugin (p2pfm/testing/pytest_plugin.py) wraps it
in fixtures.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import msgspec
import networkx as nx
import numpy as np

from p2pfm.core.errors import ArgumentError, LocalProtocolError, TopologyError, UserInputError
from p2pfm.core.topology import MAX_NODES, Topology, parse_topology
from p2pfm.lab.scenario import Attack, Crash, Drop, Faults, Join, Leave, RosterChange, Slow, check_faults
from p2pfm.lab.sim import SimConfig, SimResult
from p2pfm.lab.sim import simulate as run_simulation
from p2pfm.learn.learner import Array, Learner
from p2pfm.node.attacks import ATTACKS

__all__ = [
    "Attack",
    "Crash",
    "Drop",
    "Fault",
    "LearnerFactory",
    "NodeReport",
    "RoundResult",
    "SimulationResult",
    "Slow",
    "simulate",
]

Fault = Union[Attack, Crash, Slow, Drop]
LearnerFactory = Callable[[int], Learner]  # node index -> a fresh learner for that node
_QUADRATIC_ONLY = ("dim", "dtype", "lr", "noise", "spread")  # the built-in learner's own settings


@dataclass(frozen=True)
class RoundResult:
    """One round, over the nodes that finished it (round 0: the starting states)."""

    round: int
    consensus_distance: float  # mean_i ||x_i - xbar||^2 / mean_i ||x_i||^2 over every tensor of the state
    messages: int  # updates sent this round (lost ones included)
    bytes: int  # wire bytes of the messages that went on a link
    delivered: int  # neighbours' updates that arrived in time and were mixed
    nodes: int  # nodes whose state the distance measures (a crashed one is missing)
    train_loss: float | None  # mean training loss of the nodes that trained (None: no local steps)


@dataclass(frozen=True)
class NodeReport:
    """One node at the end of the run."""

    index: int
    name: str  # "node<index>"
    attack: str  # the attack it ran; "" when honest
    rounds_completed: int
    rounds_trained: int
    crashes: int
    rejected: dict[str, int]  # updates it refused, by reason (docs/protocol.md)
    banned: tuple[str, ...]  # neighbours it proved to equivocate
    distance: float | None  # built-in learner: ||x - optimum|| / ||optimum||; your learner: None
    metrics: dict[str, float]  # the learner's last ``evaluate()``
    final_state: dict[str, Array] = field(repr=False, default_factory=dict)  # keep_states=True
    initial_state: dict[str, Array] = field(repr=False, default_factory=dict)

    @property
    def honest(self) -> bool:
        return not self.attack


@dataclass(frozen=True)
class SimulationResult:
    """A run: per-round results (iterate it, or ``.rounds``), per-node reports (``.nodes``)."""

    topology: str
    seed: int
    lambda2: float  # second largest eigenvalue modulus of the mixing matrix: consensus decays ~ lambda2^2
    rounds: tuple[RoundResult, ...]  # rounds[0] is the start, rounds[r] round r
    nodes: tuple[NodeReport, ...]
    rejected: int  # updates refused over the whole network (0 unless under attack or misconfigured)
    virtual_time_s: float  # when the last node finished, in virtual seconds
    workers: int = 1

    def __iter__(self) -> Iterator[RoundResult]:
        return iter(self.rounds)

    def __len__(self) -> int:
        return len(self.rounds)

    @property
    def final(self) -> RoundResult:
        """The last round."""
        return self.rounds[-1]

    @property
    def consensus_distance(self) -> float:
        """The last round's consensus distance (every node that finished it, attackers included)."""
        return self.rounds[-1].consensus_distance

    @property
    def honest(self) -> tuple[NodeReport, ...]:
        return tuple(n for n in self.nodes if n.honest)

    def node(self, which: int | str) -> NodeReport:
        """A node by index or name."""
        for report in self.nodes:
            if which in (report.index, report.name):
                return report
        raise ArgumentError("which", f"no node {which!r}; nodes are 0..{len(self.nodes) - 1}")

    def mean_state(self, *, honest: bool = True) -> dict[str, Array]:
        """The mean final state (of the honest nodes by default), in float64."""
        states = self._final_states(honest)
        return {
            name: np.mean([np.asarray(s[name], np.float64) for s in states], axis=0) for name in states[0]
        }

    def disagreement(self, *, honest: bool = True) -> float:
        """The consensus distance of the final states (of the honest nodes by default).

        What ``RoundResult.consensus_distance`` measures, but over the nodes
        you choose: with attackers in the network, whether the honest ones
        still agree. 0.0: identical states.
        """
        states = self._final_states(honest)
        vectors = np.stack([_flat(s) for s in states])
        scale = float(np.mean(np.sum(vectors * vectors, axis=1)))
        spread = float(np.mean(np.sum((vectors - vectors.mean(axis=0)) ** 2, axis=1)))
        return spread / scale if scale > 0.0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """Everything but the states, JSON-ready."""
        return {
            "topology": self.topology, "seed": self.seed, "lambda2": self.lambda2,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "nodes": [
                {f.name: getattr(n, f.name) for f in dataclasses.fields(n) if not f.name.endswith("_state")}
                for n in self.nodes
            ],
            "rejected": self.rejected, "virtual_time_s": self.virtual_time_s, "workers": self.workers,
        }  # fmt: skip

    def _final_states(self, honest: bool) -> list[dict[str, Array]]:
        chosen = self.honest if honest else self.nodes
        states = [n.final_state for n in chosen if n.final_state]
        if not states:
            raise LocalProtocolError("no final states: run with keep_states=True (and some honest node)")
        return states


def simulate(
    topology: str | os.PathLike[str] | nx.Graph | Topology,
    *,
    rounds: int = 10,
    learner: LearnerFactory | None = None,
    local_steps: int | None = None,
    rule: str = "mean",
    trim: int = 1,
    byzantine_weight: float = 0.25,
    attacks: Mapping[int, str] | None = None,
    faults: Faults | Iterable[Fault] = (),
    drop: float = 0.0,
    seed: int = 0,
    dim: int | None = None,
    dtype: Literal["float32", "float64"] | None = None,
    lr: float | None = None,
    noise: float | None = None,
    spread: float | None = None,
    overlap: bool = False,
    compression: str = "none",
    compression_step: float = 1.0,
    keyframe_every: int = 50,
    deadline: Literal["adaptive", "fixed"] = "adaptive",
    round_timeout_s: float = 30.0,
    step_s: float = 0.5,
    latency_s: float = 0.25,
    max_rounds_ahead: int = 3,
    workers: int | None = None,
    keep_states: bool = True,
) -> SimulationResult:
    """Run ``rounds`` gossip rounds of real node loops on ``topology``; see docs/testing.md.

    ``topology``: a spec (``"ring:8"``, ``"torus:4x4"``, ``"exp:16"``...), a
    topology file, a networkx graph (nodes relabelled 0..N-1 in sorted
    order) or a ``Topology``. ``learner``: node index -> a fresh learner
    (default: the built-in quadratic one, whose ``dim``, ``dtype``, ``lr``,
    ``noise`` and ``spread`` only it takes). ``local_steps`` per round
    (default 0 for the built-in learner: pure averaging; 1 for yours).
    ``attacks``: node -> attack kind, shorthand for ``Attack`` faults;
    ``faults``: ``Attack``, ``Crash``, ``Slow`` and ``Drop`` objects (or a
    ``Faults``); ``drop``: every message's loss probability.
    """
    given = {"dim": dim, "dtype": dtype, "lr": lr, "noise": noise, "spread": spread}
    if learner is not None:
        if not callable(learner):
            raise ArgumentError(
                "learner", f"must be a function of the node index, got {type(learner).__name__}"
            )
        for name in _QUADRATIC_ONLY:
            if given[name] is not None:
                raise ArgumentError(
                    name, "is a setting of the built-in quadratic learner; your learner's state sets its own"
                )
    graph = _topology(topology)
    # Types here; every range once, in SimConfig (which names the field as these arguments do).
    _check_types(
        int, rounds=rounds, trim=trim, keyframe_every=keyframe_every, seed=seed,
        max_rounds_ahead=max_rounds_ahead, local_steps=local_steps, workers=workers, dim=dim,
    )  # fmt: skip
    _check_types(
        float, drop=drop, byzantine_weight=byzantine_weight, compression_step=compression_step, lr=lr,
        noise=noise, spread=spread, round_timeout_s=round_timeout_s, step_s=step_s, latency_s=latency_s,
    )  # fmt: skip
    _check_types(str, rule=rule, compression=compression, deadline=deadline, dtype=dtype)
    if seed < 0:
        raise ArgumentError("seed", f"must be >= 0, got {seed}")
    checked = _faults(faults, attacks, graph)
    try:
        config = SimConfig(
            graph.spec, rounds, dim=1000 if dim is None else dim, seed=seed, drop_prob=float(drop),
            dtype=dtype or "float32", rule=rule, trim=trim, byzantine_weight=float(byzantine_weight),  # type: ignore[arg-type]
            local_steps=(0 if learner is None else 1) if local_steps is None else local_steps,
            lr=0.1 if lr is None else lr, noise=0.0 if noise is None else noise,
            spread=1.0 if spread is None else spread, faults=checked, round_timeout_s=float(round_timeout_s),
            deadline=deadline, step_s=float(step_s), latency_s=float(latency_s),
            max_rounds_ahead=max_rounds_ahead, workers=workers, keep_states=bool(keep_states),
            overlap=bool(overlap), compression=compression,  # type: ignore[arg-type]
            compression_step=float(compression_step), keyframe_every=keyframe_every,
        )  # fmt: skip
    except ArgumentError as exc:
        raise ArgumentError(_ARGUMENT_OF.get(exc.argument, exc.argument), exc.problem) from None
    except LocalProtocolError as exc:  # a combination the checks above let through
        raise ArgumentError("settings", str(exc)) from None
    factory = None if learner is None else _SharedModel(learner)
    return _result(run_simulation(config, learner=factory, topology=graph), seed, custom=learner is not None)


class _SharedModel:
    """The caller's factory, checked: every node's learner shares the first one's fingerprint and schema."""

    def __init__(self, make: LearnerFactory) -> None:
        self.make = make
        self.first: tuple[bytes, Any] | None = None

    def __call__(self, index: int) -> Learner:
        learner = self.make(index)
        schema, mark = getattr(learner, "schema", None), getattr(learner, "fingerprint", None)
        if not isinstance(mark, bytes) or not isinstance(schema, tuple):
            raise ArgumentError(
                "learner",
                f"node {index}'s learner has no fingerprint (bytes) and schema (a TensorSpec tuple)",
            )
        if self.first is None:
            self.first = (mark, schema)
        elif (mark, schema) != self.first:
            raise ArgumentError(
                "learner",
                f"node {index}'s learner has another fingerprint or schema than the first node's: neighbours "
                "would refuse each other's updates; build every node's learner with the same shapes and kind",
            )
        return learner


def _topology(topology: object) -> Topology:
    if isinstance(topology, Topology):
        return topology
    if isinstance(topology, nx.Graph):
        return _from_graph(topology)
    if isinstance(topology, (str, os.PathLike)):
        try:
            return parse_topology(os.fspath(topology))
        except UserInputError as exc:
            raise ArgumentError("topology", str(exc)) from None
    raise ArgumentError(
        "topology",
        f"expected a spec such as 'ring:8', a file, or a networkx graph; got {type(topology).__name__}",
    )


def _from_graph(graph: nx.Graph) -> Topology:
    """A networkx graph as a topology: undirected, nodes in sorted order (as strings), checked."""
    if graph.is_multigraph():
        graph = nx.Graph(graph)
    if graph.is_directed():
        graph = graph.to_undirected()
    labels = sorted(graph.nodes, key=lambda v: (not isinstance(v, int), v if isinstance(v, int) else str(v)))
    n = len(labels)
    if not 1 <= n <= MAX_NODES:
        raise ArgumentError("topology", f"the graph has {n} nodes; a simulation runs 1..{MAX_NODES}")
    index = {label: i for i, label in enumerate(labels)}
    plain = nx.Graph()
    plain.add_nodes_from(range(n))
    plain.add_edges_from((index[u], index[v]) for u, v in graph.edges if u != v)
    if not nx.is_connected(plain):
        raise ArgumentError(
            "topology", f"the graph is disconnected ({nx.number_connected_components(plain)} components)"
        )
    name = str(graph.graph.get("name") or "") or f"graph:{n}"
    try:
        return Topology(nx.freeze(plain), tuple(str(label) for label in labels), name)
    except TopologyError as exc:
        raise ArgumentError("topology", str(exc)) from None


def _faults(
    faults: Faults | Iterable[Fault], attacks: Mapping[int, str] | None, topology: Topology
) -> Faults:
    if isinstance(faults, Faults):
        if faults.join or faults.leave or faults.roster:
            raise ArgumentError(
                "faults", "join, leave and roster faults need an open network (p2pfm simulate overlay)"
            )
        items: list[Any] = [*faults.attack, *faults.crash, *faults.slow, *faults.drop]
    elif isinstance(faults, (str, bytes)) or not isinstance(faults, Iterable):
        raise ArgumentError("faults", f"expected Attack, Crash, Slow or Drop objects, got {faults!r}")
    else:
        items = list(faults)
    if attacks is not None:
        if not isinstance(attacks, Mapping):
            raise ArgumentError("attacks", f"expected a mapping node -> attack kind, got {attacks!r}")
        for node, kind in attacks.items():
            if kind not in ATTACKS:
                raise ArgumentError(
                    "attacks", f"unknown attack {kind!r} for node {node}; valid: {', '.join(ATTACKS)}"
                )
            if not isinstance(node, int) or isinstance(node, bool):
                raise ArgumentError("attacks", f"nodes are indices (int), got {node!r}")
            if not 0 <= node < topology.n_nodes:
                raise ArgumentError("attacks", f"node {node} is not in 0..{topology.n_nodes - 1}")
            items.append(Attack(node=node, kind=kind))  # type: ignore[arg-type]
    grouped: dict[str, list[Any]] = {"attack": [], "crash": [], "slow": [], "drop": []}
    kinds: dict[type, str] = {Attack: "attack", Crash: "crash", Slow: "slow", Drop: "drop"}
    for item in items:
        group = kinds.get(type(item))
        if group is None:
            extra = (
                " (an open network's, p2pfm simulate overlay)"
                if isinstance(item, (Join, Leave, RosterChange))
                else ""
            )
            raise ArgumentError(
                "faults", f"expected Attack, Crash, Slow or Drop objects, got {item!r}{extra}"
            )
        grouped[group].append(item)
    if len({a.node for a in grouped["attack"]}) < len(grouped["attack"]):
        raise ArgumentError("attacks" if attacks else "faults", "a node can run one attack only")
    try:
        return check_faults(Faults(**{k: tuple(v) for k, v in grouped.items()}), topology)
    except (UserInputError, msgspec.ValidationError) as exc:
        raise ArgumentError("faults", str(exc)) from None


# SimConfig's field -> the argument of simulate() it comes from, where the names differ.
_ARGUMENT_OF = {"drop_prob": "drop"}
_TYPES: dict[type, tuple[tuple[type, ...], str]] = {
    int: ((int, np.integer), "an int"),
    float: ((int, float, np.integer, np.floating), "a number"),
    str: ((str,), "a str"),
}


def _check_types(kind: type, **values: object) -> None:
    """Each value (None: the default, not checked) is of ``kind``: an int, a number or a str."""
    accepted, described = _TYPES[kind]
    for name, value in values.items():
        if value is not None and (not isinstance(value, accepted) or isinstance(value, bool)):
            raise ArgumentError(name, f"expected {described}, got {value!r}")


def _flat(state: Mapping[str, Array]) -> Array:
    return np.concatenate([np.asarray(state[name], np.float64).ravel() for name in sorted(state)])


def _result(result: SimResult, seed: int, *, custom: bool) -> SimulationResult:
    losses = result.train_losses or (None,) * len(result.rounds)
    rounds = tuple(
        RoundResult(r.round, r.consensus_distance, r.messages, r.bytes, r.delivered, r.nodes, loss)
        for r, loss in zip(result.rounds, losses, strict=True)
    )
    nodes = []
    for k, n in enumerate(result.node_results):
        metrics = dict(result.evaluations[k]) if result.evaluations else {}
        nodes.append(
            NodeReport(
                index=int(n.name.removeprefix("node")),
                name=n.name,
                attack=n.attack,
                rounds_completed=n.rounds_completed,
                rounds_trained=n.rounds_trained,
                crashes=n.crashes,
                rejected=dict(n.rejected),
                banned=tuple(n.banned),
                distance=None if custom or math.isnan(n.distance) else n.distance,
                metrics=metrics,
                final_state=result.final_states[k] if result.final_states else {},
                initial_state=result.initial_states[k] if result.initial_states else {},
            )
        )
    return SimulationResult(
        topology=result.topology, seed=seed, lambda2=result.lambda2, rounds=rounds, nodes=tuple(nodes),
        rejected=result.rejected, virtual_time_s=result.virtual_time_s, workers=result.workers,
    )  # fmt: skip
