"""Injected faults as wrappers: a lossy transport and a slow learner (scenario faults ``drop``, ``slow``).

The node loop has no fault branches: the factory wraps its transport or its
learner, and the simulator wraps them the same way, so a fault means the same
thing on a real network and in a simulation.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import PeerId
from p2pfm.core.wire import Buffer
from p2pfm.learn.learner import Array, Learner, LearnerWrapper
from p2pfm.net.link import DROP_FAULT, ControlTransport, Received, Transport, TransportStats
from p2pfm.node.clock import Clock


class LossyTransport:
    """Loses each message to neighbour ``p`` with probability ``loss[p]`` before it reaches the wire.

    Losses are counted in ``stats.dropped["fault"]``. The random stream is the
    node's own (seeded), so a run is reproducible however nodes are scheduled.
    """

    def __init__(
        self, inner: Transport, neighbours: Sequence[PeerId], loss: Mapping[PeerId, float], *, seed: int
    ) -> None:
        for peer, prob in loss.items():
            if not 0.0 <= prob <= 1.0:
                raise LocalProtocolError(f"loss to {peer.short} must be in [0, 1], got {prob}")
        self.inner = inner
        self.neighbours = tuple(neighbours)
        self.loss = dict(loss)
        self.stats: TransportStats = inner.stats  # one set of counters: the losses show beside the rest
        self._rng = random.Random(seed)  # fault injection only; not security relevant

    def send(self, message: Buffer, peers: Sequence[PeerId] | None = None) -> int:
        targets = list(self.neighbours if peers is None else peers)
        kept = [p for p in targets if not (self.loss.get(p) and self._rng.random() < self.loss[p])]
        self.stats.dropped[DROP_FAULT] += len(targets) - len(kept)
        return self.inner.send(message, kept) if kept else 0

    def receive(self, timeout_s: float, max_messages: int = 64) -> list[Received]:
        return self.inner.receive(timeout_s, max_messages)

    def send_control(self, peer: PeerId, address: str, message: Buffer) -> bool:
        """Control messages cross the same lossy link (only when the inner transport has the channel)."""
        if not isinstance(self.inner, ControlTransport):
            raise LocalProtocolError("the wrapped transport has no control channel")
        if self.loss.get(peer) and self._rng.random() < self.loss[peer]:
            self.stats.dropped[DROP_FAULT] += 1
            return False
        return self.inner.send_control(peer, address, message)

    def set_peers(self, peers: Mapping[PeerId, str]) -> None:
        if not isinstance(self.inner, ControlTransport):
            raise LocalProtocolError("the wrapped transport has no control channel")
        self.neighbours = tuple(peers)
        self.inner.set_peers(peers)

    def admit(self, peers: Collection[PeerId]) -> None:
        if not isinstance(self.inner, ControlTransport):
            raise LocalProtocolError("the wrapped transport has no control channel")
        self.inner.admit(peers)

    def close(self) -> None:
        self.inner.close()


class SlowLearner(LearnerWrapper):
    """Training takes ``factor`` times as long: after each call the node waits (factor - 1) x its duration."""

    def __init__(self, inner: Learner, factor: float, clock: Clock) -> None:
        if not factor >= 1.0:
            raise LocalProtocolError(f"slow factor must be >= 1, got {factor}")
        super().__init__(inner)
        self.factor, self.clock = factor, clock

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        started_s = self.clock.now_s()
        loss = self.inner.train_steps(steps, correction)
        self.clock.sleep((self.factor - 1.0) * (self.clock.now_s() - started_s))
        return loss

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "slow_factor": self.factor}
