"""Sans-I/O gossip protocol for one node: rounds, deadlines, replay and gates.

No sockets, no clocks, no threads: the caller feeds received messages and
the current time in seconds, and the protocol answers with events. The
network node and the in-process simulator drive this same class, so what the
simulator shows is what the network does (h11's design rule).

One round ``r`` of adapt-then-combine gossip on node i::

    proto.start_round(r, now_s)             # deadline = now_s + round_timeout_s
    message = proto.make_update(state, ...) # send to every neighbour
    proto.receive(message, now_s, link=j)   # -> Accepted | Rejected | EquivocationFound
    proto.poll(now_s)                       # -> RoundComplete once all heard or deadline passed

Per neighbour the protocol keeps at most two accepted updates: the one of
the current round and the newest (memory is bounded by the neighbour count).
A neighbour counts for round r once it has an update of round >= r; the mix
uses its round-r state when there is one (the exact synchronous iteration),
else its newest.

Every number a peer sends is a claim. A round more than ``max_rounds_ahead``
ahead of ours is refused (``future_round``) but remembered as the sender's
*claim*; a node that fell behind catches up only to a round that a strict
majority of the neighbours it heard recently confirm (:meth:`catch_up_target`),
so one lying neighbour cannot end anybody's training. Two different signed
heads from one sender for one round are kept as proof of equivocation; the
sender is banned and the proof is handed to the node to pass on.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from p2pfm.core import codec, wire
from p2pfm.core.consensus import metropolis_weights
from p2pfm.core.deadline import ArrivalTracker, RoundPace
from p2pfm.core.errors import LocalProtocolError, RejectReason, RemoteProtocolError
from p2pfm.core.events import (
    Accepted,
    EquivocationFound,
    MixSettings,
    ProtocolConfig,
    ReceiveEvent,
    Rejected,
    RoundComplete,
)
from p2pfm.core.identity import Identity, PeerId
from p2pfm.core.wire import Buffer, ProofHeader, TensorSpec, Update, UpdateHeader

__all__ = [  # the events and settings live in core/events.py; importing them from here keeps working
    "Accepted",
    "EquivocationFound",
    "GossipProtocol",
    "MixSettings",
    "ProtocolConfig",
    "ReceiveEvent",
    "Rejected",
    "RoundComplete",
]

# How long a neighbour's round claim counts as "heard recently", in deadlines.
_CLAIM_FRESH_DEADLINES = 2.0


_TIMED_ROUNDS = 3  # rounds back whose start is kept: a late update of those still counts as a delay
_MAX_EARLY = 4096  # bound on updates that came before their round


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
        self._buckets: dict[PeerId, tuple[float, float]] = {}  # link -> (tokens, at now_s)
        # Expected specs per tensor name: a tensor may be listed with several wire dtypes (a
        # compressing node sends keyframes and differences in different encodings).
        self._schema: dict[str, set[TensorSpec]] | None = None
        if config.schema is not None:
            self._schema = {}
            for spec in config.schema:
                self._schema.setdefault(spec.name, set()).add(spec)
        # Highest round each neighbour has shown in a validly signed head, and
        # when (now_s): catch-up targets come from these, by majority.
        self._claims: dict[PeerId, tuple[int, float]] = {}
        # Signed heads seen per neighbour and round, for rounds in
        # [round - 1, round + max_rounds_ahead]: equivocation evidence.
        self._heads: dict[PeerId, dict[int, bytes]] = {}
        self.banned: set[PeerId] = set()  # proven equivocators: refused for the rest of the run
        # Neighbours that missed the last deadline: not waited for again until
        # we hear from them, so a dead neighbour costs one deadline, not one
        # per round. Their updates still count whenever they do arrive in time.
        self.absent: set[PeerId] = set()
        self.partners: frozenset[PeerId] | None = None  # this round's, on a time-varying topology
        self.members: frozenset[PeerId] | None = config.members  # who a proof may accuse (None: neighbours)
        # Arrival delays for adaptive deadlines: when recent rounds started,
        # and updates that came before their round did (delay 0 once it starts).
        self._arrivals: ArrivalTracker[PeerId] = ArrivalTracker(margin_s=config.deadline_margin_s)
        self._pace = RoundPace()  # this node's own round durations: the least an adaptive wait is
        self._started_s: dict[int, float] = {}
        self._early: set[tuple[PeerId, int]] = set()
        self._newcomers: set[PeerId] = set()  # added by set_neighbours and not heard from since

    # --------------------------------------------------------- membership

    def set_neighbours(self, peers: Iterable[PeerId]) -> None:
        """The active view changed (p2pfm/core/membership.py): mix with ``peers`` from now on.

        A new neighbour is *absent* until it is heard: no round waits for a
        peer that may still be joining (the network never waits for a
        joiner). A removed one is forgotten, except its last (round, seq),
        which keeps refusing replays of what it sent before.
        """
        new = frozenset(peers)
        if self.identity.peer_id in new:
            raise LocalProtocolError("a node cannot be its own neighbour")
        for peer in self.neighbours - new:
            for table in (self._updates, self._claims, self._heads, self._buckets):
                table.pop(peer, None)
            self._arrivals.forget(peer)
            self.absent.discard(peer)
        self.absent |= new - self.neighbours
        self._newcomers = (self._newcomers | (new - self.neighbours)) & new
        self.neighbours = new
        if self.partners is not None:
            self.partners &= new

    def _only_newcomers(self, expected: frozenset[PeerId]) -> bool:
        live = expected - self.banned
        return bool(live) and live <= self._newcomers

    def set_members(self, members: Iterable[PeerId] | None) -> None:
        """The keys an equivocation proof may accuse (a newer roster); None: the neighbours."""
        self.members = None if members is None else frozenset(members)

    def newest_updates(self) -> dict[PeerId, Update]:
        """Each neighbour's newest accepted update (what a joiner catches up from)."""
        return {peer: by_round[max(by_round)] for peer, by_round in self._updates.items() if by_round}

    # ------------------------------------------------------------ sending

    def start_round(self, round: int, now_s: float, partners: Iterable[PeerId] | None = None) -> None:
        """Enter ``round`` (must move forward) and arm its deadline.

        ``partners``: on a time-varying topology, the neighbours this round
        mixes with (the round waits for them only, and this node's update
        carries their number as its degree); None: every neighbour.
        """
        if round <= self.round:
            raise LocalProtocolError(f"round {round} does not move forward from {self.round}")
        expected = None if partners is None else frozenset(partners)
        if expected is not None and not expected <= self.neighbours:
            raise LocalProtocolError("a round's partners must be neighbours")
        self.partners = expected
        self.round = round
        for by_round in self._updates.values():
            self._prune(by_round)
        for heads in self._heads.values():
            for old in [r for r in heads if r < round - 1]:
                del heads[old]
        self.phase = Phase.COLLECTING
        self._started_s = {r: s for r, s in self._started_s.items() if r >= round - _TIMED_ROUNDS}
        self._started_s[round] = now_s
        for peer, early_round in self._early:
            if early_round == round:
                self._arrivals.record(peer, 0.0)
        self._early = {(p, r) for p, r in self._early if r > round}
        self._pace.started(round, now_s)
        wait_s = self.config.round_timeout_s
        if self.config.adaptive_deadline and not self._only_newcomers(expected or self.neighbours):
            waited_for = (expected or self.neighbours) - self.absent - self.banned
            wait_s = self._arrivals.wait_s(waited_for, self.config.round_timeout_s)
            if self.config.pace_floor:
                wait_s = min(self.config.round_timeout_s, max(wait_s, self._pace.floor_s()))
        self.deadline_s = now_s + wait_s

    def make_update(
        self,
        tensors: Mapping[str, np.ndarray[Any, Any] | codec.Encoded],
        *,
        samples: int,
        wall_time_ms: int,
        wire_dtypes: Mapping[str, str] | None = None,
        base: int | None = None,
        resync: Sequence[PeerId] = (),
    ) -> bytes:
        """Encode and sign this node's state (or, with ``base``, a compressed difference) for the round.

        ``resync``: neighbours whose chains this node lost (compressed gossip), asked for a keyframe.
        """
        seq = self.take_seq()
        body = wire.encode_update(
            network=self.config.network,
            round=self.round,
            seq=seq,
            ts_ms=wall_time_ms,
            fingerprint=self.config.fingerprint,
            degree=len(self.neighbours if self.partners is None else self.partners),
            samples=samples,
            tensors=tensors,
            wire_dtypes=wire_dtypes,
            limits=self.config.limits,
            base=base,
            resync=resync,
        )
        return wire.sign(body, self.identity)

    def make_proof(self, evidence: tuple[bytes, bytes]) -> bytes:
        """A signed equivocation proof to pass on to the other neighbours."""
        body = wire.encode_proof(network=self.config.network, evidence=evidence, limits=self.config.limits)
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
        self,
        message: Buffer,
        now_s: float,
        wall_time_ms: int | None = None,
        *,
        link: PeerId | None = None,
    ) -> ReceiveEvent:
        """Judge one incoming message. Never raises for bad peer data.

        ``now_s`` is the monotonic clock (deadlines, rate limits);
        ``wall_time_ms`` the wall clock for the timestamp gate (None: skipped);
        ``link`` the peer authenticated on the connection the message came on
        (CurveZMQ), None when the transport cannot tell (``insecure``). A
        message signed by another key than its link's is refused.
        """
        sender: PeerId | None = link
        try:
            verified = wire.verify(message, self.config.limits, self.neighbours)
            if link is not None and verified.sender != link:
                return self._reject(link, RejectReason.SENDER_MISMATCH, f"signed by {verified.sender.short}")
            sender = verified.sender
            if sender in self.banned:
                return self._reject(sender, RejectReason.BANNED, "proven to equivocate")
            header = wire.decode_header(verified, self.config.limits)
            if isinstance(header, ProofHeader):
                return self._receive_proof(header, link or sender, now_s)
            refusal = self._head_gate(header, bytes(verified.head), now_s)
            if isinstance(refusal, EquivocationFound):
                return refusal
            if refusal is not None:
                if refusal[0] is RejectReason.STALE_ROUND:
                    self._present_again(sender, behind=True)  # alive, only behind: the next round waits
                return self._reject(sender, *refusal)
            if not self._take_token(link or sender, now_s):
                return self._reject(sender, RejectReason.RATE_LIMITED, "message rate exceeded")
            update = wire.update_of(header, wire.decode_payload(verified, header), verified.wire_bytes)
        except RemoteProtocolError as exc:
            return self._reject(sender, exc.reason, str(exc))
        gate = self._content_gate(update, wall_time_ms)
        if gate is not None:
            return self._reject(update.sender, *gate)
        by_round = self._updates.setdefault(update.sender, {})
        by_round[update.round] = update
        self._prune(by_round)
        self._present_again(update.sender, behind=False)
        self._last_key[update.sender] = (update.round, update.seq)
        self._time_arrival(update, now_s)
        self.accepted += 1
        return Accepted(update.sender, update.round, update.seq, update.wire_bytes, update)

    def _head_gate(
        self, header: UpdateHeader, head: bytes, now_s: float
    ) -> tuple[RejectReason, str] | EquivocationFound | None:
        """Everything judged from the signed head alone, before the payload is hashed."""
        if header.network != self.config.network:
            return RejectReason.WRONG_NETWORK, f"network {header.network!r}"
        if header.fingerprint != self.config.fingerprint:
            return RejectReason.FINGERPRINT_MISMATCH, "adapter fingerprint differs"
        if self._schema is not None and not _schema_matches(self._schema, header.specs):
            return RejectReason.SCHEMA_MISMATCH, "tensor names, dtypes or shapes differ"
        sender = header.sender
        heads = self._heads.setdefault(sender, {})
        seen = heads.get(header.round)
        if seen is not None and seen != head:
            self.rejections[RejectReason.EQUIVOCATION] += 1
            self.ban(sender)
            return EquivocationFound(sender, header.round, (seen, head), None, True)
        if seen is None and self.round - 1 <= header.round <= self.round + self.config.max_rounds_ahead:
            heads[header.round] = head
        claimed, _ = self._claims.get(sender, (-1, now_s))
        self._claims[sender] = (max(claimed, header.round), now_s)
        last = self._last_key.get(sender)
        if last is not None and (header.round, header.seq) <= last:
            return RejectReason.REPLAY, f"(round, seq) {(header.round, header.seq)} <= {last}"
        if header.round < self.round:
            return RejectReason.STALE_ROUND, f"round {header.round} < current {self.round}"
        if header.round > self.round + self.config.max_rounds_ahead:
            ahead = header.round - self.round
            return RejectReason.FUTURE_ROUND, f"round {header.round} is {ahead} ahead of ours ({self.round})"
        return None

    def _receive_proof(self, proof: ProofHeader, via: PeerId, now_s: float) -> ReceiveEvent:
        if proof.network != self.config.network:
            return self._reject(via, RejectReason.WRONG_NETWORK, f"proof for network {proof.network!r}")
        if not self._take_token(via, now_s):
            return self._reject(via, RejectReason.RATE_LIMITED, "message rate exceeded")
        try:
            facts = wire.check_evidence(*proof.evidence, self.config.limits)
        except RemoteProtocolError as exc:
            return self._reject(via, RejectReason.MALFORMED, f"equivocation proof: {exc}")
        if facts.network != self.config.network or facts.fingerprints != (self.config.fingerprint,) * 2:
            return self._reject(
                via, RejectReason.MALFORMED, "equivocation proof for another network or model"
            )
        members = self.neighbours if self.members is None else self.members
        if facts.accused not in members and facts.accused != self.identity.peer_id:
            return self._reject(via, RejectReason.UNKNOWN_SENDER, "equivocation proof about a non-member")
        new = facts.accused not in self.banned and facts.accused != self.identity.peer_id
        if new:
            self.ban(facts.accused)
        return EquivocationFound(facts.accused, facts.round, proof.evidence, proof.sender, new)

    def ban(self, peer: PeerId) -> None:
        """Refuse ``peer`` for the rest of the run and forget what it sent."""
        self.banned.add(peer)
        for table in (self._updates, self._claims, self._heads):
            table.pop(peer, None)
        self._arrivals.forget(peer)

    def _present_again(self, peer: PeerId, *, behind: bool) -> None:
        self._newcomers.discard(peer)
        self._mark_present(peer, behind=behind)

    def _mark_present(self, peer: PeerId, *, behind: bool) -> None:
        """A neighbour that missed a deadline is heard again, so waited for again.

        One that is ``behind`` (it sent a stale round: restarted, or stalled)
        is out of phase: its old delays say nothing, and the current round
        gets a newcomer's full round_timeout_s for it to catch up. One that is
        in step (its message of a round was lost, say) keeps its timing.
        """
        if peer in self.absent:
            self.absent.discard(peer)
            if behind:
                self._arrivals.forget(peer)
                started_s = self._started_s.get(self.round)
                if self.phase is Phase.COLLECTING and started_s is not None:
                    self.deadline_s = max(self.deadline_s, started_s + self.config.round_timeout_s)

    def _time_arrival(self, update: Update, now_s: float) -> None:
        """Note how long after its round started an update came (late ones too: they set the next wait)."""
        started_s = self._started_s.get(update.round)
        if started_s is not None:
            self._arrivals.record(update.sender, now_s - started_s)
        elif update.round > self.round and len(self._early) < _MAX_EARLY:
            self._early.add((update.sender, update.round))

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

    def _take_token(self, link: PeerId, now_s: float) -> bool:
        """Token bucket per link: bounded work per connection, whatever it sends."""
        rate, burst = self.config.max_messages_per_s, float(self.config.message_burst)
        tokens, then = self._buckets.get(link, (burst, now_s))
        tokens = min(burst, tokens + max(0.0, now_s - then) * rate)
        if tokens < 1.0:
            self._buckets[link] = (tokens, now_s)
            return False
        self._buckets[link] = (tokens - 1.0, now_s)
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
        accepted message. Banned neighbours are never waited for.
        """
        if self.phase is not Phase.COLLECTING:
            return None
        expected = self._expected()
        fresh = self._fresh(expected)
        waiting_for = expected - self.absent - self.banned - fresh.keys()
        timed_out = now_s >= self.deadline_s
        if waiting_for and not timed_out:
            return None
        if not fresh and not timed_out and self._only_newcomers(expected):
            # Every neighbour is new and none has been heard yet (they may all still be joining): wait
            # for any of them until the deadline rather than run through rounds alone (the first node
            # of a network would otherwise be rounds ahead before the others have joined).
            return None
        self.phase = Phase.COMPLETE
        missing = expected - fresh.keys()
        self.absent = set(missing)
        weights = metropolis_weights(len(expected), {p: u.degree for p, u in fresh.items()})
        return RoundComplete(self.round, fresh, frozenset(missing), timed_out and bool(waiting_for), weights)

    def waiting_for(self) -> frozenset[PeerId]:
        """The neighbours the round being collected still waits for (empty when not collecting)."""
        if self.phase is not Phase.COLLECTING:
            return frozenset()
        expected = self._expected()
        return frozenset(expected - self.absent - self.banned - self._fresh(expected).keys())

    def _expected(self) -> frozenset[PeerId]:
        return self.neighbours if self.partners is None else self.partners

    def _fresh(self, expected: frozenset[PeerId]) -> dict[PeerId, Update]:
        """Each expected neighbour's update that counts for this round, where one arrived."""
        fresh = {}
        for peer in expected:
            by_round = self._updates.get(peer)
            # The neighbour's state of exactly this round when we have it (the
            # synchronous iteration); else its newest, fresher one.
            if not by_round:
                continue
            update = by_round.get(self.round) or by_round[max(by_round)]
            if update.round >= self.round:
                fresh[peer] = update
        return fresh

    def heard_claims(self, now_s: float) -> dict[PeerId, int]:
        """Each neighbour's highest claimed round, for those heard within two deadlines."""
        fresh_s = _CLAIM_FRESH_DEADLINES * self.config.round_timeout_s
        return {p: r for p, (r, at_s) in self._claims.items() if now_s - at_s <= fresh_s}

    def catch_up_target(self, next_round: int, now_s: float) -> int:
        """The round to run next: ``next_round``, or a later one the neighbours confirm.

        A later round counts only when a strict majority of the neighbours
        heard recently claim at least that round, so one liar among two or
        more cannot move us. With a single neighbour heard there is nobody to
        outvote it: we follow it, by at most ``max_rounds_ahead`` per call.
        """
        claims = sorted(self.heard_claims(now_s).values(), reverse=True)
        if not claims:
            return next_round
        target = claims[len(claims) // 2]  # claimed (or exceeded) by len // 2 + 1 neighbours
        if len(claims) == 1:
            target = min(target, next_round + self.config.max_rounds_ahead)
        return max(target, next_round)

    def _prune(self, by_round: dict[int, Update]) -> None:
        newest = max(by_round)
        for round_ in [r for r in by_round if r not in (newest, self.round)]:
            del by_round[round_]


def _schema_matches(expected: Mapping[str, set[TensorSpec]], specs: Sequence[TensorSpec]) -> bool:
    return len(specs) == len(expected) and all(s in expected.get(s.name, ()) for s in specs)
