"""In-process simulator: one gossip node per graph vertex, no sockets.

Every message goes through the real stack -- wire encoding, Ed25519
signing and verification, the sans-I/O protocol with its gates and
deadlines, and the consensus mix -- only the transport is replaced by a
function call, with each message lost with probability ``drop_prob``. So
the simulator measures the same code the networked node runs.

Starting states are i.i.d. standard normal vectors (one per node); with no
training, gossip alone must shrink their disagreement like lambda2^(2t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import blake3
import numpy as np

from p2pfm.core import wire
from p2pfm.core.consensus import MixRule, consensus_distance
from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.fingerprint import fingerprint, schema_document
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import Accepted, GossipProtocol, MixSettings, ProtocolConfig, RoundComplete
from p2pfm.core.topology import parse_topology, spectral_stats

_SIM_NETWORK = "p2pfm-sim"
_ROUND_TIMEOUT_S = 1.0  # simulated seconds; only the ordering matters
_DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass(frozen=True)
class SimConfig:
    topology: str
    rounds: int
    dim: int = 1000
    seed: int = 0
    drop_prob: float = 0.0
    dtype: str = "float32"
    rule: MixRule = "mean"  # gossip.rule: the same combination a node runs (docs/robust.md)
    trim: int = 1
    byzantine_weight: float = 0.25

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise LocalProtocolError(f"rounds must be >= 0, got {self.rounds}")
        if self.dim < 1:
            raise LocalProtocolError(f"dim must be >= 1, got {self.dim}")
        if not 0.0 <= self.drop_prob <= 1.0:
            raise LocalProtocolError(f"drop probability must be in [0, 1], got {self.drop_prob}")
        if self.dtype not in _DTYPES:
            raise LocalProtocolError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        MixSettings(self.rule, trim=self.trim, byzantine_weight=self.byzantine_weight)  # validates


@dataclass(frozen=True)
class RoundStats:
    round: int
    consensus_distance: float
    messages: int  # messages sent this round (lost ones included)
    bytes: int  # wire bytes of those messages
    delivered: int  # messages that arrived and were accepted


@dataclass(frozen=True)
class SimResult:
    topology: str
    nodes: int
    lambda2: float
    rounds: tuple[RoundStats, ...]
    rejected: int  # messages the protocol refused (0 unless something is wrong)
    initial_states: tuple[dict[str, Any], ...] = field(repr=False, default=())
    final_states: tuple[dict[str, Any], ...] = field(repr=False, default=())

    def as_json(self) -> dict[str, Any]:
        return {
            "topology": self.topology,
            "nodes": self.nodes,
            "lambda2": self.lambda2,
            "rounds": [asdict(r) for r in self.rounds],
            "rejected": self.rejected,
        }


def sim_identity(seed: int, node: int) -> Identity:
    """Deterministic keys for simulated node ``node`` (never for real networks)."""
    return Identity(blake3.blake3(f"p2pfm-sim-key/{seed}/{node}".encode()).digest())


def simulate(config: SimConfig) -> SimResult:
    """Run ``config.rounds`` gossip rounds; return per-round statistics."""
    topology = parse_topology(config.topology)
    n = topology.n_nodes
    dtype = _DTYPES[config.dtype]
    spec = wire.TensorSpec("x", config.dtype, (config.dim,))
    proto_config = ProtocolConfig(
        network=_SIM_NETWORK,
        fingerprint=fingerprint({"sim": schema_document([spec])}),
        round_timeout_s=_ROUND_TIMEOUT_S,
        schema=(spec,),
    )
    identities = [sim_identity(config.seed, i) for i in range(n)]
    peers = [ident.peer_id for ident in identities]
    protocols = [
        GossipProtocol(identities[i], [peers[j] for j in topology.neighbours(i)], proto_config)
        for i in range(n)
    ]
    init_rng, drop_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(2))
    states = [{"x": init_rng.standard_normal(config.dim).astype(dtype)} for _ in range(n)]
    initial_states = tuple(states)
    history = [RoundStats(0, consensus_distance(states), 0, 0, 0)]
    clock_s = 0.0
    for round_ in range(1, config.rounds + 1):
        messages = sent_bytes = delivered = 0
        outgoing = []
        for i, proto in enumerate(protocols):
            proto.start_round(round_, clock_s)
            outgoing.append(proto.make_update(states[i], samples=1, wall_time_ms=int(clock_s * 1000)))
        for i in range(n):
            size = wire.message_bytes(outgoing[i])
            for j in topology.neighbours(i):
                messages += 1
                sent_bytes += size
                if drop_rng.random() < config.drop_prob:
                    continue
                if isinstance(protocols[j].receive(outgoing[i], clock_s), Accepted):
                    delivered += 1
        settings = MixSettings(config.rule, trim=config.trim, byzantine_weight=config.byzantine_weight)
        states = [_complete_round(proto, states[i], clock_s, settings) for i, proto in enumerate(protocols)]
        clock_s += _ROUND_TIMEOUT_S
        history.append(RoundStats(round_, consensus_distance(states), messages, sent_bytes, delivered))
    return SimResult(
        topology=config.topology,
        nodes=n,
        lambda2=spectral_stats(topology).lambda2,
        rounds=tuple(history),
        rejected=sum(sum(p.rejections.values()) for p in protocols),
        initial_states=initial_states,
        final_states=tuple(states),
    )


def _complete_round(
    proto: GossipProtocol, state: dict[str, Any], clock_s: float, settings: MixSettings
) -> dict[str, Any]:
    # Everything that will arrive has arrived: either all neighbours were
    # heard (complete now) or the rest were lost (complete at the deadline).
    event = proto.poll(clock_s) or proto.poll(proto.deadline_s)
    if not isinstance(event, RoundComplete):  # pragma: no cover - poll at the deadline always completes
        raise LocalProtocolError("round did not complete at its deadline")
    return event.mix(state, settings)


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
