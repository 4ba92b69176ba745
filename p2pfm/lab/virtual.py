"""Real node loops on virtual time: the simulator's event scheduler.

Each simulated node is a real ``p2pfm.node.loop.Node`` -- its learner,
protocol, publishing strategy, fault wrappers and store -- on an in-memory
transport. Where ``Node.run`` waits on the system clock, this scheduler keeps
a heap of per-node events on one :class:`VirtualClock` and steps each node
through the same calls in time order:

    open -> train -> publish -> (wake on each arrival or at the deadline:
    judge, poll) -> mix, record -> train ...

With ``gossip.overlap`` (``Node._play_overlapped``) a published round's
arrivals wake the node while it trains the next one, and its mix lands
after that training:

    train r (judge, poll round r - 1) -> [wait for r - 1] -> mix -> record r -> publish r -> train r + 1

Training takes ``step_s`` virtual seconds per local step (a slow node's
learner wrapper adds its share), every link takes at least ``latency_s``,
and the deadlines are the protocol's own. So timeouts, stragglers, crashes
and restarts happen as they would on a network, only without waiting for
them, and reproducibly.

One scheduler runs some of the nodes (its *part*); the simulator may run
several parts in worker processes. A message to a node of another part
leaves through ``forward`` and arrives there through ``MemoryNetwork.inject``;
since every link is at least ``latency_s`` long, parts can advance in
windows of that length without ever receiving a message from their past.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from p2pfm.core.identity import PeerId
from p2pfm.core.protocol import RoundComplete
from p2pfm.learn.learner import Array
from p2pfm.net.link import DROP_FAULT
from p2pfm.net.memory import Forward, LinkFaults, MemoryNetwork
from p2pfm.node.clock import VirtualClock
from p2pfm.node.loop import JOIN_WINDOWS, Node, NodeResult, Trained

# Event kinds, in the order they run when they fall on the same time. Wakes
# come first: a waiting node reads what has arrived by time t before any node
# publishes at t (its inbox keeps one message per link, as ZeroMQ's
# conflating one does, so a read that came later would lose the older one).
_WAKE, _OPEN, _TRAIN, _PUBLISH, _RESTART = range(5)


@dataclass
class RoundTally:
    """What one part saw of one round: its nodes' mixed states (Welford-merged) and their traffic."""

    nodes: int = 0
    mean: Array | None = None  # float64 mean of the states
    m2: float = 0.0  # sum of squared distances to ``mean``
    sum_sq: float = 0.0  # sum of squared norms
    messages: int = 0  # messages sent (lost ones included)
    bytes: int = 0  # wire bytes handed to the network
    delivered: int = 0  # neighbours' updates the round mixed
    loss_sum: float = 0.0  # the training losses of this round's nodes that trained
    losses: int = 0

    @property
    def train_loss(self) -> float | None:
        """The mean training loss of the nodes that trained this round (None: none did)."""
        return self.loss_sum / self.losses if self.losses else None

    def add(self, state: Array) -> None:
        x = np.asarray(state, np.float64).ravel()
        self.nodes += 1
        self.sum_sq += float(np.dot(x, x))
        if self.mean is None:
            self.mean = x.copy()
            return
        delta = x - self.mean
        self.mean += delta / self.nodes
        self.m2 += float(np.dot(delta, x - self.mean))

    def merge(self, other: RoundTally) -> None:
        """Chan et al.'s pairwise update: exact, and stable at distances far below the states' size."""
        self.messages += other.messages
        self.bytes += other.bytes
        self.delivered += other.delivered
        self.loss_sum += other.loss_sum
        self.losses += other.losses
        if other.mean is None:
            return
        if self.mean is None:
            self.nodes, self.mean, self.m2, self.sum_sq = (
                other.nodes,
                other.mean.copy(),
                other.m2,
                other.sum_sq,
            )
            return
        total = self.nodes + other.nodes
        delta = other.mean - self.mean
        self.m2 += other.m2 + float(np.dot(delta, delta)) * self.nodes * other.nodes / total
        self.mean += delta * (other.nodes / total)
        self.nodes = total
        self.sum_sq += other.sum_sq

    @property
    def consensus_distance(self) -> float:
        """``mean_i ||x_i - xbar||^2 / mean_i ||x_i||^2``, as ``p2pfm.core.consensus.consensus_distance``."""
        return self.m2 / self.sum_sq if self.sum_sq > 0.0 else 0.0


@dataclass
class NodeOutcome:
    """A simulated node's end: its result, what it refused, and (when kept) its states."""

    index: int
    result: NodeResult
    rejected: dict[str, int]
    banned: list[str]
    crashes: int
    finished_s: float = 0.0  # virtual time at which it finished (or crashed for good)
    initial: dict[str, Array] | None = None
    final: dict[str, Array] | None = None


def state_vector(state: Mapping[str, Array]) -> Array:
    """A learner's state as one float64 vector (its tensors flattened, by name): what the tally measures."""
    if len(state) == 1:  # the model-free learner's one vector: no copy beyond the dtype's
        return np.asarray(next(iter(state.values())), np.float64).ravel()
    return np.concatenate([np.asarray(state[name], np.float64).ravel() for name in sorted(state)])


NodeMaker = Callable[[int, VirtualClock, MemoryNetwork, bool], Node]  # (index, clock, network, resume)
OnRecord = Callable[[int, int, Node], None]  # (index, round, node): a node recorded a round


@dataclass
class _Slot:
    index: int
    peer: PeerId
    node: Node
    round: int = 0
    phase: str = "open"  # open, join, train, overlap, wait, listen, crashed, done
    trained: Trained | None = None
    waiting_since_s: float = 0.0
    listen_until_s: float = 0.0
    next_wake_s: float = math.inf
    completed: int = 0
    crash_after: int | None = None  # crash once this round is recorded
    leave_after: int | None = None  # leave gracefully once this round is recorded
    join_windows: int = 0  # listening deadlines a joiner has waited through without the network's state
    restart_after_s: float | None = None
    crashes: int = 0
    sent_before: tuple[int, int, int] = (0, 0, 0)  # messages, fault drops, bytes at the last record
    initial: dict[str, Array] | None = None
    outcome: NodeOutcome | None = None
    # gossip.overlap: a published round's exchange runs through the next round's training
    in_flight: bool = False
    landed: RoundComplete | None = None  # the in-flight round, completed during training
    landing: bool = False  # waiting for the in-flight round after training


class VirtualScheduler:
    """Runs the nodes of one part in virtual time (see the module docstring)."""

    def __init__(
        self,
        indices: list[int],
        peers: Mapping[int, PeerId],
        make_node: NodeMaker,
        *,
        links: Mapping[int, Sequence[int]],
        latency_s: float,
        crashes: Mapping[int, tuple[int, float | None]] | None = None,
        forward: Forward | None = None,
        keep_states: bool = False,
        leaves: Mapping[int, int] | None = None,
        joins: Mapping[int, Sequence[int]] | None = None,
        on_record: OnRecord | None = None,
    ) -> None:
        """``leaves``: node -> the round after which it leaves gracefully; ``joins``: round -> nodes
        that start (and join) once the first node has recorded that round; ``on_record`` is called
        after every recorded round. Any two nodes can reach each other (an open network's control
        messages), every link after ``latency_s``."""
        self.clock = VirtualClock()
        self.network = MemoryNetwork(
            clock=self.clock.now_s, forward=forward, on_arrival=self._arrival,
            default_faults=LinkFaults(delay_s=latency_s),
        )  # fmt: skip
        for i in indices:
            for j in links[i]:
                self.network.set_faults(peers[i], peers[j], LinkFaults(delay_s=latency_s))
        self.make_node = make_node
        self.keep_states = keep_states
        self.peers = dict(peers)
        self.on_record = on_record
        self._leaves = dict(leaves or {})
        self._joins = {r: list(nodes) for r, nodes in (joins or {}).items()}
        self.tallies: dict[int, RoundTally] = {}
        self._heap: list[tuple[float, int, int]] = []
        self._by_peer: dict[PeerId, _Slot] = {}
        self.slots: dict[int, _Slot] = {}
        for i in indices:
            slot = _Slot(i, peers[i], make_node(i, self.clock, self.network, False))
            crash = (crashes or {}).get(i)
            if crash is not None:
                slot.crash_after, slot.restart_after_s = crash
            self._add(slot, 0.0)

    def _add(self, slot: _Slot, at_s: float) -> None:
        slot.leave_after = self._leaves.get(slot.index)
        self.slots[slot.index] = slot
        self._by_peer[slot.peer] = slot
        self._push(at_s, slot, _OPEN)

    # ------------------------------------------------------------ driving

    def next_event_s(self) -> float:
        while self._heap and self._stale(self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else math.inf

    def run_until(self, end_s: float = math.inf) -> None:
        """Process every event before ``end_s`` (all of them by default)."""
        while self.next_event_s() < end_s:
            at_s, kind, index = heapq.heappop(self._heap)
            self.clock.t_s = at_s
            slot = self.slots[index]
            if kind == _WAKE:
                slot.next_wake_s = math.inf
            self._step(slot, kind)

    def outcomes(self) -> list[NodeOutcome]:
        return [slot.outcome for slot in self.slots.values() if slot.outcome is not None]

    # -------------------------------------------------------------- steps

    def _step(self, slot: _Slot, kind: int) -> None:
        node = slot.node
        if kind == _OPEN:
            opening = node.open()
            slot.round = opening.next_round
            if slot.initial is None:  # not after a restart
                slot.initial = node.learner.get_state()
                self._tally(0).add(state_vector(slot.initial))
            if opening.joining:
                slot.phase, slot.listen_until_s = "join", opening.listen_until_s or 0.0
                self._check(slot)
            elif opening.resumed and opening.listen_until_s is not None:
                slot.phase, slot.listen_until_s = "listen", opening.listen_until_s
                self._check(slot)
            else:
                if opening.resumed:
                    slot.round = node.opened(slot.round)
                self._push(self.clock.now_s(), slot, _TRAIN)
        elif kind == _TRAIN:
            if slot.round > node.plan.rounds:
                self._finish(slot)
                return
            slot.phase = "train"
            if slot.in_flight:  # overlap: the published round's messages are judged while training
                slot.phase = "overlap"
                self._sleep(slot, node.protocol.deadline_s)
            slot.trained = node.train(slot.round)  # advances the clock by the virtual training time
            self._push(self.clock.now_s(), slot, _PUBLISH)
        elif kind == _PUBLISH:
            slot.waiting_since_s = self.clock.now_s()
            if node.plan.overlap and node.transport is not None:
                self._trained_overlapped(slot)
                return
            node.publish(slot.round)
            slot.phase, slot.waiting_since_s = "wait", self.clock.now_s()
            self._check(slot)
        elif kind == _WAKE:
            self._check(slot)
        elif kind == _RESTART:
            slot.node = self.make_node(slot.index, self.clock, self.network, True)
            slot.phase = "open"
            self._push(self.clock.now_s(), slot, _OPEN)

    def _check(self, slot: _Slot) -> None:
        """A waiting node looks at its inbox: done with the round (or listening), or sleeps again."""
        node, now_s = slot.node, self.clock.now_s()
        node.judge(0.0)
        if slot.phase == "join":
            joined = node.joined(timed_out=now_s >= slot.listen_until_s)
            if joined is not None:
                slot.next_wake_s = math.inf
                slot.round = joined
                self._push(now_s, slot, _TRAIN)
                return
            if now_s >= slot.listen_until_s:
                slot.join_windows += 1
                if slot.join_windows >= JOIN_WINDOWS:  # the network is gone (or never answered): give up
                    self._finish(slot)
                    return
                slot.listen_until_s = now_s + node.protocol.config.round_timeout_s
            self._sleep(slot, slot.listen_until_s)
            return
        if slot.phase == "listen":
            if now_s >= slot.listen_until_s or node.heard_enough(slot.round):
                slot.next_wake_s = math.inf  # pending wakes are stale now
                slot.round = node.opened(slot.round)
                self._push(now_s, slot, _TRAIN)
            else:
                self._sleep(slot, slot.listen_until_s)
            return
        if slot.phase == "overlap":
            done = node.poll()
            if done is None:
                self._sleep(slot, node.protocol.deadline_s)
            else:  # kept until the training ends (the node applies it then)
                slot.landed, slot.phase, slot.next_wake_s = done, "train", math.inf
            return
        if slot.phase != "wait":
            return
        done = node.poll()
        if done is None:
            self._sleep(slot, node.protocol.deadline_s)
            return
        slot.next_wake_s = math.inf  # pending wakes are stale now: no judging while training
        if slot.landing:  # overlap: the previous round's exchange, after this round's training
            slot.landing, slot.in_flight = False, False
            node.mix(done)
            self._land_overlapped(slot, done)
            return
        node.mix(done)
        if self._record(slot, done):
            slot.round = node.catch_up(slot.round + 1)
            self._push(self.clock.now_s(), slot, _TRAIN)

    def _record(self, slot: _Slot, done: RoundComplete | None) -> bool:
        """The round's record, then its leave or crash fault; False: the node is gone."""
        node = slot.node
        assert slot.trained is not None
        node.record(slot.round, slot.trained, done, wait_s=self.clock.now_s() - slot.waiting_since_s)
        node.round_ended()
        self._recorded(slot, done)
        if slot.leave_after is not None and slot.round >= slot.leave_after:
            node.leave()
            self._finish(slot)
            return False
        if slot.crash_after is not None and slot.round >= slot.crash_after and not slot.crashes:
            self._crash(slot)
            return False
        return True

    def _trained_overlapped(self, slot: _Slot) -> None:
        """gossip.overlap, after a round's training: land the round in flight (or wait for it)."""
        done = None
        if slot.in_flight:
            if slot.landed is None:
                slot.phase, slot.landing = "wait", True
                self._check(slot)
                return
            done, slot.landed, slot.in_flight = slot.landed, None, False
            slot.node.mix(done)
        self._land_overlapped(slot, done)

    def _land_overlapped(self, slot: _Slot, done: RoundComplete | None) -> None:
        """gossip.overlap: record the round and publish it (its exchange runs through the next training).

        The last round publishes and waits as a synchronous round does, so
        that the final state holds its mix (``Node._play_overlapped``).
        """
        node = slot.node
        slot.round = node.catch_up(slot.round)
        if slot.round == node.plan.rounds:
            node.publish(slot.round)
            slot.phase = "wait"
            self._check(slot)
            return
        if not self._record(slot, done):
            return
        node.publish(slot.round)
        slot.in_flight, slot.phase = True, "train"
        slot.round += 1
        self._push(self.clock.now_s(), slot, _TRAIN)

    def _recorded(self, slot: _Slot, done: RoundComplete | None) -> None:
        slot.completed = slot.round
        tally = self._tally(slot.round)
        tally.add(state_vector(slot.node.learner.get_state()))
        if slot.trained is not None and slot.trained.loss is not None:
            tally.loss_sum += slot.trained.loss
            tally.losses += 1
        stats = slot.node.transport.stats if slot.node.transport else None
        if stats is not None:
            now = (stats.messages_sent, stats.dropped[DROP_FAULT], stats.bytes_sent)
            before = slot.sent_before
            tally.messages += (now[0] - before[0]) + (now[1] - before[1])
            tally.bytes += now[2] - before[2]
            slot.sent_before = now
        tally.delivered += len(done.updates) if done is not None else 0
        if self.on_record is not None:
            self.on_record(slot.index, slot.round, slot.node)
        for index in self._joins.pop(slot.round, []):
            self._add(
                _Slot(index, self.peers[index], self.make_node(index, self.clock, self.network, False)),
                self.clock.now_s(),
            )

    def _crash(self, slot: _Slot) -> None:
        """The node's process dies: its inbox is lost; its store (the disk) survives for the restart."""
        slot.crashes += 1
        slot.in_flight, slot.landed, slot.landing = False, None, False  # the exchange dies with it
        slot.node.close()
        self.network.detach(slot.peer)
        slot.phase, slot.sent_before = "crashed", (0, 0, 0)
        if slot.restart_after_s is None:
            self._outcome(slot, slot.node.finish(slot.completed))
            return
        self._push(self.clock.now_s() + slot.restart_after_s, slot, _RESTART)

    def _finish(self, slot: _Slot) -> None:
        result = slot.node.finish(slot.completed)
        slot.node.close()
        self._outcome(slot, result)

    def _outcome(self, slot: _Slot, result: NodeResult) -> None:
        slot.phase = "done"
        protocol = slot.node.protocol
        slot.outcome = NodeOutcome(
            index=slot.index,
            result=result,
            rejected={reason.value: n for reason, n in protocol.rejections.items()},
            banned=sorted(slot.node.peer_names.get(p, p.short) for p in protocol.banned),
            crashes=slot.crashes,
            finished_s=self.clock.now_s(),
            initial=slot.initial if self.keep_states else None,
            final=slot.node.learner.get_state() if self.keep_states else None,
        )

    # ------------------------------------------------------------ helpers

    def _sleep(self, slot: _Slot, until_s: float) -> None:
        """Wake ``slot`` at ``until_s`` or at its next arrival, whichever is first."""
        arrival_s = self.network.next_arrival_s(slot.peer)
        at_s = min(until_s, math.inf if arrival_s is None else arrival_s)
        timer_s = None if slot.node.overlay is None else slot.node.overlay.next_timer_s()
        if timer_s is not None:
            at_s = min(at_s, timer_s)
        self._wake(slot, max(at_s, self.clock.now_s()))

    def _arrival(self, receiver: PeerId, deliver_at_s: float) -> None:
        slot = self._by_peer.get(receiver)
        if slot is not None and slot.phase in ("wait", "listen", "join", "overlap"):
            self._wake(slot, deliver_at_s)

    def _wake(self, slot: _Slot, at_s: float) -> None:
        if at_s < slot.next_wake_s:
            slot.next_wake_s = at_s
            self._push(at_s, slot, _WAKE)

    def _push(self, at_s: float, slot: _Slot, kind: int) -> None:
        heapq.heappush(self._heap, (at_s, kind, slot.index))

    def _stale(self, entry: tuple[float, int, int]) -> bool:
        at_s, kind, index = entry
        return kind == _WAKE and at_s != self.slots[index].next_wake_s

    def _tally(self, round_: int) -> RoundTally:
        return self.tallies.setdefault(round_, RoundTally())
