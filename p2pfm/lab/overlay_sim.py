"""``p2pfm simulate overlay``: an open network of real node loops whose neighbours come from membership.

Each node is a real ``Node`` built by ``assemble_node`` with a
``Membership`` (p2pfm/core/membership.py) on the in-memory transport's
control channel, on virtual time: the joins, peer exchange, failure
detection, graceful leaves and catch-up a networked node runs. Nodes start
either with a random ``degree``-regular overlay already in place (a running
network) or, with ``bootstrap_only``, knowing nothing but node 0's record.
Faults are given per run: a fraction of the nodes crash after a round,
some leave gracefully after a round, and new nodes join after a round
(through node 0, which never crashes or leaves: it is the bootstrap).

Per round it reports the members (nodes that recorded the round), the
connected components of their active views (edges to members only), the
smallest and mean number of live neighbours, and the consensus distance of
their states.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Literal

import blake3
import networkx as nx
import numpy as np

from p2pfm.config.node_config import FaultSettings, GossipSettings, Peer
from p2pfm.core.consensus import MixRule
from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import Identity
from p2pfm.core.membership import Membership, MembershipConfig
from p2pfm.core.protocol import MixSettings
from p2pfm.core.records import make_peer_record, make_roster_document
from p2pfm.lab.sim import SIM_NETWORK, TimedQuadratic, node_name, sim_identity
from p2pfm.lab.virtual import VirtualScheduler
from p2pfm.net.memory import MemoryNetwork
from p2pfm.node.attacks import ATTACKS
from p2pfm.node.clock import VirtualClock
from p2pfm.node.factory import assemble_node
from p2pfm.node.loop import Node, RoundPlan
from p2pfm.node.store import MemoryStore


@dataclass(frozen=True)
class OverlayConfig:
    nodes: int
    rounds: int
    degree: int = 6
    bootstrap_only: bool = False  # every node starts knowing only node 0's record
    crash: tuple[float, int] | None = None  # (fraction of the nodes, after round)
    join: tuple[int, int] | None = None  # (new nodes, after round)
    leave: tuple[int, int] | None = None  # (nodes leaving gracefully, after round)
    seed: int = 0
    dim: int = 100
    dtype: Literal["float32", "float64"] = "float64"
    # (node, kind, factor or None): publishing attacks (p2pfm/node/attacks.py); node 0 cannot attack
    attacks: tuple[tuple[int, str, float | None], ...] = ()
    rule: MixRule = "mean"  # gossip.rule (docs/robust.md)
    trim: int = 1
    byzantine_weight: float = 0.25
    step_s: float = 0.5  # virtual seconds per round of (pure-gossip) computation
    latency_s: float = 0.25  # one-way latency of every link
    round_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        checks = (
            (self.nodes >= 2, f"nodes must be >= 2, got {self.nodes}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.degree >= 1, f"degree must be >= 1, got {self.degree}"),
            (self.dim >= 1, f"dim must be >= 1, got {self.dim}"),
            (self.crash is None or 0.0 <= self.crash[0] < 1.0, "crash fraction must be in [0, 1)"),
            (self.join is None or self.join[0] >= 0, "join count must be >= 0"),
            (self.leave is None or self.leave[0] >= 0, "leave count must be >= 0"),
        )
        for ok, problem in checks:
            if not ok:
                raise LocalProtocolError(problem)
        for what, fault in (("crash", self.crash), ("join", self.join), ("leave", self.leave)):
            if fault is not None and not 0 <= fault[1] < self.rounds:
                raise LocalProtocolError(f"{what} round must be in [0, {self.rounds - 1}], got {fault[1]}")
        MixSettings(self.rule, trim=self.trim, byzantine_weight=self.byzantine_weight)  # validates
        for node, kind, _ in self.attacks:
            if kind not in ATTACKS or not 1 <= node < self.nodes:
                raise LocalProtocolError(
                    f"attack {node}:{kind}: kind one of {', '.join(ATTACKS)}, node 1..{self.nodes - 1}"
                )
        leaving = self.crashed_count + (self.leave[0] if self.leave else 0)
        if leaving > self.nodes - 1:
            raise LocalProtocolError(
                f"{leaving} nodes crash or leave; at most {self.nodes - 1} may (node 0 stays)"
            )

    @property
    def crashed_count(self) -> int:
        return 0 if self.crash is None else round(self.crash[0] * self.nodes)


@dataclass(frozen=True)
class OverlayRound:
    round: int
    members: int
    components: int
    min_active_view: int
    mean_active_view: float
    consensus_distance: float


@dataclass(frozen=True)
class OverlayResult:
    config: OverlayConfig
    rounds: tuple[OverlayRound, ...]
    control_sent: dict[str, int]  # control messages by kind, over all nodes
    control_rejected: dict[str, int]  # control messages refused, by reason
    rejected: dict[str, int]  # updates refused, by reason
    view_changes: dict[str, int]  # by reason
    virtual_time_s: float
    # ||mean of the honest nodes' final states - mean of their starts|| / RMS of the starts: how far the
    # attackers moved the honest consensus away from the honest average (0 without attackers).
    honest_drift: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "nodes": self.config.nodes,
            "degree": self.config.degree,
            "rounds": [asdict(r) for r in self.rounds],
            "control_sent": self.control_sent,
            "control_rejected": self.control_rejected,
            "rejected": self.rejected,
            "view_changes": self.view_changes,
            "virtual_time_s": self.virtual_time_s,
            "honest_drift": self.honest_drift,
        }


def admin_identity(seed: int) -> Identity:
    """The simulated network's roster admin (deterministic; never for real networks)."""
    return Identity(blake3.blake3(f"p2pfm-sim-admin/{seed}".encode()).digest())


def simulate_overlay(config: OverlayConfig) -> OverlayResult:
    """Run the open network ``config`` describes (module docstring)."""
    n = config.nodes
    joiners = config.join[0] if config.join else 0
    total = n + joiners
    rng = random.Random(config.seed)
    ids = {i: sim_identity(config.seed, i) for i in range(total)}
    index_of = {ids[i].peer_id: i for i in range(total)}
    records = {
        i: make_peer_record(ids[i], SIM_NETWORK, 1, [f"memory://{node_name(i)}"]) for i in range(total)
    }
    admin = admin_identity(config.seed)
    roster = make_roster_document(
        admin, network=SIM_NETWORK, version=1, members=[ids[i].peer_id for i in range(total)],
        admins=[admin.peer_id],
    )  # fmt: skip
    others = list(range(1, n))  # node 0 is the bootstrap: it neither crashes nor leaves
    rng.shuffle(others)
    crashing = others[: config.crashed_count]
    leaving = others[config.crashed_count : config.crashed_count + (config.leave[0] if config.leave else 0)]
    initial = _initial_views(config, rng)
    membership_config = MembershipConfig(network=SIM_NETWORK, degree=config.degree)
    gossip = GossipSettings(
        rounds=config.rounds, round_timeout_s=config.round_timeout_s, eval_every=config.rounds,
        rule=config.rule, trim=config.trim, byzantine_weight=config.byzantine_weight,
    )  # fmt: skip
    attacks = {node: (kind, factor) for node, kind, factor in config.attacks}
    plan = RoundPlan(rounds=config.rounds, local_steps=0, samples_per_round=1, eval_every=config.rounds)
    starts = _starts(config, total)
    names = {ids[i].peer_id: node_name(i) for i in range(total)}
    views: dict[int, dict[int, frozenset[int]]] = {}

    def make_node(i: int, clock: VirtualClock, network: MemoryNetwork, resume: bool) -> Node:
        membership = Membership(
            ids[i], membership_config, roster, records[i], seed=config.seed * 1_000_003 + i
        )
        seeded = [records[j] for j in initial.get(i, ())]
        membership.seed_views(
            seeded, [records[j] for j in _passive_seed(config, i, n, rng)] if seeded else []
        )
        contacts = [records[0]] if i != 0 and (not seeded) else []
        learner = TimedQuadratic(
            starts[i], starts[i], lr=0.1, start=starts[i], seed=config.seed * 1_000_003 + i,
            dtype=config.dtype, clock=clock, step_s=config.step_s,
        )  # fmt: skip
        node = assemble_node(
            identity=ids[i], name=node_name(i), network=SIM_NETWORK,
            peers=[Peer(r.peer, r.address, node_name(index_of[r.peer])) for r in seeded],
            gossip=gossip, faults=_faults(attacks.get(i)), plan=plan, learner=learner,
            transport=network.attach(ids[i].peer_id, [r.peer for r in seeded]),
            clock=clock, store=MemoryStore(node=node_name(i)), seed=config.seed * 1_000_003 + i,
            resume=resume, membership=membership, contacts=contacts,
        )  # fmt: skip
        node.peer_names.update(names)
        return node

    def on_record(i: int, round_: int, node: Node) -> None:
        assert node.overlay is not None
        views.setdefault(round_, {})[i] = frozenset(index_of[p] for p in node.overlay.membership.active)

    scheduler = VirtualScheduler(
        list(range(n)), {i: ids[i].peer_id for i in range(total)}, make_node,
        links={i: [] for i in range(n)}, latency_s=config.latency_s,
        crashes={i: (config.crash[1], None) for i in crashing} if config.crash else None,
        leaves={i: config.leave[1] for i in leaving} if config.leave else None,
        joins={config.join[1]: list(range(n, total))} if config.join else None,
        on_record=on_record,
    )  # fmt: skip
    scheduler.run_until()
    honest = [i for i in scheduler.slots if i not in attacks and i not in crashing]
    return _result(config, scheduler, views, _drift(starts, scheduler, honest))


def _faults(attack: tuple[str, float | None] | None) -> FaultSettings:
    if attack is None:
        return FaultSettings()
    return FaultSettings(attack=attack[0], attack_factor=attack[1])  # type: ignore[arg-type]


def _drift(starts: dict[int, np.ndarray[Any, Any]], scheduler: VirtualScheduler, honest: list[int]) -> float:
    begin = np.mean([np.asarray(starts[i], np.float64) for i in honest], axis=0)
    end = np.mean(
        [np.asarray(scheduler.slots[i].node.learner.get_state()["x"], np.float64) for i in honest], axis=0
    )
    rms = float(np.sqrt(np.mean([np.mean(np.asarray(starts[i], np.float64) ** 2) for i in honest])))
    return float(np.linalg.norm(end - begin) / (rms * np.sqrt(begin.size)))


def _initial_views(config: OverlayConfig, rng: random.Random) -> dict[int, list[int]]:
    """A running network's overlay: a random ``degree``-regular graph (none with ``bootstrap_only``)."""
    n, d = config.nodes, min(config.degree, config.nodes - 1)
    if config.bootstrap_only:
        return {}
    if (n * d) % 2:
        d -= 1  # a d-regular graph on n nodes needs n * d even
    graph = nx.random_regular_graph(d, n, seed=rng.randrange(2**32))
    return {i: sorted(graph.neighbors(i)) for i in range(n)}


def _passive_seed(config: OverlayConfig, i: int, n: int, rng: random.Random) -> list[int]:
    others = [j for j in range(n) if j != i]
    return rng.sample(others, min(len(others), MembershipConfig(network=SIM_NETWORK).passive_size))


def _starts(config: OverlayConfig, total: int) -> dict[int, np.ndarray[Any, Any]]:
    dtype = np.float64 if config.dtype == "float64" else np.float32
    return {
        i: np.random.default_rng([config.seed, i]).standard_normal(config.dim).astype(dtype)
        for i in range(total)
    }


def _result(
    config: OverlayConfig,
    scheduler: VirtualScheduler,
    views: dict[int, dict[int, frozenset[int]]],
    honest_drift: float = 0.0,
) -> OverlayResult:
    rows = []
    for round_ in range(1, config.rounds + 1):
        members = views.get(round_, {})
        graph = nx.Graph()
        graph.add_nodes_from(members)
        live = {i: [j for j in view if j in members] for i, view in members.items()}
        graph.add_edges_from((i, j) for i, view in live.items() for j in view)
        sizes = [len(view) for view in live.values()]
        tally = scheduler.tallies.get(round_)
        rows.append(
            OverlayRound(
                round=round_,
                members=len(members),
                components=nx.number_connected_components(graph) if members else 0,
                min_active_view=min(sizes, default=0),
                mean_active_view=float(np.mean(sizes)) if sizes else 0.0,
                consensus_distance=tally.consensus_distance if tally else math.nan,
            )
        )
    sent: Counter[str] = Counter()
    control_rejected: Counter[str] = Counter()
    rejected: Counter[str] = Counter()
    changes: Counter[str] = Counter()
    for slot in scheduler.slots.values():
        overlay = slot.node.overlay
        if overlay is not None:
            sent.update(overlay.membership.sent)
            control_rejected.update({r.value: k for r, k in overlay.membership.refusals.items()})
            changes.update(overlay.changes)
        rejected.update({r.value: k for r, k in slot.node.protocol.rejections.items()})
    finished = [o.finished_s for o in scheduler.outcomes()]
    return OverlayResult(
        config=config, rounds=tuple(rows), control_sent=dict(sent), control_rejected=dict(control_rejected),
        rejected=dict(rejected), view_changes=dict(changes), virtual_time_s=max(finished, default=0.0),
        honest_drift=honest_drift,
    )  # fmt: skip


__all__ = ["OverlayConfig", "OverlayResult", "OverlayRound", "simulate_overlay"]
