"""What a node needs from whatever moves its messages: the ``Transport`` interface.

Two implementations: ``p2pfm.net.zmq_transport.ZmqTransport`` (ZeroMQ over TCP,
CurveZMQ, the real network) and ``p2pfm.net.memory.MemoryTransport`` (in one
process, with per-link loss, delay and rate limits, for the simulator and
tests). The node is written against this interface only, as httpcore's
clients are against its network backend, so what runs in memory is what runs
on the network. Nothing here imports zmq.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from p2pfm.core.identity import PeerId
from p2pfm.core.wire import Buffer

DROP_QUEUE_FULL = "send_queue_full"  # neighbour down or not keeping up
DROP_FAULT = "fault_injected"  # scenario `drop` fault, or the in-memory link's loss


@dataclass(frozen=True)
class Received:
    """One message and the peer authenticated on the link it came on (None: not authenticated)."""

    link: PeerId | None
    message: memoryview
    control: bool = False  # came on the control channel (membership), not the updates' one


@dataclass
class TransportStats:
    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # by reason
    refused_connections: int = 0  # CurveZMQ handshakes from keys not allowed in
    connections_accepted: int = 0  # TCP connections accepted on the listen socket
    connections_closed: int = 0  # ... and closed again (by the peer, or by us: oversized frame, timeout)
    handshakes_completed: int = 0
    links_rebuilt: int = 0  # PUSH sockets built anew after libzmq gave up on them (protocol error)
    handshake_failures: Counter[str] = field(default_factory=Counter)  # by kind: no_detail/protocol/auth


class Transport(Protocol):
    """Moves whole messages between a node and its neighbours; never blocks on send."""

    stats: TransportStats

    def send(self, message: Buffer, peers: Sequence[PeerId] | None = None) -> int:
        """Queue ``message`` to every neighbour (or ``peers``); return how many links took it."""
        ...

    def receive(self, timeout_s: float, max_messages: int = 64) -> list[Received]:
        """Wait up to ``timeout_s`` for a message, then return what is waiting (at most ``max_messages``)."""
        ...

    def close(self) -> None:
        """Release everything; idempotent."""
        ...


@runtime_checkable
class ControlTransport(Transport, Protocol):
    """A transport that also carries membership control messages (p2pfm/core/control.py).

    Control messages travel apart from updates: the updates' inbox keeps only
    the newest message per link (it conflates), and a join request must not
    replace an update, nor the other way round. The control channel keeps a
    small bounded queue per link instead, and reaches any peer whose address
    is known, not only the neighbours. ``set_peers`` replaces the neighbours
    that ``send`` reaches when the membership changes the active view.
    """

    def send_control(self, peer: PeerId, address: str, message: Buffer) -> bool:
        """Queue one control message to ``peer`` at ``address``; False when it was dropped."""
        ...

    def set_peers(self, peers: Mapping[PeerId, str]) -> None:
        """The neighbours (peer -> address) that updates go to from now on."""
        ...

    def admit(self, peers: Collection[PeerId]) -> None:
        """The keys allowed to connect from now on (a newer roster)."""
        ...
