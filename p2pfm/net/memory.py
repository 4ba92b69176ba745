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
from collections.abc import Callable, Collection, Mapping, Sequence
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


Arrival = Callable[[PeerId, float], None]  # (receiver, deliver_at_s): a message is on its way
Forward = Callable[[PeerId, PeerId, float, bytes], None]  # (sender, receiver, deliver_at_s, message)


class MemoryNetwork:
    """The shared medium of some MemoryTransports. Thread-safe (nodes may run in threads).

    A simulator spread over processes gives each process its own network:
    ``forward`` then carries a message to a receiver attached elsewhere and
    ``inject`` puts one that came from elsewhere on its link; ``on_arrival``
    tells the simulator's scheduler when to wake a receiver.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        seed: int = 0,
        forward: Forward | None = None,
        on_arrival: Arrival | None = None,
        default_faults: LinkFaults | None = None,
    ) -> None:
        self.clock = clock
        self.default_faults = default_faults or _NO_FAULTS  # of every link without faults of its own
        self.real_time = clock is time.monotonic  # only then may receive() sleep
        self.forward, self.on_arrival = forward, on_arrival
        self._rng = random.Random(seed)  # fault injection only; not security relevant
        self._lock = threading.Condition()
        self._faults: dict[tuple[PeerId, PeerId], LinkFaults] = {}
        # receiver -> sender -> the link's messages in send order: those still
        # in flight, and at most one that has arrived and is not yet read (the
        # newest: a conflating socket keeps no other).
        self._links: dict[PeerId, dict[PeerId, list[_InFlight]]] = {}
        # receiver -> sender -> control messages in send order (not conflated; at most _MAX_CONTROL kept)
        self._control: dict[PeerId, dict[PeerId, list[_InFlight]]] = {}
        self._link_free_at_s: dict[tuple[PeerId, PeerId], float] = {}
        self._nodes: dict[PeerId, MemoryTransport] = {}  # attached and up

    def set_faults(self, sender: PeerId, receiver: PeerId, faults: LinkFaults) -> None:
        with self._lock:
            self._faults[(sender, receiver)] = faults

    def attach(self, peer: PeerId, neighbours: Sequence[PeerId]) -> MemoryTransport:
        """The transport of node ``peer``, linked to ``neighbours`` (again, after a ``detach``)."""
        with self._lock:
            if peer in self._nodes:
                raise LocalProtocolError(f"node {peer.short} is already attached")
            transport = MemoryTransport(self, peer, tuple(neighbours))
            self._nodes[peer] = transport
            now_s = self.clock()
            for table in (self._links, self._control):
                links = table.setdefault(peer, {})
                for sender, flights in links.items():  # what arrived while it was down is lost
                    links[sender] = [f for f in flights if f.deliver_at_s > now_s]
            return transport

    def detach(self, peer: PeerId) -> None:
        """Take node ``peer`` off the network (it crashed): messages that arrive while it is down are lost.

        Those still in flight when it attaches again arrive, as on a real
        link to a process that restarted quickly.
        """
        with self._lock:
            self._nodes.pop(peer, None)

    def next_arrival_s(self, receiver: PeerId) -> float | None:
        """When the earliest message still on its way to ``receiver`` arrives (None: nothing is)."""
        with self._lock:
            now_s = self.clock()
            due = [
                f.deliver_at_s
                for table in (self._links, self._control)
                for flights in table.get(receiver, {}).values()
                for f in flights
                if f.deliver_at_s > now_s
            ]
            return min(due) if due else None

    def inject(self, sender: PeerId, receiver: PeerId, deliver_at_s: float, message: bytes) -> None:
        """Put a message that another process's network carried on the link ``sender -> receiver``."""
        with self._lock:
            stored = self._put(sender, receiver, deliver_at_s, message)
        if stored and self.on_arrival is not None:
            self.on_arrival(receiver, deliver_at_s)

    def _send(self, sender: PeerId, receiver: PeerId, message: bytes, *, control: bool = False) -> bool:
        """Put ``message`` on the link; False when the link's loss took it."""
        with self._lock:
            faults = self._faults.get((sender, receiver), self.default_faults)
            if faults.loss and self._rng.random() < faults.loss:
                return False
            deliver_at_s = self.clock() + faults.delay_s
            if faults.bytes_per_s is not None:
                # The link carries one message after the other at its rate.
                deliver_at_s = max(deliver_at_s, self._link_free_at_s.get((sender, receiver), 0.0))
                deliver_at_s += len(message) / faults.bytes_per_s
                self._link_free_at_s[(sender, receiver)] = deliver_at_s
            if control:
                self._put_control(sender, receiver, deliver_at_s, message)
            elif receiver not in self._links:  # never attached here
                if self.forward is not None:
                    self.forward(sender, receiver, deliver_at_s, message)
                return True
            else:
                self._put(sender, receiver, deliver_at_s, message)
        if self.on_arrival is not None:
            self.on_arrival(receiver, deliver_at_s)
        return True

    def _put(self, sender: PeerId, receiver: PeerId, deliver_at_s: float, message: bytes) -> bool:
        links = self._links.get(receiver)
        if links is None:
            return False  # a receiver this network has never seen: lost
        flights = links.setdefault(sender, [])
        flights.append(_InFlight(deliver_at_s, message))
        flights.sort(key=lambda f: f.deliver_at_s)  # stable: send order among equal times
        # Conflation happens when the receiver reads (it keeps the newest that
        # has arrived by then); the oldest beyond this many could never be it.
        del flights[:-_MAX_IN_FLIGHT]
        self._lock.notify_all()
        return True

    def _put_control(self, sender: PeerId, receiver: PeerId, deliver_at_s: float, message: bytes) -> None:
        links = self._control.get(receiver)
        if links is None:
            return  # nobody was ever attached there: lost, as a connect to a dead address
        flights = links.setdefault(sender, [])
        if len(flights) >= _MAX_CONTROL:
            return  # the link's queue is full: dropped (a bounded high-water mark, as ZeroMQ's)
        flights.append(_InFlight(deliver_at_s, message))
        flights.sort(key=lambda f: f.deliver_at_s)
        self._lock.notify_all()

    def _take_control(self, receiver: PeerId, max_messages: int, now_s: float) -> list[Received]:
        out: list[tuple[float, PeerId, int, Received]] = []
        for sender, flights in self._control.get(receiver, {}).items():
            for k, flight in enumerate(flights):
                if flight.deliver_at_s > now_s:
                    break
                out.append(
                    (flight.deliver_at_s, sender, k, Received(sender, memoryview(flight.message), True))
                )
        out.sort(key=lambda item: (item[0], item[1].key, item[2]))
        taken = out[:max_messages]
        for _, sender, _, _ in taken:
            del self._control[receiver][sender][0]
        return [item[3] for item in taken]

    def _take(self, receiver: PeerId, max_messages: int) -> list[Received]:
        with self._lock:
            if receiver not in self._nodes:
                return []
            now_s = self.clock()
            control = self._take_control(receiver, max_messages, now_s)
            links = self._links.get(receiver)
            if not links:
                return control
            max_messages -= len(control)
            ready = []
            for sender, flights in links.items():
                arrived = sum(1 for f in flights if f.deliver_at_s <= now_s)
                if arrived:  # the newest that has arrived; older ones were replaced in the socket
                    ready.append((flights[arrived - 1].deliver_at_s, sender, arrived))
            ready.sort(key=lambda item: (item[0], item[1].key))  # by arrival, then sender: reproducible
            out = []
            for _, sender, arrived in ready[:max_messages]:
                flights = links[sender]
                out.append(Received(sender, memoryview(flights[arrived - 1].message)))
                del flights[:arrived]
            return control + out

    def _wait(self, receiver: PeerId, timeout_s: float) -> None:
        """Sleep until a message to ``receiver`` may be ready, at most ``timeout_s``."""
        with self._lock:
            due = [
                f.deliver_at_s
                for table in (self._links, self._control)
                for flights in table.get(receiver, {}).values()
                for f in flights
            ]
            if due:
                timeout_s = min(timeout_s, max(0.0, min(due) - self.clock()))
            self._lock.wait(timeout_s)


_NO_FAULTS = LinkFaults()
_MAX_IN_FLIGHT = 64  # messages kept per link, in flight or arrived and unread
_MAX_CONTROL = 64  # control messages queued per link


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

    def send_control(self, peer: PeerId, address: str, message: Buffer) -> bool:
        """A control message to any peer on this network (``address`` is not needed in memory)."""
        del address
        if self.closed:
            return False
        data = bytes(message)
        if not self.network._send(self.peer, peer, data, control=True):
            self.stats.dropped[DROP_FAULT] += 1
            return False
        self.stats.messages_sent += 1
        self.stats.bytes_sent += len(data)
        return True

    def set_peers(self, peers: Mapping[PeerId, str]) -> None:
        self.neighbours = tuple(peers)

    def admit(self, peers: Collection[PeerId]) -> None:
        """In memory nobody connects: admission is the membership's and the protocol's checks alone."""
        del peers

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
