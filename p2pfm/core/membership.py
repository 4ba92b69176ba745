"""Sans-I/O membership: who a node's neighbours are, in an open network that heals itself.

Beside the gossip protocol (p2pfm/core/protocol.py) and in its style: no
sockets, no clock, no threads. The caller feeds received control messages
(p2pfm/core/control.py) and the time; the state machine answers with the
messages to send (``Outgoing``: recipient, address, bytes) and keeps its
views, which the node's driver applies to the gossip protocol and the
transport after every call (``changes`` says what moved).

The shape is HyParView's (Leitao, Pereira, Rodrigues 2007), as iroh-gossip
keeps it:

- an **active view** of about ``degree`` neighbours, the peers this node
  mixes with. Links are symmetric: a peer enters it only through a
  ``neighbour`` request one side sends and the other accepts, and leaves it
  with a ``disconnect`` to the other side (or when it is found dead), so
  both ends count the link and Metropolis weights from the degrees carried
  in updates keep the mixing matrix doubly stochastic. A node below
  ``degree`` asks passive peers; it accepts requests up to ``degree +
  slack`` (so that nobody is stuck one short because every candidate is
  exactly full); a request marked ``high`` (the asker has no neighbour at
  all) is accepted even when full, by dropping a random neighbour.
- a **passive view** of up to ``passive_size`` signed peer records: the
  candidates that replace dead neighbours. It is fed by joins walking the
  overlay (``forward_join``), by ``shuffle`` walks that swap samples, and by
  the hints every reply carries.
- **failure detection** by rounds: a neighbour that has said nothing (no
  update, no control message) for a whole round is pinged; one silent for
  ``suspect_rounds`` rounds is dead, dropped, and replaced.
- **admission** by the roster document (p2pfm/core/records.py): messages and
  records of keys it does not admit are refused; a newer document, passed
  on to every peer that shows an older version (``rv``), removes keys
  everywhere within a few rounds.

Every number a peer sends is bounded (ttl, record counts, sizes), every
view, table and queue is bounded, nothing unsigned is believed, and
``receive`` never raises on peer input: refusals are counted by reason.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from p2pfm.core.control import MAX_TTL, Control, ControlLimits, decode_control, encode_control
from p2pfm.core.errors import LocalProtocolError, RejectReason, RemoteProtocolError
from p2pfm.core.identity import Identity, PeerId
from p2pfm.core.records import PeerRecord, RosterDocument, newer_roster, open_roster_document
from p2pfm.core.wire import Buffer

_MAX_SENDERS = 4096  # senders whose last seq is remembered (replay window)
_MAX_TRIED = 1024  # candidates that recently refused or timed out
_SPARE_ASKS = 2  # neighbour requests in flight beyond the missing neighbours
_MAX_ADDRESS_BOOK = 4096  # records kept to answer peers that are in no view (pings, strangers)


@dataclass(frozen=True)
class MembershipConfig:
    """How a node keeps its views (``[membership]``; docs/membership.md justifies the defaults)."""

    network: str
    degree: int = 6  # active view size aimed at
    slack: int = 1  # requests are accepted up to degree + slack neighbours
    passive_size: int = 32
    join_ttl: int = 4  # length of a join's random walks (HyParView's ARWL)
    passive_ttl: int = 2  # walkers with this ttl left keep the joiner as a candidate (PRWL)
    shuffle_ttl: int = 2
    shuffle_active: int = 3  # records from the active view in a shuffle
    shuffle_passive: int = 4  # ... and from the passive view
    request_timeout_s: float = 5.0  # an unanswered neighbour request is given up after this
    retry_after_s: float = 30.0  # a candidate that refused or timed out is not asked again before this
    suspect_rounds: int = 2  # rounds without a word after which a neighbour is dead
    max_messages_per_s: float = 20.0  # control messages per sender
    message_burst: int = 64
    limits: ControlLimits = field(default_factory=ControlLimits)

    def __post_init__(self) -> None:
        checks = (
            (self.degree >= 1, "degree must be >= 1"),
            (self.slack >= 0, "slack must be >= 0"),
            (self.passive_size >= 1, "passive_size must be >= 1"),
            (
                0 <= self.passive_ttl <= self.join_ttl <= MAX_TTL,
                f"need 0 <= passive_ttl <= join_ttl <= {MAX_TTL}",
            ),
            (0 <= self.shuffle_ttl <= MAX_TTL, f"shuffle_ttl must be in [0, {MAX_TTL}]"),
            (self.request_timeout_s > 0 and self.retry_after_s >= 0, "timeouts must be > 0"),
            (self.suspect_rounds >= 1, "suspect_rounds must be >= 1"),
            (self.max_messages_per_s > 0 and self.message_burst >= 1, "rate limits must be positive"),
        )
        for ok, problem in checks:
            if not ok:
                raise LocalProtocolError(f"membership: {problem}")

    @property
    def max_active(self) -> int:
        return self.degree + self.slack


@dataclass(frozen=True)
class Outgoing:
    """A control message to send to ``to`` at ``address``."""

    to: PeerId
    address: str
    kind: str
    message: bytes


@dataclass(frozen=True)
class ViewChange:
    """A peer entered (``up``) or left the active view, and why."""

    peer: PeerId
    up: bool
    reason: str  # accepted, asked, dead, disconnected, left, evicted, removed, full


class Membership:
    """One node's views and the messages that keep them (module docstring)."""

    def __init__(
        self,
        identity: Identity,
        config: MembershipConfig,
        roster: RosterDocument,
        record: PeerRecord,
        *,
        seed: int,
        seq_start: int = 0,
    ) -> None:
        if record.peer != identity.peer_id:
            raise LocalProtocolError("the node's own record must be signed by its own key")
        if roster.network != config.network or record.network != config.network:
            raise LocalProtocolError("roster, record and config must name the same network")
        self.identity, self.config, self.roster, self.record = identity, config, roster, record
        self.me = identity.peer_id
        self.active: dict[PeerId, PeerRecord] = {}
        self.passive: OrderedDict[PeerId, PeerRecord] = OrderedDict()
        # Neighbour requests in flight: the record asked, when, and whether with high priority.
        self.pending: dict[PeerId, tuple[PeerRecord, float, bool]] = {}
        self.changes: list[ViewChange] = []  # what moved since the driver last looked (it clears this)
        self.refusals: Counter[RejectReason] = Counter()
        self.sent: Counter[str] = Counter()  # by kind
        self.received: Counter[str] = Counter()
        self.left = False  # we left gracefully: nothing more is sent
        self.removed = False  # a roster version removed us
        self._rng = random.Random(seed)
        self._seq = seq_start
        self._strikes: dict[PeerId, int] = {}
        self._heard: set[PeerId] = set()  # active neighbours heard since the last round ended
        self._last_seq: OrderedDict[PeerId, int] = OrderedDict()
        self._tried: OrderedDict[PeerId, float] = OrderedDict()  # peer -> when it refused or timed out
        self._buckets: dict[PeerId, tuple[float, float]] = {}
        self._roster_sent: OrderedDict[PeerId, int] = OrderedDict()
        # Peers that left, with their record's seq then: relayed copies of that record are not believed
        # again (a member that rejoins signs a newer record).
        self._gone: OrderedDict[PeerId, int] = OrderedDict()
        self._book: OrderedDict[PeerId, PeerRecord] = OrderedDict()  # every record seen, newest kept (LRU)
        self._contacts: list[PeerRecord] = []  # the bootstrap records, for a rejoin when all views are empty
        self._last_join_s = -float("inf")
        self._last_eviction_s = -float("inf")

    # ------------------------------------------------------------- queries

    @property
    def neighbours(self) -> frozenset[PeerId]:
        return frozenset(self.active)

    def address_of(self, peer: PeerId) -> str | None:
        record = self._record_of(peer)
        return None if record is None else record.address

    def _record_of(self, peer: PeerId) -> PeerRecord | None:
        return self.active.get(peer) or self.passive.get(peer) or self._book.get(peer)

    # ------------------------------------------------------------- actions

    def join(self, contacts: Sequence[PeerRecord], now_s: float) -> list[Outgoing]:
        """Ask ``contacts`` (records of members, e.g. resolved bootstrap addresses) to let us in."""
        self._contacts = [c for c in contacts if c.peer != self.me][:8]
        self._last_join_s = now_s
        return [
            self._send(c, "join", record=self.record) for c in self._contacts if self.roster.admits(c.peer)
        ]

    def seed_views(self, active: Iterable[PeerRecord], passive: Iterable[PeerRecord]) -> None:
        """Start with known views (a restart, or a pre-wired network): no messages needed."""
        for record in active:
            if (
                record.peer != self.me
                and self.roster.admits(record.peer)
                and len(self.active) < self.config.max_active
            ):
                self._add_active(record, "seeded")
        for record in passive:
            self._learn(record)

    def leave(self) -> list[Outgoing]:
        """A graceful leave: tell every neighbour at once; send nothing after."""
        out = [self._send(r, "disconnect", leave=True) for r in self.active.values()]
        for peer in list(self.active):
            self._drop_active(peer, "left")
        self.left = True
        return out

    def heard(self, peer: PeerId) -> None:
        """Any authenticated message from ``peer`` (an update too) shows it is alive."""
        if peer in self.active:
            self._heard.add(peer)

    def not_a_neighbour(self, peer: PeerId) -> list[Outgoing]:
        """``peer`` sends us updates but is not in our active view: tell it so (it then repairs its view)."""
        record = self._record_of(peer)
        if record is None or self.left or peer in self.active:
            return []
        return [self._send(record, "disconnect", leave=False)]

    def round_ended(self, now_s: float) -> list[Outgoing]:
        """Once per gossip round: failure detection, one shuffle, and refilling the active view."""
        if self.left:
            return []
        out: list[Outgoing] = []
        for peer in list(self.active):
            if peer in self._heard:
                self._strikes[peer] = 0
                continue
            strikes = self._strikes.get(peer, 0) + 1
            self._strikes[peer] = strikes
            if strikes >= self.config.suspect_rounds:
                self._drop_active(peer, "dead")
                self.passive.pop(peer, None)
                self._note_tried(peer, now_s)
            else:
                out.append(self._send(self.active[peer], "ping"))
        self._heard.clear()
        if self.active:
            target = self.active[self._rng.choice(list(self.active))]
            records = self._sample(self.active, self.config.shuffle_active, exclude={target.peer})
            records += self._sample(self.passive, self.config.shuffle_passive, exclude={target.peer})
            out.append(
                self._send(
                    target, "shuffle", record=self.record, records=records, ttl=self.config.shuffle_ttl
                )
            )
        return out + self.tick(now_s)

    def tick(self, now_s: float) -> list[Outgoing]:
        """Give up unanswered requests and ask new candidates while the active view is short."""
        if self.left or self.removed:
            return []
        for peer, (_, sent_s, _) in list(self.pending.items()):
            if now_s - sent_s >= self.config.request_timeout_s:
                del self.pending[peer]
                self.passive.pop(peer, None)  # it did not answer: not a good candidate
                self._note_tried(peer, now_s)
        out: list[Outgoing] = []
        # Ask a couple more candidates than missing neighbours: some in the passive view are dead, and
        # each would cost a request timeout. Accepts beyond degree + slack are undone (a disconnect).
        asks = self.config.degree - len(self.active) + _SPARE_ASKS - len(self.pending)
        if len(self.active) < self.config.degree and asks > 0:
            retry_s = self.config.retry_after_s
            candidates = [
                r for p, r in self.passive.items()
                if p not in self.pending and now_s - self._tried.get(p, -float("inf")) >= retry_s
            ]  # fmt: skip
            self._rng.shuffle(candidates)
            for record in candidates[:asks]:
                # High priority (accepted even by a full peer, which drops one of its own) only while we
                # have no neighbour and no other such request out: one, not a burst of evictions.
                high = not self.active and not any(h for _, _, h in self.pending.values())
                self.pending[record.peer] = (record, now_s, high)
                out.append(self._send(record, "neighbour", record=self.record, high=high))
        alone = not self.active and not self.passive and not self.pending
        if alone and self._contacts and now_s - self._last_join_s >= self.config.request_timeout_s:
            out += self.join(self._contacts, now_s)  # everyone we knew is gone: ask the contacts again
        return out

    def next_timer_s(self) -> float | None:
        """When ``tick`` next has something to do (a request times out), if ever."""
        if not self.pending:
            return None
        return min(sent_s for _, sent_s, _ in self.pending.values()) + self.config.request_timeout_s

    # ----------------------------------------------------------- receiving

    def receive(self, message: Buffer, now_s: float, *, link: PeerId | None = None) -> list[Outgoing]:
        """Judge one control message and answer it. Never raises on peer input."""
        if link is not None and not self._take_token(link, now_s):
            return self._refuse(RejectReason.RATE_LIMITED)
        try:
            control = decode_control(message, self.config.network, self.config.limits)
        except RemoteProtocolError as exc:
            return self._refuse(exc.reason)
        sender = control.sender
        if link is not None and sender != link:
            return self._refuse(RejectReason.SENDER_MISMATCH)
        if link is None and not self._take_token(sender, now_s):
            return self._refuse(RejectReason.RATE_LIMITED)
        if control.to != self.me:
            return self._refuse(RejectReason.WRONG_RECIPIENT)
        if not self.roster.admits(sender) and control.kind != "roster":
            # A key an older roster admitted learns why it is refused: the newer roster (once per version).
            return self._refuse(RejectReason.UNKNOWN_SENDER) + self._roster_for(control)
        if control.seq <= self._last_seq.get(sender, -1):
            return self._refuse(RejectReason.REPLAY)
        self._last_seq[sender] = control.seq
        self._last_seq.move_to_end(sender)
        if len(self._last_seq) > _MAX_SENDERS:
            self._last_seq.popitem(last=False)
        self.received[control.kind] += 1
        if self.left:
            return []
        self.heard(sender)
        if control.record is not None and control.record.peer == sender:
            self._remember(control.record)  # to answer it later; the views decide whether it is a candidate
        out = self._dispatch(control, now_s)
        return out + self._roster_for(control) + self.tick(now_s)

    def _dispatch(self, c: Control, now_s: float) -> list[Outgoing]:
        handler = getattr(self, f"_on_{c.kind}")
        out: list[Outgoing] = handler(c, now_s)
        return out

    def _on_join(self, c: Control, now_s: float) -> list[Outgoing]:
        assert c.record is not None
        if c.record.peer != c.sender:
            return self._refuse(RejectReason.MALFORMED)
        self._learn(c.record)
        hints = [
            self.record,
            *self._sample(self.active, self.config.limits.max_records // 2, exclude={c.sender}),
        ]
        hints += self._sample(self.passive, self.config.limits.max_records - len(hints), exclude={c.sender})
        out = [self._send(c.record, "join_reply", records=hints)]
        # Walks into the overlay: their ends offer the joiner a link (HyParView's forward join).
        for peer in self._sample_peers(self.active, self.config.degree, exclude={c.sender}):
            out.append(
                self._send(self.active[peer], "forward_join", record=c.record, ttl=self.config.join_ttl)
            )
        if len(self.active) < self.config.degree:
            out += self._offer(c.record, now_s)
        return out

    def _on_join_reply(self, c: Control, now_s: float) -> list[Outgoing]:
        for record in c.records:
            self._learn(record)
        return []

    def _on_forward_join(self, c: Control, now_s: float) -> list[Outgoing]:
        assert c.record is not None
        joiner = c.record.peer
        if joiner == self.me or joiner in self.active or not self.roster.admits(joiner):
            return []
        if c.ttl == 0 or len(self.active) <= 1:
            self._learn(c.record)
            return self._offer(c.record, now_s) if len(self.active) < self.config.max_active else []
        if c.ttl == self.config.passive_ttl:
            self._learn(c.record)
        onward = self._sample_peers(self.active, 1, exclude={c.sender, joiner})
        if not onward:
            self._learn(c.record)
            return self._offer(c.record, now_s) if len(self.active) < self.config.max_active else []
        return [self._send(self.active[onward[0]], "forward_join", record=c.record, ttl=c.ttl - 1)]

    def _on_neighbour(self, c: Control, now_s: float) -> list[Outgoing]:
        assert c.record is not None
        if c.record.peer != c.sender:
            return self._refuse(RejectReason.MALFORMED)
        hints = self._sample(self.passive, self.config.shuffle_passive, exclude={c.sender})
        out: list[Outgoing] = []
        if c.sender not in self.active:
            # A full node makes room for a peer with no neighbour at all, but at most once per
            # request_timeout_s: a member re-asking with high priority cannot churn our views.
            evict_ok = now_s - self._last_eviction_s >= self.config.request_timeout_s
            if len(self.active) >= self.config.max_active and c.high and evict_ok:
                self._last_eviction_s = now_s
                victim = self._rng.choice(list(self.active))
                out.append(self._send(self.active[victim], "disconnect", leave=False))
                self._drop_active(victim, "evicted")
            if len(self.active) >= self.config.max_active:
                self._learn(c.record)
                return [
                    self._send(c.record, "neighbour_reply", accept=False, record=self.record, records=hints)
                ]
            self.pending.pop(c.sender, None)
            self._add_active(c.record, "asked")
        return [*out, self._send(c.record, "neighbour_reply", accept=True, record=self.record, records=hints)]

    def _on_neighbour_reply(self, c: Control, now_s: float) -> list[Outgoing]:
        asked = self.pending.pop(c.sender, None)
        for hint in c.records:
            self._learn(hint)
        assert c.record is not None
        if c.record.peer != c.sender:
            return self._refuse(RejectReason.MALFORMED)
        record = asked[0] if asked else c.record
        if not c.accept:
            self._note_tried(c.sender, now_s)
            return []
        if c.sender in self.active:
            return []
        if len(self.active) >= self.config.max_active:  # filled up meanwhile: undo the other side's link
            return [self._send(record, "disconnect", leave=False)]
        self._add_active(record, "accepted")
        return []

    def _on_disconnect(self, c: Control, now_s: float) -> list[Outgoing]:
        self.pending.pop(c.sender, None)
        if c.sender in self.active:
            record = self.active[c.sender]
            self._drop_active(c.sender, "left" if c.leave else "disconnected")
            if not c.leave:
                self._learn(record)
        if c.leave:
            gone = self.passive.pop(c.sender, None) or self._book.get(c.sender)
            self._gone[c.sender] = gone.seq if gone is not None else 0
            if len(self._gone) > _MAX_TRIED:
                self._gone.popitem(last=False)
            self._note_tried(c.sender, now_s)
        else:
            self._note_tried(c.sender, now_s)  # it just dropped us: do not ask it straight back
        return []

    def _on_shuffle(self, c: Control, now_s: float) -> list[Outgoing]:
        assert c.record is not None
        origin = c.record
        if c.ttl > 0 and len(self.active) > 1:
            onward = self._sample_peers(self.active, 1, exclude={c.sender, origin.peer})
            if onward:
                return [
                    self._send(
                        self.active[onward[0]], "shuffle", record=origin, records=c.records, ttl=c.ttl - 1
                    )
                ]
        if origin.peer == self.me:
            return []
        reply = self._sample(self.passive, max(1, len(c.records)), exclude={origin.peer})
        for record in (origin, *c.records):
            self._learn(record)
        return [self._send(origin, "shuffle_reply", records=reply)]

    def _on_shuffle_reply(self, c: Control, now_s: float) -> list[Outgoing]:
        for record in c.records:
            self._learn(record)
        return []

    def _on_ping(self, c: Control, now_s: float) -> list[Outgoing]:
        record = self._record_of(c.sender)
        if record is None:
            return []
        if c.sender not in self.active:  # it thinks we are linked: we are not, tell it
            return [self._send(record, "disconnect", leave=False)]
        return [self._send(record, "pong")]

    def _on_pong(self, c: Control, now_s: float) -> list[Outgoing]:
        return []

    def _on_roster(self, c: Control, now_s: float) -> list[Outgoing]:
        try:
            document = open_roster_document(c.document, self.config.network, self.config.limits.records)
            if not newer_roster(self.roster, document):
                return []
        except RemoteProtocolError as exc:
            return self._refuse(exc.reason)
        self.apply_roster(document)
        return []

    def apply_roster(self, document: RosterDocument) -> None:
        """Adopt a newer roster (checked by the caller or ``receive``): drop every key it no longer admits."""
        self.roster = document
        for peer in [p for p in self.active if not document.admits(p)]:
            self._drop_active(peer, "removed")
        for table in (self.passive, self.pending):
            for peer in [p for p in table if not document.admits(p)]:
                del table[peer]
        self.removed = not document.admits(self.me)

    # ------------------------------------------------------------- helpers

    def _roster_for(self, c: Control) -> list[Outgoing]:
        """Pass our roster on to a peer that shows an older version (once per peer and version)."""
        if c.rv >= self.roster.version or self._roster_sent.get(c.sender) == self.roster.version:
            return []
        record = c.record if c.record is not None and c.record.peer == c.sender else None
        record = record or self._record_of(c.sender)
        if record is None:
            return []
        self._roster_sent[c.sender] = self.roster.version
        if len(self._roster_sent) > _MAX_SENDERS:
            self._roster_sent.popitem(last=False)
        return [self._send(record, "roster", document=self.roster.signed)]

    def _offer(self, record: PeerRecord, now_s: float) -> list[Outgoing]:
        if record.peer in self.active or record.peer in self.pending:
            return []
        self.pending[record.peer] = (record, now_s, False)
        return [self._send(record, "neighbour", record=self.record, high=False)]

    def _learn(self, record: PeerRecord) -> None:
        """Keep a candidate (a newer record of a known peer replaces the older one)."""
        peer = record.peer
        if peer == self.me or not self.roster.admits(peer):
            if peer != self.me:
                self.refusals[RejectReason.UNKNOWN_SENDER] += 1
            return
        if record.seq <= self._gone.get(peer, -1):
            return  # a relayed copy of the record of a peer that left
        self._remember(record)
        if peer in self.active:
            if record.seq > self.active[peer].seq:
                self.active[peer] = record
            return
        known = self.passive.get(peer)
        if known is not None:
            if record.seq > known.seq:
                self.passive[peer] = record
            return
        self.passive[peer] = record
        if len(self.passive) > self.config.passive_size:
            victims = list(self.passive)[:-1]  # never the one just learned
            del self.passive[self._rng.choice(victims)]

    def _remember(self, record: PeerRecord) -> None:
        known = self._book.get(record.peer)
        if known is None or record.seq >= known.seq:
            self._book[record.peer] = record
            self._book.move_to_end(record.peer)
            if len(self._book) > _MAX_ADDRESS_BOOK:
                self._book.popitem(last=False)

    def _add_active(self, record: PeerRecord, reason: str) -> None:
        self.passive.pop(record.peer, None)
        self.active[record.peer] = record
        self._strikes[record.peer] = 0
        self._heard.add(record.peer)  # a fresh link gets a whole round before it is suspected
        self.changes.append(ViewChange(record.peer, True, reason))

    def _drop_active(self, peer: PeerId, reason: str) -> None:
        del self.active[peer]
        self._strikes.pop(peer, None)
        self._heard.discard(peer)
        self.changes.append(ViewChange(peer, False, reason))

    def _note_tried(self, peer: PeerId, now_s: float) -> None:
        self._tried[peer] = now_s
        self._tried.move_to_end(peer)
        if len(self._tried) > _MAX_TRIED:
            self._tried.popitem(last=False)

    def _sample_peers(self, table: dict[PeerId, PeerRecord], k: int, *, exclude: set[PeerId]) -> list[PeerId]:
        peers = [p for p in table if p not in exclude]
        return self._rng.sample(peers, min(k, len(peers)))

    def _sample(self, table: dict[PeerId, PeerRecord], k: int, *, exclude: set[PeerId]) -> list[PeerRecord]:
        return [table[p] for p in self._sample_peers(table, max(0, k), exclude=exclude)]

    def _send(self, target: PeerRecord, kind: str, /, **fields: object) -> Outgoing:
        self._seq += 1
        self.sent[kind] += 1
        message = encode_control(
            self.identity, kind=kind, network=self.config.network, to=target.peer, seq=self._seq,
            rv=self.roster.version, **fields,
        )  # fmt: skip
        return Outgoing(target.peer, target.address, kind, message)

    def _take_token(self, peer: PeerId, now_s: float) -> bool:
        rate, burst = self.config.max_messages_per_s, float(self.config.message_burst)
        tokens, then = self._buckets.get(peer, (burst, now_s))
        tokens = min(burst, tokens + max(0.0, now_s - then) * rate)
        ok = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if ok else tokens, now_s)
        if len(self._buckets) > _MAX_SENDERS:  # full buckets carry no state worth keeping
            for key in [k for k, (t, _) in self._buckets.items() if t >= burst - 1.0][
                : len(self._buckets) // 2
            ]:
                del self._buckets[key]
        return ok

    def _refuse(self, reason: RejectReason) -> list[Outgoing]:
        self.refusals[reason] += 1
        return []
