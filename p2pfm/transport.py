"""ZeroMQ transport: the only module that imports zmq.

Socket pattern (why, in docs/architecture.md): every node **binds one PULL**
socket at its listen address and **connects one PUSH socket to each
neighbour's** PULL. A message to a neighbour goes down that neighbour's own
PUSH socket, so each link has its own bounded queue, its own drop count and
its own fault injection, and a slow or dead neighbour only ever fills its
own queue.

- Bounded memory: each PUSH queue holds at most ``send_queue_messages``
  whole messages (ZeroMQ keeps multipart messages atomic), the PULL queue
  ``recv_queue_messages``; any single frame above ``max_frame_bytes`` makes
  ZeroMQ drop the sender's connection (``MAXMSGSIZE``).
- Never blocks: sends are non-blocking; a full queue (neighbour down or too
  slow) drops the message for that link and counts it. Messages queued while
  a neighbour is not yet up are delivered when it comes up.
- Reconnects: ZeroMQ re-dials a restarted neighbour by itself.
- Zero copy: tensor frames are handed to ZeroMQ without copying and received
  as views of ZeroMQ's buffers.
- Encrypted and authenticated: every link runs CurveZMQ with X25519 keys
  derived from the nodes' Ed25519 identities (``Identity.curve_keypair``), and
  a ZAP handler admits only the allowed peers (the roster's members, or the
  neighbours); any other key gets no connection. Plaintext needs the
  explicit ``insecure`` setting.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import zmq
import zmq.auth.thread
from zmq.utils import z85

from p2pfm.errors import ConfigError
from p2pfm.identity import Identity, PeerId, curve_public_key
from p2pfm.wire import Buffer, message_bytes

DROP_QUEUE_FULL = "send_queue_full"  # neighbour down or not keeping up
DROP_FAULT = "fault_injected"  # scenario `drop` fault


@dataclass(frozen=True)
class TransportSettings:
    send_queue_messages: int = 2  # per neighbour; only the newest state matters
    recv_queue_messages: int = 64
    max_frame_bytes: int = 512 * 2**20
    reconnect_interval_ms: int = 100
    reconnect_interval_max_ms: int = 2000
    linger_ms: int = 2000  # on close, time to flush the last round's messages
    insecure: bool = False  # plaintext links, no peer authentication: debugging only

    def __post_init__(self) -> None:
        for name in ("send_queue_messages", "recv_queue_messages", "max_frame_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"transport.{name}", "must be >= 1")


@dataclass
class TransportStats:
    messages_sent: int = 0
    bytes_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # by reason
    refused_connections: int = 0  # CurveZMQ handshakes from keys not allowed in


class _Admission:
    """ZAP credentials provider: admits the CurveZMQ keys of allowed peers only."""

    def __init__(self, allowed: frozenset[bytes], stats: TransportStats) -> None:
        self._allowed = allowed  # Z85-encoded X25519 public keys
        self._stats = stats

    def callback(self, domain: str, key: bytes) -> bool:
        del domain
        if key in self._allowed:
            return True
        self._stats.refused_connections += 1
        return False


def check_address(field_name: str, address: str) -> str:
    """Accept ``tcp://host:port`` (and ``ipc://``/``inproc://`` for tests); name the field otherwise."""
    if address.startswith(("ipc://", "inproc://")):
        return address
    host, sep, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not sep or not host or not port.isdigit():
        raise ConfigError(field_name, f"{address!r} is not an address like tcp://127.0.0.1:5550")
    if not 0 < int(port) < 65536:
        raise ConfigError(field_name, f"port {port} is out of range 1..65535")
    return address


class Transport:
    """One PULL in, one PUSH per neighbour out (see module docstring)."""

    def __init__(
        self,
        listen: str,
        peers: Mapping[PeerId, str],
        settings: TransportSettings | None = None,
        *,
        identity: Identity | None = None,
        allowed: Collection[PeerId] | None = None,
        link_drop_prob: Mapping[PeerId, float] | None = None,
        seed: int = 0,
    ) -> None:
        """``identity`` is required unless ``settings.insecure``; ``allowed``
        (default: ``peers``) are the keys admitted to connect to us."""
        self.settings = settings or TransportSettings()
        self.stats = TransportStats()
        self._link_drop_prob = dict(link_drop_prob or {})
        self._rng = random.Random(seed)  # fault injection only; not security relevant
        self._context = zmq.Context()
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        own_keys: tuple[bytes, bytes] | None = None
        if not self.settings.insecure:
            if identity is None:
                raise ConfigError("transport.insecure", "a secure transport needs the node's identity")
            public, secret = identity.curve_keypair()
            own_keys = (z85.encode(public), z85.encode(secret))
            admitted = frozenset(
                z85.encode(curve_public_key(p)) for p in (peers if allowed is None else allowed)
            )
            self._auth = zmq.auth.thread.ThreadAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve_callback("*", _Admission(admitted, self.stats))
        try:
            self._inbound = self._context.socket(zmq.PULL)
            if own_keys is not None:
                self._inbound.curve_server = True
                self._inbound.curve_publickey, self._inbound.curve_secretkey = own_keys
            self._inbound.setsockopt(zmq.RCVHWM, self.settings.recv_queue_messages)
            self._inbound.setsockopt(zmq.MAXMSGSIZE, self.settings.max_frame_bytes)
            self._inbound.setsockopt(zmq.LINGER, 0)
            try:
                self._inbound.bind(listen)
            except zmq.ZMQError as exc:
                raise ConfigError("node.listen", f"cannot listen on {listen}: {exc}") from None
            self._outbound: dict[PeerId, zmq.Socket[bytes]] = {}
            for peer, address in peers.items():
                sock = self._context.socket(zmq.PUSH)
                sock.setsockopt(zmq.SNDHWM, self.settings.send_queue_messages)
                sock.setsockopt(zmq.LINGER, self.settings.linger_ms)
                sock.setsockopt(zmq.RECONNECT_IVL, self.settings.reconnect_interval_ms)
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.settings.reconnect_interval_max_ms)
                if own_keys is not None:
                    sock.curve_serverkey = z85.encode(curve_public_key(peer))
                    sock.curve_publickey, sock.curve_secretkey = own_keys
                sock.connect(address)
                self._outbound[peer] = sock
        except BaseException:
            if self._auth is not None:
                self._auth.stop()
            self._context.destroy(linger=0)
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._inbound, zmq.POLLIN)
        self.closed = False

    @property
    def listen_address(self) -> str:
        """The bound address (resolves a ``tcp://host:*`` wildcard port)."""
        endpoint = self._inbound.getsockopt(zmq.LAST_ENDPOINT)
        return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)

    def send(self, frames: Sequence[Buffer], peers: Sequence[PeerId] | None = None) -> int:
        """Queue one message to every neighbour (or ``peers``); returns how many took it.

        Never blocks. The frames must not be modified afterwards: ZeroMQ
        sends them from the caller's memory.
        """
        size = message_bytes(frames)
        taken = 0
        for peer in self._outbound if peers is None else peers:
            if self._rng.random() < self._link_drop_prob.get(peer, 0.0):
                self.stats.dropped[DROP_FAULT] += 1
                continue
            try:
                self._outbound[peer].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.stats.dropped[DROP_QUEUE_FULL] += 1
                continue
            taken += 1
            self.stats.messages_sent += 1
            self.stats.bytes_sent += size
        return taken

    def receive(self, timeout_s: float, max_messages: int = 64) -> list[list[memoryview]]:
        """Wait up to ``timeout_s`` for a message, then drain what is queued (at most ``max_messages``)."""
        out: list[list[memoryview]] = []
        if not self._poller.poll(max(0, int(timeout_s * 1000))):
            return out
        while len(out) < max_messages:
            try:
                parts = self._inbound.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            views = [part.buffer for part in parts]
            self.stats.messages_received += 1
            self.stats.bytes_received += sum(v.nbytes for v in views)
            out.append(views)
        return out

    def close(self) -> None:
        """Flush for up to ``linger_ms`` and release every socket. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._inbound.close(linger=0)
        for sock in self._outbound.values():
            sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
