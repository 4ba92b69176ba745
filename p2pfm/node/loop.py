"""The node loop: each round is train -> exchange -> mix -> record.

One round ``r`` on this node (adapt-then-combine D-PSGD):

1. **train** ``local_steps`` on the local shard (messages that arrive
   meanwhile wait in the transport's bounded inbox);
2. **exchange**: ``protocol.start_round(r)`` arms the deadline; the
   publishing strategy's messages (an honest node: one signed update) are
   recorded as sent, then queued to every neighbour without blocking;
   incoming messages are judged by the protocol until every present
   neighbour has delivered round >= r or the deadline passes;
3. **mix**: the round's ``RoundComplete`` combines the node's state with
   what arrived under ``gossip.rule`` (a missing neighbour's weight stays
   here); the node's algorithm (``gossip.algorithm``,
   p2pfm/learn/algorithm.py) turns the mix into the next round's start,
   written back into the learner;
4. **record**: evaluation, checkpoint, metrics line.

``Node.run`` drives these steps on real time over a real transport. The
simulator (p2pfm/lab/sim.py) drives the very same steps of many nodes on a
virtual clock; only the waiting in step 2 differs, so the two cannot drift.

A node that restarts with ``--resume`` reloads its checkpoint, listens for
up to one deadline to learn its neighbours' rounds, and jumps to the round a
strict majority of them confirm instead of making them wait (never past
``gossip.rounds``; skipped rounds are not counted as trained). Before it
sends an update it records the round and sequence number (the store makes
that durable), so that a crash between sending and checkpointing resumes
into a fresh round and never signs a second, different update for a round
it already sent (which its neighbours would rightly take as equivocation).

Build a node from its config with ``p2pfm.node.factory.build_node``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from p2pfm.config.settings import GossipSettings
from p2pfm.core.compression import NeighbourEstimates, OwnEstimate, choco_mix
from p2pfm.core.errors import RejectReason
from p2pfm.core.evidence import encode_evidence
from p2pfm.core.identity import PeerId
from p2pfm.core.logs import node_logger
from p2pfm.core.protocol import (
    Accepted,
    EquivocationFound,
    GossipProtocol,
    MixSettings,
    Phase,
    Rejected,
    RoundComplete,
)
from p2pfm.learn.aggregation import aggregation_error
from p2pfm.learn.algorithm import RoundAlgorithm
from p2pfm.learn.checkpoint import Checkpoint
from p2pfm.learn.learner import Array, Learner
from p2pfm.net.link import Transport, TransportStats
from p2pfm.node.clock import Clock
from p2pfm.node.overlay import Overlay, catch_up_state
from p2pfm.node.publishing import Publisher
from p2pfm.node.store import NodeStore

POLL_S = 0.05  # receive granularity while waiting for neighbours
WAIT_NOTICE_S = 10.0  # a round that waited this long for its neighbours says whom it waits for
JOIN_WINDOWS = (
    5  # a joiner that holds no state after this many round_timeout_s gives up (the network is gone)
)
_PROOF_SENDS = 3  # rounds an equivocation proof is sent in (the receiver's inbox keeps only the newest)


@dataclass(frozen=True)
class RoundPlan:
    """The schedule a node follows (from ``[train]`` and ``[gossip]``)."""

    rounds: int
    local_steps: int
    samples_per_round: int  # what an update claims (local_steps x batch_size)
    eval_every: int = 1  # 1 also evaluates before training (round 0)
    snapshot_every: int = 0  # 0: never
    # A time-varying topology: the neighbours each round mixes with (None: all of them, every round).
    partners: Callable[[int], tuple[PeerId, ...]] | None = None
    consensus_rounds: int = 0  # the last this many of ``rounds`` only mix (no local steps)
    overlap: bool = False  # exchange beside the next round's training (``gossip.overlap``)

    def steps_in(self, round_: int) -> int:
        """Local steps of round ``round_``."""
        return 0 if round_ > self.rounds - self.consensus_rounds else self.local_steps


@dataclass(frozen=True)
class Trained:
    loss: float | None
    train_s: float  # clock seconds the learner took (a slow fault included)


@dataclass(frozen=True)
class Opening:
    """Where a node starts: round ``next_round``, after listening until ``listen_until_s`` (a resume)."""

    next_round: int
    resumed: bool = False  # restored from the store: call ``Node.opened`` before the first round
    listen_until_s: float | None = None  # a resumed node with neighbours listens for their rounds until then
    joining: bool = False  # an open network's new or returning member: ``Node.joined`` says when to start


@dataclass(frozen=True)
class NodeResult:
    rounds_completed: int  # the last round this node reached (skipped rounds included)
    rounds_trained: int  # rounds it actually ran (trained, exchanged, mixed)
    final_eval: dict[str, float]
    stopped: bool  # True when a signal stopped the node before the last round
    adapter_saved: bool = True  # False: the final adapter could not be written (the checkpoint holds it)


@dataclass
class Compressed:
    """``gossip.compression``: this node's public estimate and its neighbours' (p2pfm/core/compression.py).

    The publisher sends the changes of ``own``; every accepted update
    advances ``neighbours``; a round mixes the estimates with ``step``.
    """

    own: OwnEstimate
    neighbours: NeighbourEstimates
    step: float


@dataclass
class _InFlight:
    """A published round whose exchange runs on its own thread (``Node.launch``)."""

    abandon: threading.Event
    thread: threading.Thread | None = None
    done: RoundComplete | None = None
    mixed: dict[str, Array] | None = None
    error: BaseException | None = None


@dataclass
class _PendingProof:
    message: bytes
    to: list[PeerId]
    sends_left: int = _PROOF_SENDS


class Node:
    """One gossip participant, assembled from its parts (``build_node`` does that from a config)."""

    def __init__(
        self,
        *,
        name: str,
        protocol: GossipProtocol,
        learner: Learner,
        transport: Transport | None,  # None: train alone, never mix (the `local` baseline)
        publisher: Publisher,
        mix_settings: MixSettings,
        plan: RoundPlan,
        store: NodeStore,
        clock: Clock,
        peer_names: Mapping[PeerId, str],
        resume: bool = False,
        stop: threading.Event | None = None,
        facts: Mapping[str, Any] | None = None,  # extra fields of the start/resume record
        overlay: Overlay | None = None,  # open membership (p2pfm/node/overlay.py); None: fixed neighbours
        algorithm: RoundAlgorithm | None = None,  # None: dpsgd (the mix is the next state)
        compressed: Compressed | None = None,  # gossip.compression; None: full states travel
    ) -> None:
        self.name, self.protocol, self.learner, self.transport = name, protocol, learner, transport
        self.publisher, self.mix_settings, self.plan, self.store = publisher, mix_settings, plan, store
        self.clock, self.peer_names, self.resume = clock, dict(peer_names), resume
        self.log = node_logger(__name__, name)
        self.stop = stop or threading.Event()
        self.facts = dict(facts or {})
        self.overlay = overlay
        self.algorithm = algorithm or RoundAlgorithm(GossipSettings())
        self.compressed = compressed
        self.rounds_trained = 0
        self.last_eval: dict[str, float] = {}
        self._own: dict[str, Array] = {}  # the state this round published, which the mix starts from
        self._own_start: dict[str, Array] = {}  # the algorithm's start of the published round
        self._own_steps = 0  # local steps of the published round
        self._own_round = 0  # the round last published
        self._began = 0  # the round whose local steps ran last
        self._steps = 0  # local steps of the round in progress
        self._in_flight: _InFlight | None = None  # gossip.overlap: the exchange running beside training
        self._aggregation_error: float | None = None  # of the last mix (p2pfm/learn/aggregation.py)
        self._logged_rejections: set[tuple[str, str]] = set()
        self._internal_errors = 0  # messages whose handling raised (a bug, counted, never fatal)
        self._proofs: list[_PendingProof] = []
        self._no_stats = TransportStats()
        self._resumed_after = 0  # the round a resume restored (for its record)
        # Closed after the transport and the store: what the node's I/O edge opened for it (/metrics).
        self.on_close: list[Callable[[], None]] = []

    # ------------------------------------------------------------ driver

    def run(self) -> NodeResult:
        """Play every round on real time; blocks until the last round or ``stop``."""
        try:
            opening = self.open()
            next_round = opening.next_round
            if opening.joining:
                until_s = opening.listen_until_s or 0.0
                windows = 0
                self.log.info("joining: waiting for the network's current state from its members")
                while not self.stop.is_set():
                    self.judge(POLL_S)
                    joined = self.joined(timed_out=self.clock.now_s() >= until_s)
                    if joined is not None:
                        next_round = joined
                        break
                    if self.clock.now_s() >= until_s:
                        windows += 1
                        if windows >= JOIN_WINDOWS:
                            self.log.warning(f"no state from the network in {windows} deadlines: stopping")
                            self.stop.set()
                        until_s = self.clock.now_s() + self.protocol.config.round_timeout_s
            elif opening.resumed:
                until_s = opening.listen_until_s or 0.0
                self.log.info(
                    f"resumed: listening up to {max(0.0, until_s - self.clock.now_s()):.0f} s for where "
                    "the neighbours are"
                )
                while (
                    self.clock.now_s() < until_s
                    and not self.stop.is_set()
                    and not self.heard_enough(next_round)
                ):
                    self.judge(POLL_S)
                next_round = self.opened(next_round)
            completed = min(next_round - 1, self.plan.rounds)
            if self.plan.overlap and self.transport is not None:
                return self.finish(self._play_overlapped(next_round, completed))
            while next_round <= self.plan.rounds and not self.stop.is_set():
                trained = self.train(next_round)
                started_s = self.clock.now_s()
                done = self.exchange(next_round)
                wait_s = self.clock.now_s() - started_s
                if done is not None:
                    self.mix(done)
                elif self.transport is None:
                    self.alone()
                self.record(next_round, trained, done, wait_s=wait_s)
                self.round_ended()
                completed = next_round
                next_round = self.catch_up(next_round + 1)
            return self.finish(completed)
        finally:
            self.close()

    def _play_overlapped(self, next_round: int, completed: int) -> int:
        """The rounds with ``gossip.overlap``; returns the last round completed.

        Round r: train (round r - 1's exchange runs meanwhile on its own
        thread) -> land round r - 1's mix as a correction -> record -> publish
        round r and start its exchange. The last round publishes and waits,
        so that the final adapter holds its last mix; a stop ends after the
        round's record, its update unpublished.
        """
        try:
            while next_round <= self.plan.rounds and not self.stop.is_set():
                round_ = next_round
                trained = self.train(round_)
                started_s = self.clock.now_s()
                done = self.land()
                round_ = self.catch_up(round_)
                if round_ == self.plan.rounds and not self.stop.is_set():
                    last = self.exchange(round_)  # the last round waits for its mix
                    if last is not None:
                        self.mix(last)
                        done = last
                self.record(round_, trained, done, wait_s=self.clock.now_s() - started_s)
                self.round_ended()
                if round_ < self.plan.rounds and not self.stop.is_set():
                    self.launch(round_)
                completed, next_round = round_, round_ + 1
        finally:
            self.abandon()
        return completed

    def exchange(self, round_: int) -> RoundComplete | None:
        """Publish this round's update and wait for the neighbours' (None: this node does not mix)."""
        if self.transport is None:
            return None
        self.publish(round_)
        return self.await_round()

    def await_round(self, abandon: threading.Event | None = None) -> RoundComplete | None:
        """Judge arrivals until the published round completes (None: ``abandon`` was set).

        A wait longer than ``WAIT_NOTICE_S`` is said once, naming whom it waits for.
        """
        notice_at_s = self.clock.now_s() + WAIT_NOTICE_S
        while abandon is None or not abandon.is_set():
            event = self.poll()
            if event is not None:
                return event
            if notice_at_s <= self.clock.now_s():
                notice_at_s = math.inf
                waiting = sorted(self._name(peer) for peer in self.protocol.waiting_for())
                if waiting:
                    left_s = max(0.0, self.protocol.deadline_s - self.clock.now_s())
                    self.log.info(
                        f"round {self.protocol.round}: waiting for {', '.join(waiting)} "
                        f"(at most {left_s:.0f} s more)"
                    )
            if self.stop.is_set():  # shutting down: finish the round with what we have
                event = self.protocol.poll(self.protocol.deadline_s)
                assert event is not None
                return event
            self.judge(max(0.0, min(POLL_S, self.protocol.deadline_s - self.clock.now_s())))
        return None

    # ----------------------------------------------------------- overlap

    def launch(self, round_: int) -> None:
        """Publish round ``round_`` and run its exchange on its own thread (``gossip.overlap``).

        The caller takes a snapshot of the state (on the learner's device)
        and goes on training; the thread brings the snapshot to the host,
        encodes, signs and sends it, judges arrivals, waits for the round and
        computes the mix. It owns the protocol and the transport until
        ``land``.
        """
        flight = _InFlight(threading.Event())
        snapshot = self._snapshot()
        self._own_start, self._own_steps = self.algorithm.start, self._steps  # before the next round begins

        def exchange() -> None:
            try:
                self.publish(round_, snapshot())
                flight.done = self.await_round(flight.abandon)
                if flight.done is not None:
                    flight.mixed = self.combine(flight.done, self._own)
            except BaseException as exc:  # noqa: BLE001  handed to the caller by land()
                flight.error = exc

        flight.thread = threading.Thread(target=exchange, name=f"{self.name}-exchange", daemon=True)
        self._in_flight = flight
        flight.thread.start()

    def land(self) -> RoundComplete | None:
        """Wait for the exchange in flight and apply its mix (None: nothing was in flight)."""
        flight, self._in_flight = self._in_flight, None
        if flight is None or flight.thread is None:
            return None
        flight.thread.join()
        if flight.error is not None:
            raise flight.error
        if flight.done is not None:
            self.mix(flight.done, flight.mixed)
        return flight.done

    def abandon(self) -> None:
        """Stop an exchange still in flight without applying it (the node is stopping or failed)."""
        flight, self._in_flight = self._in_flight, None
        if flight is not None and flight.thread is not None:
            flight.abandon.set()
            flight.thread.join(timeout=10 * POLL_S + self.protocol.config.round_timeout_s)

    # ------------------------------------------------------------- steps

    def open(self) -> Opening:
        """Start fresh (round 1), or restore the checkpoint and say how long to listen for rounds."""
        checkpoint, sent = self.store.load() if self.resume else (None, None)
        if checkpoint is None and sent is None:
            self.store.write("start", **self.facts)
            if self.plan.eval_every == 1:
                self.last_eval = self.learner.evaluate()
                self.store.write(
                    "round", round=0, eval=self.last_eval, train_loss=None, **self._sizes(), **self.counters()
                )
                self.log.info(f"round 0 (before training): {_fmt(self.last_eval)}")
            if self.overlay is not None and self.overlay.joining:
                self.overlay.start(self.clock.now_s())
                until_s = self.clock.now_s() + self.protocol.config.round_timeout_s
                return Opening(1, listen_until_s=until_s, joining=True)
            return Opening(1)
        last_round, last_seq = (checkpoint.round, checkpoint.seq) if checkpoint else (0, 0)
        if checkpoint is not None:
            self.learner.set_state(checkpoint.adapter)
            self.learner.load_state_dict(checkpoint.trainer)
            self.algorithm.load_state_dict(checkpoint.algorithm)
            self.rounds_trained = checkpoint.rounds_trained
        if sent is not None and sent > (last_round, last_seq):
            # We sent round sent[0] and crashed before its checkpoint: that
            # round is spoken for; resume into the next one.
            self.log.info(f"round {sent[0]} was sent but not checkpointed: resuming after it")
            last_round, last_seq = max(last_round, sent[0]), max(last_seq, sent[1])
        self.protocol.restore(last_round, last_seq)
        self._resumed_after = last_round
        listen = None if self.transport is None else self.clock.now_s() + self.protocol.config.round_timeout_s
        if self.overlay is not None:  # back in an open network: rejoin, and catch up like a joiner
            self.store.write("resume", round=last_round, **self.facts)
            self.overlay.start(self.clock.now_s())
            return Opening(last_round + 1, resumed=True, listen_until_s=listen, joining=True)
        return Opening(last_round + 1, resumed=True, listen_until_s=listen)

    def heard_enough(self, next_round: int) -> bool:
        """While listening after a resume: every neighbour, or a majority that moved on, was heard."""
        now_s = self.clock.now_s()
        heard = self.protocol.heard_claims(now_s)
        neighbours = len(self.protocol.neighbours)
        return len(heard) >= neighbours or (
            len(heard) >= neighbours // 2 + 1
            and self.protocol.catch_up_target(next_round, now_s) > next_round
        )

    def joined(self, *, timed_out: bool) -> int | None:
        """While joining: the round to play first, once the node holds the network's state (None: listen on).

        The node follows the round a majority of its neighbours claim, takes
        the state of the newest round that several of them sent, combined
        robustly (``p2pfm.node.overlay.catch_up_state``), and trains from the
        round after. When nobody has sent anything by ``timed_out`` and it
        has neighbours, the network is just starting: it starts at round 1
        from its own state. Alone, it listens on (the membership retries).
        """
        assert self.overlay is not None
        now_s = self.clock.now_s()
        target = min(self.protocol.catch_up_target(1, now_s), self.plan.rounds)
        if self.protocol.phase is Phase.IDLE and target > 1 and self.protocol.round < target - 1:
            self.protocol.restore(target - 1, self.protocol.seq)  # accept the rounds the neighbours are in
        newest = self.protocol.newest_updates()
        if self.compressed is not None:  # a difference means nothing without its chain: keyframes only
            newest = {peer: update for peer, update in newest.items() if update.base is None}
        found = catch_up_state(newest, self.overlay.join_settings, timed_out=timed_out)
        if found is not None:
            round_, state = found
            self.learner.set_state(state)
            sources = sum(1 for u in newest.values() if u.round == round_)
            self.store.write(
                "joined", round=round_, sources=sources, neighbours=len(self.protocol.neighbours)
            )
            self.log.info(f"joined: holds round {round_}'s state from {sources} members")
            return min(round_ + 1, self.plan.rounds + 1)
        fresh = self.protocol.round < 0  # never saw a round claimed, no checkpoint
        resumed = self._resumed_after > 0
        if (
            timed_out
            and self.protocol.neighbours
            and not self.protocol.heard_claims(now_s)
            and (fresh or resumed)
        ):
            # Nobody sends rounds: a network that is just starting (a fresh node starts at 1), or a resumed
            # node's neighbours are all new too (it goes on after its checkpoint). A fresh node that has seen
            # rounds claimed but got no state keeps listening: its own initial state is not the network's.
            start = max(1, self.protocol.round + 1)
            self.store.write("joined", round=start - 1, sources=0, neighbours=len(self.protocol.neighbours))
            self.log.info(f"joined; nobody has sent a round yet: starting at round {start}")
            return start
        return None

    def round_ended(self) -> None:
        """After a round's record: membership's failure detection, shuffle and refill."""
        if self.overlay is not None:
            self.overlay.round_ended(self.clock.now_s())
            if self.compressed is not None:
                self.compressed.neighbours.keep_only(self.protocol.neighbours)
            self.store.save_peers(self.overlay.known_records())
            roster = self.overlay.membership.roster
            if self.overlay.membership.removed and not self.stop.is_set():
                self.store.write("removed", roster_version=roster.version)
                self.log.info(f"roster version {roster.version} removed this node: stopping")
                self.stop.set()

    def leave(self) -> None:
        """Leave the network gracefully (the neighbours hear it at once)."""
        if self.overlay is not None:
            self.overlay.leave()

    def opened(self, next_round: int) -> int:
        """After the listening: the round to play first."""
        self.store.write("resume", round=self._resumed_after, **self.facts)
        self.log.info(f"resumed after round {self._resumed_after}")
        return self.catch_up(next_round)

    def train(self, round_: int) -> Trained:
        """Round ``round_``'s local steps (none in a consensus round), with the algorithm's correction."""
        started_s = self.clock.now_s()
        self._steps = self.plan.steps_in(round_)
        self._began = round_
        if self.algorithm.needs_start:
            self.algorithm.begin(self.learner.get_state())
        correction = self.algorithm.correction() if self._steps else None
        loss = self.learner.train_steps(self._steps, correction)
        self.rounds_trained += 1
        return Trained(loss, self.clock.now_s() - started_s)

    def publish(self, round_: int, state: dict[str, Array] | None = None) -> None:
        """Start round ``round_`` and send this node's messages (recorded as sent first, see above).

        ``state``: what to publish, taken earlier (``launch``); None: the learner's state now.
        """
        assert self.transport is not None
        self.judge(0.0)  # what arrived while we trained
        partners = None if self.plan.partners is None else self.plan.partners(round_)
        self.protocol.start_round(round_, self.clock.now_s(), partners=partners)
        if state is None:
            state = self.learner.get_state()
            self._own_start, self._own_steps = self.algorithm.start, self._steps
        self._own, self._own_round = state, round_
        messages = self.publisher.messages(
            self.protocol, self._own, samples=self.plan.samples_per_round, wall_time_ms=self.clock.wall_ms()
        )
        if not self.store.record_sent(self.protocol.round, self.protocol.seq):
            # Unrecorded, a crash now could make us sign a second update for
            # this round after the restart: better to stay silent this round.
            self.log.error(f"cannot record round {round_} as sent: not sending it")
            if self.compressed is not None:
                self.compressed.own.restart()  # the chain's link is not sent: start again with a keyframe
            return
        for i, message in enumerate(messages):
            if i:
                self.clock.sleep(self.publisher.gap_s)
            self.transport.send(message, None if partners is None else list(partners))

    def judge(self, timeout_s: float) -> None:
        """Hand what the transport has (waiting up to ``timeout_s``) to the protocol."""
        if self.transport is None:
            return
        overlay = self.overlay
        for received in self.transport.receive(timeout_s):
            try:
                if overlay is not None:
                    if received.control:
                        overlay.on_control(received, self.clock.now_s())
                        continue
                    overlay.heard(received.link)
                event = self.protocol.receive(
                    received.message, self.clock.now_s(), self.clock.wall_ms(), link=received.link
                )
                if isinstance(event, Accepted) and self.compressed is not None and event.update is not None:
                    update = event.update
                    self.compressed.neighbours.apply(update.sender, update.round, update.base, update.tensors)
                    if self.protocol.identity.peer_id in update.resync:
                        # Our own round, not the update's: a neighbour claiming rounds ahead of ours
                        # would otherwise make every request look fresh (a keyframe every round).
                        self.compressed.own.keyframe_asked(self.protocol.round)
                elif isinstance(event, EquivocationFound):
                    self._on_equivocation(event)
                elif isinstance(event, Rejected) and event.reason is RejectReason.UNKNOWN_SENDER and overlay:
                    overlay.stranger(received.link)
            except Exception as exc:
                self._internal_errors += 1
                self.log.exception(f"BUG: a message raised {exc!r}; dropped it and carried on")
                continue
            if isinstance(event, Rejected):
                self._log_rejection(event)
        if overlay is not None:
            overlay.tick(self.clock.now_s())

    def poll(self) -> RoundComplete | None:
        return self.protocol.poll(self.clock.now_s())

    def mix(self, done: RoundComplete, mixed: Mapping[str, Array] | None = None) -> None:
        """Combine the published state with what ``done`` holds (``mixed``: already combined).

        Synchronous: the algorithm's result becomes the state. Overlapped
        (the node trained on since it published): the result's difference
        from the published state is added to the current one.
        """
        own = self._own
        if mixed is None:
            mixed = self.combine(done, own)
        if not self.plan.overlap:
            self.learner.set_state(self.algorithm.finish(own, mixed, self._steps))
        else:
            target = self.algorithm.finish(own, mixed, self._own_steps, start=self._own_start)
            delta = {name: target[name] - own[name] for name in own}
            current = self.learner.get_state()
            self.learner.set_state({name: current[name] + delta[name] for name in current})
            if self._began > self._own_round:  # the next round began from the stale state: move its start
                self.algorithm.shift_start(delta)
        self._aggregation_error = self._measure_aggregation(done)
        self._send_proofs()

    def _snapshot(self) -> Callable[[], dict[str, Array]]:
        """The learner's state as it is now, on the host when called (a device copy first, if it can)."""
        take = getattr(self.learner, "snapshot", None)
        if take is not None:
            return cast(Callable[[], dict[str, Array]], take())
        state = self.learner.get_state()
        return lambda: state

    def combine(self, done: RoundComplete, own: Mapping[str, Array]) -> dict[str, Array]:
        """What the round's mix makes of ``own``: the plain mix, or (compressed) the estimates' mix."""
        if self.compressed is None:
            return done.mix(own, self.mix_settings)
        own_estimate = self.compressed.own.estimate
        if own_estimate is None:  # nothing published this round (the sent record failed): keep the state
            return dict(own)
        settings = self.mix_settings
        return choco_mix(
            settings.rule, own, own_estimate, self._received(done), done.weights, step=self.compressed.step,
            trim=settings.trim, byzantine_weight=settings.byzantine_weight,
        )  # fmt: skip

    def _received(self, done: RoundComplete) -> dict[PeerId, Mapping[str, Array]]:
        """The neighbours' states this round mixes: their updates, or (compressed) our estimates of them."""
        if self.compressed is None:
            return {peer: update.tensors for peer, update in done.updates.items()}
        estimates = self.compressed.neighbours
        found = {peer: estimates.get(peer) for peer in done.updates}
        return {peer: state for peer, state in found.items() if state is not None}

    def alone(self) -> None:
        """A node that never mixes (the ``local`` baseline) still runs its algorithm, on its own state.

        The same node without mixing: an outer optimizer steps on its own
        pseudo-gradient (``mixed = local``); ``dpsgd`` and ``scaffold`` change nothing.
        """
        if self.algorithm.needs_start:
            state = self.learner.get_state()
            self.learner.set_state(self.algorithm.finish(state, state, self._steps))

    def _measure_aggregation(self, done: RoundComplete) -> float | None:
        """The LoRA aggregation error of this round's mix (its weights; None: nothing to measure)."""
        received = self._received(done)
        if not received:
            return None
        peers = list(received)
        own_weight = 1.0 - sum(done.weights[p] for p in peers)
        states = [self._own, *(received[p] for p in peers)]
        try:
            return aggregation_error(states, [own_weight, *(done.weights[p] for p in peers)])
        except (ValueError, KeyError):  # a diagnostic: never a reason to stop a round
            return None

    def record(self, round_: int, trained: Trained, done: RoundComplete | None, *, wait_s: float) -> None:
        """Evaluate (every ``eval_every`` rounds and after the last), checkpoint, write the round's line."""
        plan = self.plan
        evaluation: dict[str, float] = {}
        if round_ % plan.eval_every == 0 or round_ == plan.rounds:
            evaluation = self.learner.evaluate()
            self.last_eval = evaluation
        checkpoint = Checkpoint(
            round_,
            self.protocol.seq,
            self.learner.get_state(),  # after mixing: what the checkpoint and snapshot keep
            self.learner.state_dict(),
            rounds_trained=self.rounds_trained,
            algorithm=self.algorithm.state_dict(),
        )
        snapshot = bool(plan.snapshot_every) and round_ % plan.snapshot_every == 0
        self.store.save_round(checkpoint, snapshot=snapshot)
        heard = sorted(self._name(p) for p in done.updates) if done else []
        missing = sorted(self._name(p) for p in done.missing) if done else []
        round_s = trained.train_s + wait_s
        counters = self.counters()
        self.store.write(
            "round", round=round_, rounds_trained=self.rounds_trained, train_loss=trained.loss,
            eval=evaluation, heard=heard, missing=missing, timed_out=bool(done and done.timed_out),
            train_s=trained.train_s, wait_s=wait_s, round_s=round_s, local_steps=self._steps,
            aggregation_error=self._aggregation_error if done else None,
            mixed_round=done.round if done else None, **self._sizes(), **counters,
        )  # fmt: skip
        loss = "" if trained.loss is None else f"loss {trained.loss:.3f} "
        self.log.info(
            f"round {round_}/{plan.rounds} {loss}{_fmt(evaluation)} "
            f"heard {len(heard)}/{len(self.protocol.neighbours)} sent {counters['bytes_sent'] / 1e6:.2f} MB "
            f"recv {counters['bytes_received'] / 1e6:.2f} MB {round_s:.1f} s"
        )

    def catch_up(self, next_round: int) -> int:
        """The round to play next: ``next_round``, or where a majority of neighbours confirm they are."""
        if self.transport is None:
            return next_round
        target = min(self.protocol.catch_up_target(next_round, self.clock.now_s()), self.plan.rounds)
        if target > next_round:
            self.store.write("caught_up", from_round=next_round, to_round=target, skipped=target - next_round)
            self.log.info(f"a majority of neighbours are at round {target}: skipping from {next_round}")
            return target
        return next_round

    def finish(self, completed: int) -> NodeResult:
        """After the last round (or a stop): keep the final adapter, write the ``done`` record."""
        stopped = completed < self.plan.rounds
        if self.overlay is not None and not self.overlay.membership.left:
            self.leave()  # done or stopped: the neighbours hear it now, not after suspect_rounds of silence
        saved = stopped or self.store.save_final(self.learner)
        self.store.write(
            "done", rounds_completed=completed, rounds_trained=self.rounds_trained, stopped=stopped,
            adapter_saved=saved and not stopped, **self.counters(),
        )  # fmt: skip
        self.log.info(
            f"{'stopped' if stopped else 'done'} after round {completed} "
            f"({self.rounds_trained} rounds trained)"
        )
        return NodeResult(completed, self.rounds_trained, self.last_eval, stopped, adapter_saved=saved)

    def close(self) -> None:
        try:
            if self.transport is not None:
                self.transport.close()
            self.store.close()
        finally:
            for close in self.on_close:
                close()

    # ------------------------------------------------------------ helpers

    def counters(self) -> dict[str, Any]:
        stats = self.transport.stats if self.transport else self._no_stats
        return {
            "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received,
            "messages_sent": stats.messages_sent,
            "messages_received": stats.messages_received,
            "dropped": dict(stats.dropped),
            "refused_connections": stats.refused_connections,
            "connections_accepted": stats.connections_accepted,
            "handshake_failures": dict(stats.handshake_failures),
            "rejected": {reason.value: n for reason, n in self.protocol.rejections.items()},
            "banned": sorted(self.peer_names.get(p, p.short) for p in self.protocol.banned),
            "internal_errors": self._internal_errors,
            "io_errors": dict(self.store.io_errors),
            **self._compression_counters(),
            **self._membership_counters(),
        }

    def _sizes(self) -> dict[str, int | None]:
        """A round record's gauges: the neighbours it has now, and the network's members as it knows them."""
        if self.overlay is not None:
            members: int | None = len(self.overlay.membership.roster.members)
        else:
            known = self.protocol.config.members  # node.roster's members; None: no roster
            members = None if known is None else len(known)
        return {"neighbours_active": len(self.protocol.neighbours), "members": members}

    def _compression_counters(self) -> dict[str, Any]:
        if self.compressed is None:
            return {}
        return {
            "keyframes_sent": self.compressed.own.keyframes,
            "keyframes_requested": self.compressed.own.keyframes_requested,
            "estimates_broken": dict(self.compressed.neighbours.broken),
        }

    def _membership_counters(self) -> dict[str, Any]:
        if self.overlay is None:
            return {}
        membership = self.overlay.membership
        return {
            "active_view": sorted(self._name(p) for p in membership.active),
            "passive_view_size": len(membership.passive),
            "view_changes": dict(self.overlay.changes),
            "control_rejected": {reason.value: n for reason, n in membership.refusals.items()},
            "roster_version": membership.roster.version,
            "control_send_failures": self.overlay.send_failures,
        }

    def _name(self, peer: PeerId) -> str:
        return self.peer_names.get(peer, peer.short)

    def _log_rejection(self, event: Rejected) -> None:
        sender = event.sender.short if event.sender else "?"
        key = (sender, event.reason.value)
        if key not in self._logged_rejections:  # once per sender and reason: no log floods
            self._logged_rejections.add(key)
            self.log.info(f"rejected a message from {sender}: {event.reason.value} ({event.detail})")

    def _on_equivocation(self, event: EquivocationFound) -> None:
        if not event.new:
            return
        accused = self._name(event.accused)
        via = (
            "seen here"
            if event.reporter is None
            else f"proof from {self.peer_names.get(event.reporter, '?')}"
        )
        where = self.store.save_evidence(
            event.accused.hex, event.round, encode_evidence(self.protocol.config.network, event.evidence)
        )
        self.log.warning(
            f"EQUIVOCATION by {accused} in round {event.round} ({via}): banned; proof in {where}"
        )
        to = [p for p in self.protocol.neighbours if p not in (event.accused, event.reporter)]
        self._proofs.append(_PendingProof(self.protocol.make_proof(event.evidence), to))
        self._send_proofs()

    def _send_proofs(self) -> None:
        """Pass proofs on, in a few rounds: a receiver's inbox keeps only its newest message per link."""
        if self.transport is None:
            return
        for proof in self._proofs:
            self.transport.send(proof.message, proof.to)
            proof.sends_left -= 1
        self._proofs = [p for p in self._proofs if p.sends_left > 0]


def _fmt(evaluation: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in evaluation.items())
