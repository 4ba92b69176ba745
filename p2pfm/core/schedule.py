"""Time-varying topologies: who mixes with whom in round r.

Two kinds, each a perfect (or near-perfect) matching per round, so every
node talks to at most one peer per round and the round's Metropolis matrix
(weight 1/2 to the partner) is symmetric and doubly stochastic:

- ``one-peer-exp:N``: in round r node i pairs with ``i XOR 2^k``,
  ``k = (r - 1) mod ceil(log2 N)`` -- the peer at distance 2^k in the sorted
  member list, one bit at a time. With N a power of two the product of
  log2 N consecutive rounds is exactly the averaging matrix: every node holds
  the network mean after log2 N rounds (hypercube dimension exchange). With
  other N, a partner beyond N-1 means no exchange that round.
- ``matching:N[:SEED]``: a uniformly random perfect matching per round,
  drawn from (SEED, r) so that every node computes the same one (with N
  odd, one node sits out each round).

The union of all rounds' edges is the static graph nodes must be able to
reach (``links``): the hypercube for one-peer-exp, the complete graph for
matching. Nothing here does I/O; the node asks ``partners`` each round.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from p2pfm.core.errors import TopologyError
from p2pfm.core.identity import PeerId

ScheduleKind = Literal["one-peer-exp", "matching"]
SCHEDULE_KINDS: tuple[ScheduleKind, ...] = ("one-peer-exp", "matching")


@dataclass(frozen=True)
class RoundSchedule:
    """Per-round partners on nodes ``0..n-1`` (see the module docstring)."""

    kind: ScheduleKind
    n: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; valid: {', '.join(SCHEDULE_KINDS)}")
        if self.n < 2:
            raise ValueError(f"a schedule needs at least 2 nodes, got {self.n}")

    @property
    def bits(self) -> int:
        """Rounds of one one-peer-exp period: ceil(log2 n)."""
        return max(1, math.ceil(math.log2(self.n)))

    @property
    def period(self) -> int:
        """Rounds over which its contraction is measured: log2 N (one-peer-exp), 4 log2 N (matching)."""
        return self.bits if self.kind == "one-peer-exp" else 4 * self.bits

    @functools.cached_property
    def lambda2(self) -> float:
        """Contraction per round over one period: the counterpart of a static graph's lambda2."""
        return contraction_per_round(self, self.period)

    def partners(self, node: int, round_: int) -> tuple[int, ...]:
        """The node's partner in round ``round_`` (rounds count from 1), or none this round."""
        if not 0 <= node < self.n:
            raise ValueError(f"node {node} is not in 0..{self.n - 1}")
        if self.kind == "one-peer-exp":
            partner = node ^ (1 << ((round_ - 1) % self.bits))
            return (partner,) if partner < self.n else ()
        partner = int(_matching(self.n, self.seed, round_)[node])
        return () if partner < 0 else (partner,)

    def links(self, node: int) -> tuple[int, ...]:
        """Every peer ``node`` is ever paired with (the union graph), ascending."""
        if self.kind == "one-peer-exp":
            return tuple(sorted(p for k in range(self.bits) if (p := node ^ (1 << k)) < self.n))
        return tuple(j for j in range(self.n) if j != node)

    def partner_array(self, round_: int) -> np.ndarray:
        """Every node's partner in round ``round_``; a node sitting out is its own."""
        nodes = np.arange(self.n)
        if self.kind == "one-peer-exp":
            partner = nodes ^ (1 << ((round_ - 1) % self.bits))
            return np.where(partner < self.n, partner, nodes)
        matched = _matching(self.n, self.seed, round_)
        return np.where(matched >= 0, matched, nodes)

    def round_matrix(self, round_: int) -> np.ndarray:
        """The round's mixing matrix: 1/2 on each matched pair, 1 on the diagonal of a node sitting out."""
        weights = np.zeros((self.n, self.n))
        np.add.at(weights, (np.arange(self.n), self.partner_array(round_)), 0.5)
        np.add.at(weights, (np.arange(self.n), np.arange(self.n)), 0.5)
        return weights


@dataclass(frozen=True)
class PeerSchedule:
    """One node's view of a schedule: its partners of each round, as peer ids."""

    schedule: RoundSchedule
    me: int  # this node's index in the topology
    peers: Mapping[int, PeerId]  # topology index -> peer id, for every one of this node's links

    def __call__(self, round_: int) -> tuple[PeerId, ...]:
        return tuple(self.peers[j] for j in self.schedule.partners(self.me, round_))


def parse_schedule(spec: str, max_nodes: int) -> RoundSchedule:
    """``one-peer-exp:N`` or ``matching:N[:SEED]``; a one-line TopologyError otherwise."""
    kind, *fields = spec.split(":")
    usage = "one-peer-exp:N" if kind == "one-peer-exp" else "matching:N[:SEED]"
    if kind not in SCHEDULE_KINDS or not 1 <= len(fields) <= (1 if kind == "one-peer-exp" else 2):
        raise TopologyError(f"{spec}: expected {usage}")
    if not all(field.isdigit() and len(field) <= 18 for field in fields):
        raise TopologyError(f"{spec}: N and SEED must be non-negative integers ({usage})")
    n = int(fields[0])
    if not 2 <= n <= max_nodes:
        raise TopologyError(f"{spec}: N must be in 2..{max_nodes}, got {n}")
    return RoundSchedule(kind, n, int(fields[1]) if len(fields) == 2 else 0)


@functools.lru_cache(maxsize=8)
def _matching(n: int, seed: int, round_: int) -> np.ndarray:
    """partner[i] for round ``round_`` (-1: none), identical on every node for (n, seed, round)."""
    order = np.random.default_rng([seed, round_]).permutation(n)
    partner = np.full(n, -1, dtype=np.int64)
    for a, b in zip(order[0::2], order[1::2], strict=False):
        partner[a], partner[b] = b, a
    return partner


def contraction_per_round(schedule: RoundSchedule, rounds: int) -> float:
    """How much disagreement shrinks per round over ``rounds`` rounds, geometric mean.

    ``|| W_rounds ... W_1 - J/n ||_2 ** (1/rounds)`` (J/n the averaging
    matrix): the time-varying counterpart of a static graph's lambda2. 0 when
    the rounds average exactly (one-peer-exp on a power of two, over a period).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    n = schedule.n
    product = np.eye(n)
    for r in range(
        1, rounds + 1
    ):  # W_r @ product, without the O(n^3) product: row i averages with its partner's
        product = 0.5 * (product + product[schedule.partner_array(r)])
    norm = float(np.linalg.norm(product - np.full((n, n), 1.0 / n), 2))
    return 0.0 if norm < 1e-14 else norm ** (1.0 / rounds)  # below: float rounding, i.e. exact


def schedule_stats(schedule: RoundSchedule) -> dict[str, object]:
    """What ``p2pfm topology show`` says of a time-varying topology, in place of the union graph's spectrum.

    ``lambda2`` is the contraction per round over one period (log2 N rounds
    for one-peer-exp, 4 log2 N for matching), the counterpart of a static
    graph's lambda2; ``rounds_to_1e-3`` follows from it (or is the period,
    when the period averages exactly).
    """
    period = schedule.period
    contraction = contraction_per_round(schedule, period)
    if contraction == 0.0:
        rounds = period
    else:
        rounds = max(1, math.ceil(math.log(1000.0) / -math.log(contraction))) if contraction < 1 else -1
    return {
        "schedule": f"{schedule.kind}: one partner per round",
        "lambda2": contraction,
        "spectral_gap": 1.0 - contraction,
        "rounds_to_1e-3": rounds,
        "exact_average_after": period if contraction == 0.0 else None,
    }
