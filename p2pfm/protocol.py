"""Sans-I/O gossip protocol for one node: rounds, deadlines, replay and gates.

No sockets, no clocks, no threads: the caller feeds received frames and the
current time in seconds, and the protocol answers with events. The network
node and the in-process simulator drive this same class, so what the
simulator shows is what the network does (h11's design rule).

One round ``r`` of adapt-then-combine gossip on node i::

    proto.start_round(r, now_s)            # deadline = now_s + round_timeout_s
    frames = proto.make_update(state, ...) # send to every neighbour
    proto.receive(frames_from_j, now_s)    # -> Accepted | Rejected, for each arrival
    proto.poll(now_s)                      # -> RoundComplete once all heard or deadline passed

Per neighbour the protocol keeps at most two accepted updates: the one of
the current round and the newest (memory is bounded by the neighbour count).
A neighbour counts for round r once it has an update of round >= r; the mix
uses its round-r state when there is one (the exact synchronous iteration),
else its newest: a neighbour that is ahead contributes its fresher state,
which is also how a node that fell behind learns the round to catch up to
(:attr:`GossipProtocol.highest_peer_round`).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from p2pfm import wire
from p2pfm.errors import LocalProtocolError, RejectReason, RemoteProtocolError
from p2pfm.identity import Identity, PeerId
from p2pfm.wire import Buffer, TensorSpec, Update, WireLimits


@dataclass(frozen=True)
class ProtocolConfig:
    """Everything a node must agree on with its neighbours, plus local bounds."""

    network: str
    fingerprint: bytes
    round_timeout_s: float
    limits: WireLimits = field(default_factory=WireLimits)
    # Expected tensors (names, wire dtypes, shapes); None accepts any schema
    # whose fingerprint matches.
    schema: tuple[TensorSpec, ...] | None = None
    # Timestamps further than this from the receiver's wall clock are refused
    # (None: not checked). Honest nodes need clocks within this of each other.
    max_clock_skew_s: float | None = 300.0
    # Per-sender token bucket: a steady rate and a burst, in messages. An
    # honest node sends one message per round.
    max_messages_per_s: float = 10.0
    message_burst: int = 20

    def __post_init__(self) -> None:
        if self.max_messages_per_s <= 0 or self.message_burst < 1:
            raise LocalProtocolError("max_messages_per_s must be > 0 and message_burst >= 1")
        if not self.round_timeout_s > 0:
            raise LocalProtocolError(f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        if len(self.fingerprint) != wire.FINGERPRINT_BYTES:
            raise LocalProtocolError(f"fingerprint must be {wire.FINGERPRINT_BYTES} bytes")


@dataclass(frozen=True)
class Accepted:
    sender: PeerId
    round: int
    seq: int
    wire_bytes: int


@dataclass(frozen=True)
class Rejected:
    sender: PeerId | None  # None when the message was too broken to name one
    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class RoundComplete:
    round: int
    updates: Mapping[PeerId, Update]  # newest update of each neighbour that is at round >= round
    missing: frozenset[PeerId]  # neighbours not heard in time: their weight stays with us
    timed_out: bool


ReceiveEvent = Union[Accepted, Rejected]


class Phase(enum.Enum):
    IDLE = "idle"  # no round started yet
    COLLECTING = "collecting"  # waiting for neighbours' updates of the current round
    COMPLETE = "complete"  # RoundComplete was returned; start the next round


class GossipProtocol:
    """Per-node gossip state machine (see module docstring)."""

    def __init__(self, identity: Identity, neighbours: Iterable[PeerId], config: ProtocolConfig) -> None:
        self.identity = identity
        self.config = config
        self.neighbours: frozenset[PeerId] = frozenset(neighbours)
        if identity.peer_id in self.neighbours:
            raise LocalProtocolError("a node cannot be its own neighbour")
        self.round = -1
        self.phase = Phase.IDLE
        self.deadline_s = float("inf")
        self.seq = 0  # sequence number of the last message we sent
        self.rejections: Counter[RejectReason] = Counter()
        self.accepted = 0
        # Per neighbour, its accepted updates by round: at most the current
        # round's and its newest (memory bounded by 2 x neighbours).
        self._updates: dict[PeerId, dict[int, Update]] = {}
        self._last_key: dict[PeerId, tuple[int, int]] = {}  # (round, seq) last accepted
        self._buckets: dict[PeerId, tuple[float, float]] = {}  # sender -> (tokens, at now_s)
        self._schema = None if config.schema is None else {s.name: s for s in config.schema}
        # Neighbours that missed the last deadline: not waited for again until
        # we hear from them, so a dead neighbour costs one deadline, not one
        # per round. Their updates still count whenever they do arrive in time.
        self.absent: set[PeerId] = set()

    # ------------------------------------------------------------ sending

    def start_round(self, round: int, now_s: float) -> None:
        """Enter ``round`` (must move forward) and arm its deadline."""
        if round <= self.round:
            raise LocalProtocolError(f"round {round} does not move forward from {self.round}")
        self.round = round
        for by_round in self._updates.values():
            self._prune(by_round)
        self.phase = Phase.COLLECTING
        self.deadline_s = now_s + self.config.round_timeout_s

    def make_update(
        self,
        tensors: Mapping[str, np.ndarray[Any, Any]],
        *,
        samples: int,
        wall_time_ms: int,
        wire_dtypes: Mapping[str, str] | None = None,
    ) -> list[Buffer]:
        """Encode and sign this node's state for the current round."""
        seq = self.take_seq()
        body = wire.encode_update(
            network=self.config.network,
            round=self.round,
            seq=seq,
            ts_ms=wall_time_ms,
            fingerprint=self.config.fingerprint,
            degree=len(self.neighbours),
            samples=samples,
            tensors=tensors,
            wire_dtypes=wire_dtypes,
            limits=self.config.limits,
        )
        return wire.sign(body, self.identity)

    def take_seq(self) -> int:
        """Reserve the next sequence number for a message of the current round."""
        if self.phase is Phase.IDLE:
            raise LocalProtocolError("call start_round before sending")
        self.seq += 1
        return self.seq

    def restore(self, round: int, seq: int) -> None:
        """Resume after a restart: continue numbering after ``seq`` so peers accept us."""
        if self.phase is not Phase.IDLE:
            raise LocalProtocolError("restore only before the first round")
        self.round, self.seq = round, seq

    # ---------------------------------------------------------- receiving

    def receive(
        self, frames: Sequence[Buffer], now_s: float, wall_time_ms: int | None = None
    ) -> ReceiveEvent:
        """Judge one incoming message. Never raises for bad peer data.

        ``now_s`` is the monotonic clock (deadlines, rate limits);
        ``wall_time_ms`` the wall clock for the timestamp gate (None: skipped).
        """
        sender: PeerId | None = None
        try:
            verified = wire.verify(frames, self.config.limits, self.neighbours)
            sender = verified.sender
            if not self._take_token(sender, now_s):
                return self._reject(sender, RejectReason.RATE_LIMITED, "message rate exceeded")
            update = wire.decode_update(verified, self.config.limits)
        except RemoteProtocolError as exc:
            return self._reject(sender, exc.reason, str(exc))
        gate = self._gate(update) or self._content_gate(update, wall_time_ms)
        if gate is not None:
            return self._reject(update.sender, *gate)
        by_round = self._updates.setdefault(update.sender, {})
        by_round[update.round] = update
        self._prune(by_round)
        self.absent.discard(update.sender)
        self._last_key[update.sender] = (update.round, update.seq)
        self.accepted += 1
        return Accepted(update.sender, update.round, update.seq, update.wire_bytes)

    def _gate(self, update: Update) -> tuple[RejectReason, str] | None:
        if update.network != self.config.network:
            return RejectReason.WRONG_NETWORK, f"network {update.network!r}"
        if update.fingerprint != self.config.fingerprint:
            return RejectReason.FINGERPRINT_MISMATCH, "adapter fingerprint differs"
        if self._schema is not None and not _schema_matches(self._schema, update.specs):
            return RejectReason.SCHEMA_MISMATCH, "tensor names, dtypes or shapes differ"
        last = self._last_key.get(update.sender)
        if last is not None and (update.round, update.seq) <= last:
            return RejectReason.REPLAY, f"(round, seq) {(update.round, update.seq)} <= {last}"
        if update.round < self.round:
            return RejectReason.STALE_ROUND, f"round {update.round} < current {self.round}"
        return None

    def _content_gate(self, update: Update, wall_time_ms: int | None) -> tuple[RejectReason, str] | None:
        skew_s = self.config.max_clock_skew_s
        if (
            skew_s is not None
            and wall_time_ms is not None
            and abs(update.ts_ms - wall_time_ms) > skew_s * 1000
        ):
            return (
                RejectReason.CLOCK_SKEW,
                f"timestamp {update.ts_ms} is {(update.ts_ms - wall_time_ms) / 1000:+.0f} s off",
            )
        for name, array in update.tensors.items():
            # One NaN or Inf would spread to every node through the mix: refuse the whole update.
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                return RejectReason.NON_FINITE, f"tensor {name!r} holds NaN or Inf"
        return None

    def _take_token(self, sender: PeerId, now_s: float) -> bool:
        """Token bucket per authenticated sender: bounded work per peer, whatever it sends."""
        rate, burst = self.config.max_messages_per_s, float(self.config.message_burst)
        tokens, then = self._buckets.get(sender, (burst, now_s))
        tokens = min(burst, tokens + max(0.0, now_s - then) * rate)
        if tokens < 1.0:
            self._buckets[sender] = (tokens, now_s)
            return False
        self._buckets[sender] = (tokens - 1.0, now_s)
        return True

    def _reject(self, sender: PeerId | None, reason: RejectReason, detail: str) -> Rejected:
        self.rejections[reason] += 1
        return Rejected(sender, reason, detail)

    # ------------------------------------------------------------- rounds

    def poll(self, now_s: float) -> RoundComplete | None:
        """Return RoundComplete once every present neighbour is heard or the deadline passed.

        A neighbour that missed the previous round's deadline is *absent*: the
        round does not wait for it (its update still counts if it arrives
        before the round completes), and it is present again from its next
        accepted message.
        """
        if self.phase is not Phase.COLLECTING:
            return None
        fresh = {}
        for peer, by_round in self._updates.items():
            # The neighbour's state of exactly this round when we have it (the
            # synchronous iteration); else its newest, fresher one.
            if not by_round:
                continue
            update = by_round.get(self.round) or by_round[max(by_round)]
            if update.round >= self.round:
                fresh[peer] = update
        waiting_for = self.neighbours - self.absent - fresh.keys()
        timed_out = now_s >= self.deadline_s
        if waiting_for and not timed_out:
            return None
        self.phase = Phase.COMPLETE
        missing = self.neighbours - fresh.keys()
        self.absent = set(missing)
        return RoundComplete(self.round, fresh, frozenset(missing), timed_out and bool(waiting_for))

    @property
    def highest_peer_round(self) -> int:
        """Highest round any neighbour has shown us (-1 before any): the catch-up target."""
        return max((max(by_round) for by_round in self._updates.values() if by_round), default=-1)

    def _prune(self, by_round: dict[int, Update]) -> None:
        newest = max(by_round)
        for round_ in [r for r in by_round if r not in (newest, self.round)]:
            del by_round[round_]


def _schema_matches(expected: Mapping[str, TensorSpec], specs: Sequence[TensorSpec]) -> bool:
    return len(specs) == len(expected) and all(expected.get(s.name) == s for s in specs)
