"""ZeroMQ transport (``link.Transport`` over TCP): the only module that imports zmq.

Socket pattern (why, in docs/architecture.md): every node **binds one PULL**
socket at its listen address and **connects one PUSH socket to each
neighbour's** PULL. A message to a neighbour goes down that neighbour's own
PUSH socket, so each link has its own bounded queue, its own drop count and
its own fault injection, and a slow or dead neighbour only ever fills its
own queue.

- Bounded memory, also against peers that lie: a message is one ZeroMQ
  frame (wire version 2), and the PULL socket refuses any frame above
  ``max_message_bytes`` (``MAXMSGSIZE``, derived by the node from the largest
  legitimate message of its schema), which libzmq checks from the frame's
  size field, before buffering, even before the CurveZMQ handshake. The
  PULL socket *conflates* (``ZMQ_CONFLATE``): it keeps only the newest frame
  per connection, so a multipart message (which libzmq would otherwise
  buffer whole) or a flood costs one frame per link. PUSH sockets receive
  nothing but handshake commands and refuse frames above 64 KiB.
- A short handshake interval (``handshake_timeout_ms``) drops connections
  that never finish the CurveZMQ handshake; failed handshakes are counted by
  kind from the socket monitor.
- Never blocks: sends are non-blocking; a full queue (neighbour down or too
  slow) drops the message for that link and counts it. Messages queued while
  a neighbour is not yet up are delivered when it comes up.
- Reconnects: ZeroMQ re-dials a restarted neighbour by itself.
- Encrypted and authenticated: every link runs CurveZMQ with X25519 keys
  derived from the nodes' Ed25519 identities (``Identity.curve_keypair``), and
  a ZAP handler admits only the allowed peers (the roster's members, or the
  neighbours); any other key gets no connection. Each received message comes
  with the peer authenticated on its connection (the ZAP User-Id), so the
  protocol can refuse a message signed by anyone else. Plaintext needs the
  explicit ``insecure`` setting, and then no link identity is known.
- Large messages reuse memory: a node whose messages can exceed glibc's
  largest mmap threshold (32 MiB) makes the process keep the memory it
  frees (:func:`keep_large_buffers`). libzmq allocates every frame it
  receives afresh and, with CURVE, two more buffers per frame it encrypts;
  glibc serves each such allocation with a new mapping and unmaps it on
  free, so every one cost the kernel's page faults and zeroing (on the
  2-core machine more than the encryption itself: docs/benchmarks.md,
  averaging).
"""

from __future__ import annotations

import ctypes
import functools
import resource
import time
from collections.abc import Collection, Mapping, Sequence

import zmq
import zmq.auth.thread
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from p2pfm.config.settings import TransportSettings
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import Identity, PeerId, curve_public_key
from p2pfm.core.wire import Buffer, WireLimits, message_bytes
from p2pfm.net.link import DROP_FAULT, DROP_QUEUE_FULL, Received, TransportStats
from p2pfm.net.zmq_control import ControlLinks, HelloServer

# A PUSH socket only ever receives CurveZMQ handshake commands (WELCOME,
# READY: a few hundred bytes); anything larger is an attack on our memory.
PUSH_MAX_INBOUND_BYTES = 64 * 2**10
_HANDSHAKE_FAILURES: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "no_detail",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth",
}
_MONITORED = zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
for _event in _HANDSHAKE_FAILURES:
    _MONITORED |= _event
# On a PUSH socket: libzmq re-dials after a lost connection (CONNECT_RETRIED
# follows DISCONNECTED at once) but *not* after a protocol error (a bad
# greeting, an oversized frame): it ends the session for good. So anyone
# who answers once at a neighbour's address while it is down could cut the
# link until a restart. A DISCONNECTED not followed by a retry within
# _RELINK_GRACE_S makes the transport build that socket anew.
_PUSH_MONITORED = zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_CONNECTED
_RELINK_GRACE_S = 1.0
# CurveZMQ wraps a frame of n bytes into a MESSAGE command of n + 33 bytes
# (name 8, nonce 8, MAC 16, flags 1), and libzmq bounds the wrapped size.
CURVE_FRAME_OVERHEAD_BYTES = 33
CONTROL_QUEUE_MESSAGES = 16  # control messages queued per connection (the channel does not conflate)


# glibc serves an allocation above its mmap threshold, which it never raises
# above 32 MiB on 64-bit, with a fresh mapping (mallopt(3)).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # <malloc.h>
_KEEP_UNTRIMMED_BYTES = 2**31 - 1  # the largest int mallopt takes


@functools.cache
def keep_large_buffers() -> bool:
    """Make glibc keep and reuse the memory this process frees; True when applied (glibc only).

    Three ``mallopt`` settings: large allocations come from the heap instead
    of fresh mappings (``M_MMAP_MAX = 0``), freed memory is not returned to
    the kernel (``M_TRIM_THRESHOLD`` at its largest), and threads started
    from now on share the main arena (``M_ARENA_MAX = 1``). The last matters
    because a thread's own arena cannot hold a chunk above 64 MiB, so glibc
    maps such chunks afresh whatever the other two say; libzmq's I/O thread
    starts with the first socket, so this must run before the first
    ``zmq.Context`` creates one (ZmqTransport calls it before its own), and
    its I/O thread gets the main arena only where few other threads have
    arenas of their own: to cover every thread, a process calls this
    first thing, before it imports torch.

    The price: the process's memory stays at its high-water mark (a node
    allocates the same sizes every round, so it reuses it) and its threads
    share one arena lock. Security is unchanged: what a peer can make us
    buffer stays bounded by ``MAXMSGSIZE`` per connection.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  glibc only (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_UNTRIMMED_BYTES))
    return all(mallopt(param, value) == 1 for param, value in settings)


class _Admission:
    """ZAP credentials provider: admits the CurveZMQ keys of allowed peers only."""

    def __init__(self, allowed: frozenset[bytes], stats: TransportStats) -> None:
        # Z85-encoded X25519 public keys; replaced whole (one reference swap) when the roster changes,
        # so the authenticator thread never sees a half-updated set.
        self._allowed = allowed
        self._stats = stats

    def callback(self, domain: str, key: bytes) -> bool:
        del domain
        if key in self._allowed:
            return True
        self._stats.refused_connections += 1
        return False


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit; return (soft, hard).

    Every TCP connection costs a descriptor, before any authentication: with
    the common soft limit of 1024, a thousand bare connects would leave the
    node none for its checkpoint. The hard limit is what an unprivileged
    process may take.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, hard
        soft = target
    return soft, hard


class ZmqTransport:
    """ZeroMQ's ``link.Transport``: one conflating PULL in, one PUSH per neighbour out (module docstring)."""

    def __init__(
        self,
        listen: str,
        peers: Mapping[PeerId, str],
        settings: TransportSettings | None = None,
        *,
        identity: Identity | None = None,
        allowed: Collection[PeerId] | None = None,
        max_message_bytes: int = WireLimits().max_message_bytes,
        control_listen: str | None = None,
        hello_listen: str | None = None,
        record: bytes | None = None,
        max_control_bytes: int = 0,
    ) -> None:
        """``identity`` is required unless ``settings.insecure``; ``allowed``
        (default: ``peers``) are the keys admitted to connect to us;
        ``max_message_bytes`` is the largest message accepted (frames above it
        cost the sender its connection). ``control_listen`` opens the
        membership control channel there (messages of at most
        ``max_control_bytes``); ``hello_listen`` serves ``record`` (this
        node's signed peer record) in plaintext to whoever asks
        (p2pfm/net/zmq_control.py)."""
        self.settings = settings or TransportSettings()
        self.stats = TransportStats()
        self.max_message_bytes = max_message_bytes
        # Before the context starts libzmq's I/O thread (module docstring: large messages).
        self.keeps_buffers = max_message_bytes > GLIBC_MMAP_THRESHOLD_MAX and keep_large_buffers()
        self._context = zmq.Context()
        self._auth: zmq.auth.thread.ThreadAuthenticator | None = None
        self._links: dict[str, PeerId] = {}  # ZAP User-Id (Z85 CurveZMQ key) -> peer
        own_keys: tuple[bytes, bytes] | None = None
        if not self.settings.insecure:
            if identity is None:
                raise ConfigError("transport.insecure", "a secure transport needs the node's identity")
            public, secret = identity.curve_keypair()
            own_keys = (z85.encode(public), z85.encode(secret))
            for peer in peers if allowed is None else allowed:
                self._links[z85.encode(curve_public_key(peer)).decode()] = peer
            self._auth = zmq.auth.thread.ThreadAuthenticator(self._context)
            self._auth.start()
            admitted = frozenset(key.encode() for key in self._links)
            self._admission = _Admission(admitted, self.stats)
            self._auth.configure_curve_callback("*", self._admission)
        try:
            self._inbound = self._make_inbound(listen, own_keys)
            self._monitor = self._inbound.get_monitor_socket(_MONITORED)
            self._own_keys = own_keys
            self._addresses = dict(peers)
            self._outbound: dict[PeerId, zmq.Socket[bytes]] = {}
            self._push_monitors: dict[PeerId, zmq.Socket[bytes]] = {}
            self._lost_since: dict[PeerId, float] = {}  # disconnected, no retry seen yet (monotonic s)
            for peer in peers:
                self._open_outbound(peer)
            self._control_in: zmq.Socket[bytes] | None = None
            if control_listen is not None:
                self._control_in = self._make_control_inbound(control_listen, own_keys, max_control_bytes)
            self._hello = (
                None if hello_listen is None or record is None else self._make_hello(hello_listen, record)
            )
            self._control_out = ControlLinks(
                self._context, own_keys, self.stats, handshake_timeout_ms=self.settings.handshake_timeout_ms
            )
        except BaseException:
            if self._auth is not None:
                self._auth.stop()
            self._context.destroy(linger=0)
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._inbound, zmq.POLLIN)
        if self._control_in is not None:
            self._poller.register(self._control_in, zmq.POLLIN)
        self.closed = False

    def _make_inbound(self, listen: str, own_keys: tuple[bytes, bytes] | None) -> zmq.Socket[bytes]:
        """The updates' PULL: conflating (one frame per connection), frames of at most max_message_bytes."""
        options: dict[int, int] = {zmq.CONFLATE: 1}
        return self._bind_pull(listen, own_keys, self.max_message_bytes, options, "node.listen")

    def _make_control_inbound(
        self, listen: str, own_keys: tuple[bytes, bytes] | None, max_control_bytes: int
    ) -> zmq.Socket[bytes]:
        """The control channel's PULL: not conflating (a join must not replace a reply), a small queue."""
        options: dict[int, int] = {zmq.RCVHWM: CONTROL_QUEUE_MESSAGES}
        return self._bind_pull(listen, own_keys, max_control_bytes, options, "membership.control_listen")

    def _bind_pull(
        self,
        listen: str,
        own_keys: tuple[bytes, bytes] | None,
        max_bytes: int,
        options: Mapping[int, int],
        field: str,
    ) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.PULL)
        if own_keys is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = own_keys
        for option, value in options.items():
            sock.setsockopt(option, value)
        overhead = 0 if own_keys is None else CURVE_FRAME_OVERHEAD_BYTES
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + overhead)
        sock.setsockopt(zmq.HANDSHAKE_IVL, self.settings.handshake_timeout_ms)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(listen)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(field, f"cannot listen on {listen}: {exc}") from None
        return sock

    def _make_hello(self, listen: str, record: bytes) -> HelloServer:
        try:
            return HelloServer(self._context, listen, record)
        except zmq.ZMQError as exc:
            raise ConfigError("membership.hello_listen", f"cannot listen on {listen}: {exc}") from None

    # ----------------------------------------------------------- membership

    def send_control(self, peer: PeerId, address: str, message: Buffer) -> bool:
        """A control message to ``peer``'s control endpoint ``address`` (CurveZMQ to its key)."""
        if self.closed:
            return False
        return self._control_out.send(peer, address, message)

    def set_peers(self, peers: Mapping[PeerId, str]) -> None:
        """The neighbours updates go to from now on: PUSH sockets opened and closed to match."""
        for peer in [p for p in self._outbound if p not in peers or peers[p] != self._addresses.get(p)]:
            self._outbound[peer].disable_monitor()
            self._push_monitors.pop(peer).close(linger=0)
            self._outbound.pop(peer).close()
            self._lost_since.pop(peer, None)
        self._addresses = dict(peers)
        for peer in peers:
            if peer not in self._outbound:
                self._open_outbound(peer)

    def admit(self, peers: Collection[PeerId]) -> None:
        """The keys allowed to connect from now on (a newer roster); open connections are not cut."""
        if self._auth is None:
            return
        self._links = {z85.encode(curve_public_key(peer)).decode(): peer for peer in peers}
        self._admission._allowed = frozenset(key.encode() for key in self._links)

    @property
    def hello_address(self) -> str | None:
        return None if self._hello is None else self._hello.address

    @property
    def control_address(self) -> str | None:
        if self._control_in is None:
            return None
        endpoint = self._control_in.getsockopt(zmq.LAST_ENDPOINT)
        return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)

    def _open_outbound(self, peer: PeerId) -> None:
        sock = self._make_outbound(peer, self._addresses[peer], self._own_keys)
        self._outbound[peer] = sock
        self._push_monitors[peer] = sock.get_monitor_socket(_PUSH_MONITORED)
        self._lost_since.pop(peer, None)

    def _rebuild_outbound(self, peer: PeerId) -> None:
        """Replace a PUSH socket libzmq stopped re-dialling (its queued messages are dropped)."""
        self._outbound[peer].disable_monitor()
        self._push_monitors.pop(peer).close(linger=0)
        self._outbound.pop(peer).close(linger=0)
        self._open_outbound(peer)
        self.stats.links_rebuilt += 1

    def _make_outbound(
        self, peer: PeerId, address: str, own_keys: tuple[bytes, bytes] | None
    ) -> zmq.Socket[bytes]:
        sock = self._context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.settings.send_queue_messages)
        sock.setsockopt(zmq.LINGER, self.settings.linger_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, self.settings.reconnect_interval_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, self.settings.reconnect_interval_max_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, PUSH_MAX_INBOUND_BYTES)
        sock.setsockopt(zmq.HANDSHAKE_IVL, self.settings.handshake_timeout_ms)
        if own_keys is not None:
            sock.curve_serverkey = z85.encode(curve_public_key(peer))
            sock.curve_publickey, sock.curve_secretkey = own_keys
        sock.connect(address)
        return sock

    @property
    def listen_address(self) -> str:
        """The bound address (resolves a ``tcp://host:*`` wildcard port)."""
        endpoint = self._inbound.getsockopt(zmq.LAST_ENDPOINT)
        return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)

    def send(self, message: Buffer, peers: Sequence[PeerId] | None = None) -> int:
        """Queue one message to every neighbour (or ``peers``); returns how many took it.

        Never blocks. The message must not be modified afterwards: ZeroMQ
        sends it from the caller's memory.
        """
        self._check_links()
        size = message_bytes(message)
        taken = 0
        for peer in self._outbound if peers is None else peers:
            if peer not in self._outbound:
                continue
            try:
                self._outbound[peer].send(message, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self.stats.dropped[DROP_QUEUE_FULL] += 1
                continue
            taken += 1
            self.stats.messages_sent += 1
            self.stats.bytes_sent += size
        return taken

    def receive(self, timeout_s: float, max_messages: int = 64) -> list[Received]:
        """Wait up to ``timeout_s`` for a message, then drain what is queued (at most ``max_messages``).

        The inbound socket conflates, so at most one (the newest) message per
        connection is waiting.
        """
        out: list[Received] = []
        ready = self._poller.poll(max(0, int(timeout_s * 1000)))
        self._drain_monitor()
        self._check_links()
        if not ready:
            return out
        while self._control_in is not None and len(out) < max_messages:
            try:
                frame = self._control_in.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            self.stats.messages_received += 1
            self.stats.bytes_received += frame.buffer.nbytes
            out.append(Received(self._link_of(frame), frame.buffer, control=True))
        while len(out) < max_messages:
            try:
                frame = self._inbound.recv(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            view = frame.buffer
            self.stats.messages_received += 1
            self.stats.bytes_received += view.nbytes
            out.append(Received(self._link_of(frame), view))
        return out

    def _link_of(self, frame: zmq.Frame) -> PeerId | None:
        if self.settings.insecure:
            return None
        # The ZAP handler set the User-Id to the client's Z85 CurveZMQ key;
        # only keys in self._links were admitted.
        user_id = frame.get("User-Id")
        return self._links.get(user_id) if isinstance(user_id, str) else None

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(flags=zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                self.stats.connections_accepted += 1
            elif kind == zmq.EVENT_DISCONNECTED:
                self.stats.connections_closed += 1
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.stats.handshakes_completed += 1
            elif kind in _HANDSHAKE_FAILURES:
                self.stats.handshake_failures[_HANDSHAKE_FAILURES[kind]] += 1

    def _check_links(self) -> None:
        """Rebuild PUSH sockets that were disconnected and are not being re-dialled."""
        now_s = time.monotonic()
        for peer, monitor in self._push_monitors.items():
            while True:
                try:
                    event = parse_monitor_message(monitor.recv_multipart(flags=zmq.NOBLOCK))
                except zmq.Again:
                    break
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    self._lost_since.setdefault(peer, now_s)
                else:  # CONNECT_RETRIED or CONNECTED: libzmq is on it
                    self._lost_since.pop(peer, None)
        for peer in [p for p, since_s in self._lost_since.items() if now_s - since_s > _RELINK_GRACE_S]:
            self._rebuild_outbound(peer)

    def close(self) -> None:
        """Flush for up to ``linger_ms`` and release every socket. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._inbound.disable_monitor()
        self._monitor.close(linger=0)
        for peer, monitor in self._push_monitors.items():
            self._outbound[peer].disable_monitor()
            monitor.close(linger=0)
        self._inbound.close(linger=0)
        if self._control_in is not None:
            self._control_in.close(linger=0)
        if self._hello is not None:
            self._hello.close()
        self._control_out.close()
        for sock in self._outbound.values():
            sock.close()
        if self._auth is not None:
            self._auth.stop()
        self._context.term()

    def __enter__(self) -> ZmqTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["DROP_FAULT", "DROP_QUEUE_FULL", "Received", "TransportSettings", "TransportStats", "ZmqTransport"]
