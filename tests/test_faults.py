"""Faults as wrappers: a lossy transport and a slow learner behave as the scenario says, reproducibly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import Identity, PeerId
from p2pfm.core.wire import Buffer
from p2pfm.learn.learner import Learner, QuadraticLearner
from p2pfm.net.link import DROP_FAULT, Received, Transport, TransportStats
from p2pfm.node.clock import VirtualClock
from p2pfm.node.faults import LossyTransport, SlowLearner

B, C, D = (Identity(bytes([i]) * 32).peer_id for i in (2, 3, 4))


class _Recorder:
    """A transport that keeps what it is asked to send, to whom (no loss of its own)."""

    def __init__(self, neighbours: Sequence[PeerId]) -> None:
        self.neighbours = tuple(neighbours)
        self.stats = TransportStats()
        self.sent: list[tuple[bytes, tuple[PeerId, ...]]] = []
        self.closed = False
        self.inbox: list[Received] = []

    def send(self, message: Buffer, peers: Sequence[PeerId] | None = None) -> int:
        targets = tuple(self.neighbours if peers is None else peers)
        self.sent.append((bytes(message), targets))
        self.stats.messages_sent += len(targets)
        return len(targets)

    def receive(self, timeout_s: float, max_messages: int = 64) -> list[Received]:
        got, self.inbox = self.inbox[:max_messages], self.inbox[max_messages:]
        return got

    def close(self) -> None:
        self.closed = True


def _lossy(loss: dict[PeerId, float], seed: int = 7) -> tuple[LossyTransport, _Recorder]:
    inner = _Recorder([B, C, D])
    return LossyTransport(inner, [B, C, D], loss, seed=seed), inner


def _delivered_to(inner: _Recorder, peer: PeerId) -> list[bool]:
    return [peer in targets for _, targets in inner.sent]


def test_loses_about_p_to_one_neighbour_and_nothing_to_the_others() -> None:
    lossy, inner = _lossy({B: 0.3})
    transport: Transport = lossy  # what the node is written against
    taken = [transport.send(b"m%d" % i) for i in range(2000)]
    to_b = sum(_delivered_to(inner, B))
    assert 0.25 * 2000 < 2000 - to_b < 0.35 * 2000  # 3 standard deviations: about 0.03
    assert all(_delivered_to(inner, C)) and all(_delivered_to(inner, D))
    assert sum(taken) == 2 * 2000 + to_b  # the return value counts the links that took it
    assert lossy.stats is inner.stats and lossy.stats.dropped[DROP_FAULT] == 2000 - to_b
    assert lossy.stats.messages_sent == sum(taken)  # losses beside the other counters, not among them


def test_losses_are_reproducible_from_the_seed() -> None:
    first, second, other = (_lossy({B: 0.5}, seed=s) for s in (1, 1, 2))
    for lossy, _ in (first, second, other):
        for i in range(200):
            lossy.send(b"m%d" % i)
    pattern = _delivered_to(first[1], B)
    assert pattern == _delivered_to(second[1], B)
    assert pattern != _delivered_to(other[1], B)


def test_an_explicit_peer_subset_is_honoured_and_a_message_lost_to_all_is_not_passed_on() -> None:
    lossy, inner = _lossy({B: 1.0})
    assert lossy.send(b"proof", [C]) == 1
    assert inner.sent == [(b"proof", (C,))]
    assert lossy.send(b"update", [B]) == 0  # lost: the inner transport never sees it
    assert inner.sent == [(b"proof", (C,))] and lossy.stats.dropped[DROP_FAULT] == 1
    assert lossy.send(b"update") == 2
    assert inner.sent[-1] == (b"update", (C, D))


def test_receive_and_close_are_the_inner_transports() -> None:
    lossy, inner = _lossy({B: 1.0})  # loss applies to what we send, never to what we receive
    inner.inbox = [Received(B, memoryview(b"x")), Received(C, memoryview(b"y"))]
    assert [r.link for r in lossy.receive(0.0, max_messages=1)] == [B]
    assert [r.link for r in lossy.receive(0.0)] == [C]
    lossy.close()
    assert inner.closed


@pytest.mark.parametrize("prob", [-0.1, 1.5, float("nan")])
def test_a_loss_outside_0_1_is_refused(prob: float) -> None:
    with pytest.raises(LocalProtocolError, match=r"must be in \[0, 1\]"):
        _lossy({B: prob})


class _Timed(QuadraticLearner):
    """A quadratic learner each of whose steps takes ``step_s`` on a virtual clock."""

    def __init__(self, clock: VirtualClock, step_s: float) -> None:
        super().__init__(np.ones(4), np.zeros(4), lr=0.5, noise=0.1, start=np.zeros(4), seed=3)
        self.clock, self.step_s = clock, step_s

    def train_steps(self, steps: int, correction: object = None) -> float | None:
        self.clock.sleep(steps * self.step_s)
        return super().train_steps(steps)


@pytest.mark.parametrize("factor", [1.0, 3.0, 7.5])
def test_a_slow_learner_takes_factor_times_as_long(factor: float) -> None:
    clock = VirtualClock(start_s=10.0)
    reference = _Timed(VirtualClock(), step_s=0.25)
    slow: Learner = SlowLearner(_Timed(clock, step_s=0.25), factor, clock)
    loss = slow.train_steps(4)
    assert clock.now_s() == pytest.approx(10.0 + factor * 4 * 0.25)
    assert loss == reference.train_steps(4)  # the same training, only slower
    np.testing.assert_array_equal(slow.get_state()["x"], reference.get_state()["x"])


def test_a_slow_learner_delegates_everything_else(tmp_path: Path) -> None:
    clock = VirtualClock()
    inner = _Timed(clock, step_s=0.1)
    slow = SlowLearner(inner, 2.0, clock)
    assert slow.schema == inner.schema and slow.fingerprint == inner.fingerprint  # neighbours still mix
    assert slow.describe() == {**inner.describe(), "slow_factor": 2.0}
    slow.set_state({"x": np.full(4, 0.5)})
    np.testing.assert_array_equal(inner.get_state()["x"], np.full(4, 0.5, np.float32))
    assert slow.evaluate() == inner.evaluate()
    twin = _Timed(VirtualClock(), step_s=0.1)
    twin.set_state(inner.get_state())
    twin.load_state_dict(slow.state_dict())  # the RNG state passes through
    slow.train_steps(2)
    twin.train_steps(2)
    np.testing.assert_array_equal(slow.get_state()["x"], twin.get_state()["x"])
    slow.load_state_dict(twin.state_dict())
    assert inner.state_dict() == twin.state_dict()
    slow.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "state.safetensors").is_file()


@pytest.mark.parametrize("factor", [0.5, 0.0, float("nan")])
def test_a_slow_factor_below_one_is_refused(factor: float) -> None:
    clock = VirtualClock()
    with pytest.raises(LocalProtocolError, match="slow factor must be >= 1"):
        SlowLearner(_Timed(clock, 0.1), factor, clock)
