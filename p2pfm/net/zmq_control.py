"""ZeroMQ pieces of the membership control channel (used by ``ZmqTransport``).

- :class:`ControlLinks`: outbound control messages. One CurveZMQ PUSH socket
  per recently addressed peer (a join reaches a member that is nobody's
  neighbour yet), at most ``max_links`` of them, least recently used closed
  first; each queues at most ``queue_messages`` and never blocks.
- :class:`HelloServer` / :func:`fetch_record`: how a node that knows only a
  member's address learns its peer id. CurveZMQ needs the server's key before
  the first byte, so a plaintext ROUTER answers any request with the node's
  own **signed** peer record: the asker checks the signature and that the
  roster admits the key, then talks CurveZMQ to it. The answer is a public
  document; nothing else is served, requests are bounded to 64 bytes, and a
  wrong answer (someone else's record, or garbage) costs the asker only a
  failed bootstrap attempt, never a wrong belief.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from p2pfm.core.control import encode_control
from p2pfm.core.errors import RemoteProtocolError
from p2pfm.core.identity import Identity, PeerId, curve_public_key
from p2pfm.core.records import PeerRecord, open_peer_record
from p2pfm.core.wire import Buffer
from p2pfm.net.link import DROP_QUEUE_FULL, TransportStats

HELLO_REQUEST = b"p2pfm-hello"
_MAX_HELLO_REQUEST_BYTES = 64
_MAX_HELLO_ANSWER_BYTES = 4096
_HELLOS_PER_CALL = 64  # answers per wake-up: a flood costs bounded work
_HELLO_POLL_MS = 100  # how often the hello thread looks at its stop flag
# libzmq gives up on a connection whose handshake failed (the peer did not admit us yet, say): such a
# socket is rebuilt before the next message to that peer, so a newly admitted key gets through.
_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class ControlLinks:
    """Control PUSH sockets by (peer, address), LRU-bounded."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        own_keys: tuple[bytes, bytes] | None,
        stats: TransportStats,
        *,
        max_links: int = 64,
        queue_messages: int = 16,
        handshake_timeout_ms: int = 5000,
        linger_ms: int = 1000,
    ) -> None:
        self._context, self._own_keys, self.stats = context, own_keys, stats
        self.max_links, self.queue_messages = max_links, queue_messages
        self.handshake_timeout_ms, self.linger_ms = handshake_timeout_ms, linger_ms
        # (peer, address) -> (PUSH socket, its monitor)
        self._links: OrderedDict[tuple[PeerId, str], tuple[zmq.Socket[bytes], zmq.Socket[bytes]]] = (
            OrderedDict()
        )
        self.rebuilt = 0

    def send(self, peer: PeerId, address: str, message: Buffer) -> bool:
        key = (peer, address)
        link = self._links.get(key)
        if link is not None and _handshake_failed(link[1]):
            self._close(self._links.pop(key))
            self.rebuilt += 1
            link = None
        if link is None:
            link = self._open(peer, address)
            self._links[key] = link
            while len(self._links) > self.max_links:
                self._close(self._links.popitem(last=False)[1])
        self._links.move_to_end(key)
        sock = link[0]
        try:
            sock.send(message, flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.stats.dropped[DROP_QUEUE_FULL] += 1
            return False
        self.stats.messages_sent += 1
        self.stats.bytes_sent += memoryview(message).nbytes
        return True

    def _open(self, peer: PeerId, address: str) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
        sock = self._context.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self.queue_messages)
        sock.setsockopt(zmq.LINGER, self.linger_ms)
        sock.setsockopt(zmq.MAXMSGSIZE, 64 * 2**10)  # a PUSH socket only ever receives handshake commands
        sock.setsockopt(zmq.HANDSHAKE_IVL, self.handshake_timeout_ms)
        if self._own_keys is not None:
            sock.curve_serverkey = z85.encode(curve_public_key(peer))
            sock.curve_publickey, sock.curve_secretkey = self._own_keys
        monitor = sock.get_monitor_socket(_FAILED)
        sock.connect(address)
        return sock, monitor

    @staticmethod
    def _close(link: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
        sock, monitor = link
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)

    def close(self) -> None:
        for sock, monitor in self._links.values():
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close()
        self._links.clear()


def _handshake_failed(monitor: zmq.Socket[bytes]) -> bool:
    failed = False
    while True:
        try:
            event = parse_monitor_message(monitor.recv_multipart(flags=zmq.NOBLOCK))
        except zmq.Again:
            return failed
        failed = failed or bool(event["event"] & _FAILED)


class HelloServer:
    """A plaintext ROUTER that answers every well-formed request with the node's signed record.

    It runs on a thread of its own, so a node answers even while it trains
    (a joiner must not wait for the member's next pause); the thread owns the
    socket from its start until ``close``.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], address: str, record: bytes) -> None:
        self.record = record
        self.answered = 0
        self.refused = 0
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.MAXMSGSIZE, _MAX_HELLO_REQUEST_BYTES)
        self.socket.setsockopt(zmq.RCVHWM, 16)
        self.socket.setsockopt(zmq.SNDHWM, 16)
        self.socket.setsockopt(zmq.LINGER, 0)
        try:
            self.socket.bind(address)
        except zmq.ZMQError:
            self.socket.close(linger=0)
            raise
        endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        self.address = endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2pfm-hello", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.socket.poll(_HELLO_POLL_MS):
                    self.serve()
        finally:
            self.socket.close(linger=0)

    def serve(self) -> None:
        for _ in range(_HELLOS_PER_CALL):
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2 or frames[1] != HELLO_REQUEST:
                self.refused += 1
                continue
            try:
                self.socket.send_multipart([frames[0], self.record], flags=zmq.NOBLOCK)
                self.answered += 1
            except zmq.Again:
                self.refused += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)


def fetch_record(address: str, network: str, *, timeout_s: float = 5.0) -> PeerRecord:
    """Ask the hello endpoint at ``address`` for its node's signed record and check it.

    Raises RemoteProtocolError (a bad answer) or TimeoutError (no answer).
    """
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_HELLO_ANSWER_BYTES)
        sock.connect(address)
        sock.send(HELLO_REQUEST)
        if not sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer from {address} within {timeout_s:g} s")
        answer = sock.recv()
    finally:
        sock.close(linger=0)
    try:
        return open_peer_record(answer, network)
    except RemoteProtocolError as exc:
        raise type(exc)(f"{address} answered with no valid peer record: {exc}", exc.reason) from None


def publish_roster(
    document: bytes,
    address: str,
    admin: Identity,
    network: str,
    *,
    roster_version: int,
    timeout_s: float = 5.0,
) -> PeerRecord:
    """Hand a signed roster document to the member whose hello is at ``address``; return its record.

    Signed by ``admin`` (an admin of the roster the member holds, so that the
    member's CurveZMQ admission lets it in); the member passes the document on
    to everyone else by itself.
    """
    record = fetch_record(address, network, timeout_s=timeout_s)
    public, secret = admin.curve_keypair()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    links = ControlLinks(
        context, (z85.encode(public), z85.encode(secret)), TransportStats(), linger_ms=int(timeout_s * 1000)
    )
    try:
        seq = time.time_ns() // 1000  # microseconds: above anything an earlier publish used
        message = encode_control(
            admin,
            kind="roster",
            network=network,
            to=record.peer,
            seq=seq,
            rv=roster_version,
            document=document,
        )
        if not links.send(record.peer, record.address, message):
            raise TimeoutError(f"the control link to {record.address} would not take the message")
    finally:
        links.close()  # lingers up to timeout_s to deliver
        context.term()
    return record
