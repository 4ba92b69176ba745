"""An in-process ``link.Transport``: messages between nodes of one process, no sockets.

A :class:`MemoryNetwork` is the wire between the :class:`MemoryTransport` of
each node. Every directed link ``a -> b`` can lose messages (probability),
delay them (seconds, on the network's clock) and limit their rate (bytes per
second: a message is delivered once the link has had time to carry it, as
a bandwidth cap would). The receiving side behaves like the ZeroMQ one: it
keeps only the newest undelivered message per link (the conflating PULL
socket), names the sending link (as CurveZMQ's authenticated User-Id), and
never blocks a sender.

The clock is injectable: a simulator passes a virtual clock and advances it;
tests and in-process nodes use ``time.monotonic``. ``receive(timeout_s)``
waits on the real clock only when the network's clock is the real one.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import PeerId
from p2pfm.core.wire import Buffer, message_bytes
from p2pfm.net.link import DROP_FAULT, Received, TransportStats


@dataclass(frozen=True)
class LinkFaults:
    """What one directed link does to the messages it carries."""

    loss: float = 0.0  # probability that a message is lost
    delay_s: float = 0.0  # added to every message
    bytes_per_s: float | None = None  # bandwidth cap (None: unlimited)

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss <= 1.0:
            raise LocalProtocolError(f"link loss must be a probability in [0, 1], got {self.loss}")
        if not self.delay_s >= 0.0:
            raise LocalProtocolError(f"link delay_s must be >= 0, got {self.delay_s}")
        if self.bytes_per_s is not None and not self.bytes_per_s > 0:
            raise LocalProtocolError(f"link bytes_per_s must be > 0, got {self.bytes_per_s}")


@dataclass
class _InFlight:
    deliver_at_s: float
    message: bytes


class MemoryNetwork:
    """The shared medium of some MemoryTransports. Thread-safe (nodes may run in threads)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, seed: int = 0) -> None:
        self.clock = clock
        self.real_time = clock is time.monotonic  # only then may receive() sleep
        self._rng = random.Random(seed)  # fault injection only; not security relevant
        self._lock = threading.Condition()
        self._faults: dict[tuple[PeerId, PeerId], LinkFaults] = {}
        # (sender, receiver) -> the newest message on that link not yet received.
        self._slots: dict[tuple[PeerId, PeerId], _InFlight] = {}
        self._link_free_at_s: dict[tuple[PeerId, PeerId], float] = {}
        self._nodes: dict[PeerId, MemoryTransport] = {}

    def set_faults(self, sender: PeerId, receiver: PeerId, faults: LinkFaults) -> None:
        with self._lock:
            self._faults[(sender, receiver)] = faults

    def attach(self, peer: PeerId, neighbours: Sequence[PeerId]) -> MemoryTransport:
        """The transport of node ``peer``, linked to ``neighbours``."""
        with self._lock:
            if peer in self._nodes:
                raise LocalProtocolError(f"node {peer.short} is already attached")
            transport = MemoryTransport(self, peer, tuple(neighbours))
            self._nodes[peer] = transport
            return transport

    def _send(self, sender: PeerId, receiver: PeerId, message: bytes) -> bool:
        """Put ``message`` on the link; False when the link's loss took it."""
        with self._lock:
            faults = self._faults.get((sender, receiver), LinkFaults())
            if faults.loss and self._rng.random() < faults.loss:
                return False
            now_s = self.clock()
            start_s = now_s + faults.delay_s
            if faults.bytes_per_s is not None:
                # The link carries one message after the other at its rate.
                start_s = max(start_s, self._link_free_at_s.get((sender, receiver), 0.0))
                start_s += len(message) / faults.bytes_per_s
                self._link_free_at_s[(sender, receiver)] = start_s
            self._slots[(sender, receiver)] = _InFlight(start_s, message)  # the newest replaces an older one
            self._lock.notify_all()
            return True

    def _take(self, receiver: PeerId, max_messages: int) -> list[Received]:
        with self._lock:
            now_s = self.clock()
            ready = sorted(
                (flight.deliver_at_s, sender)
                for (sender, to), flight in self._slots.items()
                if to == receiver and flight.deliver_at_s <= now_s
            )[:max_messages]
            return [
                Received(sender, memoryview(self._slots.pop((sender, receiver)).message))
                for _, sender in ready
            ]

    def _wait(self, receiver: PeerId, timeout_s: float) -> None:
        """Sleep until a message to ``receiver`` may be ready, at most ``timeout_s``."""
        with self._lock:
            due = [f.deliver_at_s for (_, to), f in self._slots.items() if to == receiver]
            if due:
                timeout_s = min(timeout_s, max(0.0, min(due) - self.clock()))
            self._lock.wait(timeout_s)


class MemoryTransport:
    """One node's ``link.Transport`` on a :class:`MemoryNetwork` (see the module docstring)."""

    def __init__(self, network: MemoryNetwork, peer: PeerId, neighbours: tuple[PeerId, ...]) -> None:
        self.network = network
        self.peer = peer
        self.neighbours = neighbours
        self.stats = TransportStats()
        self.closed = False

    def send(self, message: Buffer, peers: Sequence[PeerId] | None = None) -> int:
        data = bytes(message)  # the sender may reuse its buffer; the network keeps its own copy
        taken = 0
        for peer in self.neighbours if peers is None else peers:
            if peer not in self.neighbours or self.closed:
                continue
            if not self.network._send(self.peer, peer, data):
                self.stats.dropped[DROP_FAULT] += 1
                continue
            taken += 1
            self.stats.messages_sent += 1
            self.stats.bytes_sent += message_bytes(data)
        return taken

    def receive(self, timeout_s: float, max_messages: int = 64) -> list[Received]:
        got = self.network._take(self.peer, max_messages)
        deadline_s = time.monotonic() + timeout_s
        while not got and self.network.real_time and time.monotonic() < deadline_s:
            self.network._wait(self.peer, deadline_s - time.monotonic())
            got = self.network._take(self.peer, max_messages)
        for item in got:
            self.stats.messages_received += 1
            self.stats.bytes_received += item.message.nbytes
        return got

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> MemoryTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def memory_transports(
    neighbours: Mapping[PeerId, Sequence[PeerId]],
    *,
    clock: Callable[[], float] = time.monotonic,
    seed: int = 0,
) -> tuple[MemoryNetwork, dict[PeerId, MemoryTransport]]:
    """A network and one attached transport per node of an adjacency map."""
    network = MemoryNetwork(clock=clock, seed=seed)
    return network, {peer: network.attach(peer, peers) for peer, peers in neighbours.items()}
