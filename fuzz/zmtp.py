"""Raw-socket ZMTP 3.0 primitives for attacking a ZeroMQ endpoint without any key.

Nothing here speaks CurveZMQ: an outsider has no roster key, so everything it
can send is the greeting, frame headers and handshake commands that libzmq
parses *before* authentication. Each attack is bounded in connections, bytes
and seconds, and returns an :class:`AttackResult` saying what was sent and
whether the endpoint closed the connection first.

Wire format (https://rfc.zeromq.org/spec/23/):

- greeting, 64 bytes: signature ``ff 00*8 7f``, version ``3 0``, mechanism
  name padded with NULs to 20 bytes, as-server (1 byte), 31 bytes of filler;
- frame: flags byte (``0x01`` more, ``0x02`` long size, ``0x04`` command), size
  (1 byte, or 8 bytes big-endian with ``0x02``), body; a command body is a
  name length byte, the name, then its data.

Usage (from fuzz/fuzz_transport.py or a test)::

    result = partial_frame(("127.0.0.1", 5550), announce=300 * 2**20, stream=300 * 2**20)
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Address = tuple[str, int]

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING_BYTES = 64
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04
HELLO_BODY_BYTES = 200  # CurveZMQ HELLO: name, version, padding, C', nonce, signature box
MiB = 2**20
_CHUNK = MiB
_ZEROS = bytes(_CHUNK)
_CLOSED_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ENOTCONN, errno.ESHUTDOWN}


def greeting(
    mechanism: bytes = b"CURVE", *, major: int = 3, minor: int = 0, as_server: bool = False
) -> bytes:
    """The 64-byte ZMTP 3.x greeting."""
    if len(mechanism) > 20:
        raise ValueError("a mechanism name is at most 20 bytes")
    return (
        SIGNATURE + bytes([major, minor]) + mechanism.ljust(20, b"\x00") + bytes([int(as_server)]) + bytes(31)
    )


def frame_header(size: int, *, more: bool = False, command: bool = False, long: bool | None = None) -> bytes:
    """Flags byte and size field of a frame of ``size`` body bytes (long form above 255 or if asked)."""
    if size < 0 or size >= 2**64:
        raise ValueError("a frame size is 0..2**64-1")
    wide = size > 255 if long is None else long
    flags = (FLAG_MORE if more else 0) | (FLAG_LONG if wide else 0) | (FLAG_COMMAND if command else 0)
    if wide:
        return bytes([flags]) + struct.pack(">Q", size)
    if size > 255:
        raise ValueError("a short frame holds at most 255 bytes")
    return bytes([flags, size])


def frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    return frame_header(len(body), more=more, command=command) + body


def command(name: bytes, data: bytes = b"") -> bytes:
    """A command frame: name length, name, data."""
    return frame(bytes([len(name)]) + name + data, command=True)


@dataclass
class AttackResult:
    attack: str
    connections: int = 0  # TCP connections made (or accepted, for the fake server)
    bytes_sent: int = 0
    closed_by_peer: int = 0  # connections the endpoint closed (EOF/RST) before we were done
    max_bytes_before_close: int = 0  # most bytes one connection got out before the endpoint closed it
    connect_failures: int = 0
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attack": self.attack,
            "connections": self.connections,
            "bytes_sent": self.bytes_sent,
            "closed_by_peer": self.closed_by_peer,
            "max_bytes_before_close": self.max_bytes_before_close,
            "connect_failures": self.connect_failures,
            "seconds": round(self.seconds, 3),
            **self.notes,
        }


def _connect(address: Address, timeout_s: float = 3.0) -> socket.socket:
    sock = socket.create_connection(address, timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _connect_counted(address: Address, result: AttackResult) -> socket.socket | None:
    """A connection for an attack, counted in ``result`` (None: it was refused, also counted)."""
    try:
        sock = _connect(address)
    except OSError:
        result.connect_failures += 1
        return None
    result.connections += 1
    return sock


def _is_closed(sock: socket.socket) -> bool:
    """Drain what the endpoint sent (its greeting) without blocking; True on EOF or reset."""
    sock.setblocking(False)
    try:
        for _ in range(64):  # bounded: at most 256 KiB drained per call
            data = sock.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno in _CLOSED_ERRNOS or isinstance(exc, ConnectionError)
    finally:
        with contextlib.suppress(OSError):
            sock.setblocking(True)
    return False


def _wait_closed(sock: socket.socket, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the endpoint to close; True if it did."""
    deadline = time.monotonic() + timeout_s
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            return True
        if not data:
            return True
    return False


def _abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): no TIME_WAIT pile-up on our side."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _stream(sock: socket.socket, total: int, deadline: float) -> tuple[int, bool]:
    """Send up to ``total`` zero bytes before ``deadline``; (bytes sent, closed by the peer)."""
    sent = 0
    sock.settimeout(0.5)
    while sent < total and time.monotonic() < deadline:
        chunk = _ZEROS[: min(_CHUNK, total - sent)]
        try:
            sent += sock.send(chunk)
        except TimeoutError:
            if _is_closed(sock):
                return sent, True
            sock.settimeout(0.5)
            continue
        except OSError:
            return sent, True
    return sent, False


# ----------------------------------------------------------------- attacks


class _Held:
    """The sockets of :func:`bare_connects`, watched with epoll (select() stops at descriptor 1023).

    A connection counts as *held* once the endpoint sent its greeting: libzmq
    sends its signature as soon as it accepts. Before that it may only be in
    the kernel's queues, or nowhere at all: when the listen backlog overflows,
    a SYN-cookie handshake completes on our side only, and such a "connection"
    costs the endpoint nothing. Those are given up after ``accept_timeout_s``.
    """

    def __init__(self, address: Address, result: AttackResult, accept_timeout_s: float = 1.5) -> None:
        self.address, self.result = address, result
        self.accept_timeout_s = accept_timeout_s
        self.selector = selectors.DefaultSelector()
        self.pending: dict[socket.socket, float] = {}  # connected, not yet greeted -> since
        self.held: set[socket.socket] = set()

    def dial(self, want: int) -> None:
        """Start ``want`` non-blocking connects; they complete (or not) in :meth:`reap`."""
        for _ in range(want):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if sock.connect_ex(self.address) not in (0, errno.EINPROGRESS):
                sock.close()
                self.result.connect_failures += 1
                continue
            self.selector.register(sock, selectors.EVENT_READ)
            self.pending[sock] = time.monotonic()
            self.result.connections += 1

    def _drop(self, sock: socket.socket, *, by_peer: bool) -> None:
        self.selector.unregister(sock)
        if sock in self.held:
            self.held.discard(sock)
            self.result.closed_by_peer += int(by_peer)
        else:
            self.pending.pop(sock, None)
            self.result.connect_failures += 1
        _abort(sock)

    def reap(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s``: greeted connections become held; closed or stale ones are dropped."""
        for key, _ in self.selector.select(timeout=timeout_s):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)  # the endpoint's greeting, or EOF
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._drop(sock, by_peer=True)
            elif sock in self.pending:
                del self.pending[sock]
                self.held.add(sock)
        stale = time.monotonic() - self.accept_timeout_s
        for sock in [s for s, since in self.pending.items() if since < stale]:
            self._drop(sock, by_peer=False)

    def close(self) -> None:
        for sock in [*self.held, *self.pending]:
            self.selector.unregister(sock)
            _abort(sock)
        self.held.clear()
        self.pending.clear()
        self.selector.close()


def bare_connects(
    address: Address,
    count: int,
    *,
    hold_s: float,
    redial: bool = True,
    until: Callable[[], bool] | None = None,
    max_connections: int | None = None,
    on_tick: Callable[[int], None] | None = None,
    in_flight: int = 64,
) -> AttackResult:
    """Open ``count`` TCP connections that send nothing and hold them for up to ``hold_s``.

    Connects are paced (at most ``in_flight`` not yet accepted, below libzmq's
    default backlog of 100), and a connection counts once the endpoint greeted
    it (see :class:`_Held`). With ``redial``, a connection the endpoint closes
    (its handshake timeout) is opened again, so that about ``count`` stay
    held; at most ``max_connections`` (default ``10 * count``) are made in all.
    ``until`` ends the hold early once it returns True; ``on_tick(held)`` is
    called about every 0.05 s. The caller's soft RLIMIT_NOFILE must allow
    ``count + in_flight`` sockets.
    """
    result = AttackResult("bare_connects")
    budget = max_connections if max_connections is not None else 10 * count
    started = time.monotonic()
    deadline = started + hold_s
    held = _Held(address, result)
    peak = 0
    try:
        while time.monotonic() < deadline and not (until is not None and until()):
            room = count - len(held.held) - len(held.pending)
            if (redial or result.connections < count) and room > 0:
                held.dial(min(room, in_flight - len(held.pending), budget - result.connections))
            held.reap(0.05)
            if len(held.held) > peak:
                peak = len(held.held)
                if peak == count:
                    result.notes["seconds_to_hold_all"] = round(time.monotonic() - started, 3)
            if on_tick is not None:
                on_tick(len(held.held))
            if result.connections >= budget and not held.held and not held.pending:
                break
    finally:
        result.notes["held_at_end"] = len(held.held)
        result.notes["peak_held"] = peak
        held.close()
        result.seconds = time.monotonic() - started
    return result


def _send_variants(
    result: AttackResult,
    address: Address,
    variants: list[tuple[str, Callable[[], bytes]]],
    *,
    count: int,
    wait_s: float,
    started: float,
    prefix: bytes = b"",
) -> AttackResult:
    """One connection per payload (cycling through ``variants``): send ``prefix + payload``,
    wait up to ``wait_s`` for the node to close it, count which kinds it closed."""
    kinds: dict[str, int] = {}
    for i in range(count):
        name, make = variants[i % len(variants)]
        sock = _connect_counted(address, result)
        if sock is None:
            continue
        try:
            payload = prefix + make()
            sock.sendall(payload)
            result.bytes_sent += len(payload)
            if _wait_closed(sock, wait_s):
                result.closed_by_peer += 1
                kinds[name] = kinds.get(name, 0) + 1
        except OSError:
            result.closed_by_peer += 1
        finally:
            _abort(sock)
    result.notes["closed_by_kind"] = kinds
    result.seconds = time.monotonic() - started
    return result


def bad_greetings(
    address: Address, rng: random.Random, *, count: int = 24, wait_s: float = 1.0
) -> AttackResult:
    """Greetings libzmq must refuse: garbage, truncated, wrong version, wrong mechanism, bad signature."""
    result = AttackResult("bad_greetings")
    started = time.monotonic()
    good = greeting()
    variants: list[tuple[str, Callable[[], bytes]]] = [
        ("garbage", lambda: rng.randbytes(GREETING_BYTES)),
        ("garbage_long", lambda: rng.randbytes(rng.randrange(65, 4096))),
        ("truncated", lambda: good[: rng.randrange(1, GREETING_BYTES)]),
        ("version_1", lambda: greeting(major=1)),
        ("version_2", lambda: greeting(major=2)),
        ("version_255", lambda: greeting(major=255, minor=255)),
        ("mech_null", lambda: greeting(b"NULL")),
        ("mech_plain", lambda: greeting(b"PLAIN")),
        ("mech_random", lambda: greeting(rng.randbytes(20))),
        ("mech_empty", lambda: greeting(b"")),
        ("as_server", lambda: greeting(as_server=True)),
        ("bad_signature", lambda: bytes([0xFE]) + good[1:]),
        ("zmtp1_huge_identity", lambda: b"\xff" + struct.pack(">Q", 2**40) + b"\x7f" + bytes(54)),
    ]
    return _send_variants(result, address, variants, count=count, wait_s=wait_s, started=started)


def partial_frame(
    address: Address,
    *,
    announce: int,
    stream: int,
    mechanism: bytes = b"CURVE",
    seconds: float = 20.0,
    command_frame: bool = False,
) -> AttackResult:
    """A valid greeting, a frame header announcing ``announce`` bytes, then up to ``stream`` of them.

    An endpoint that bounds frames by MAXMSGSIZE closes the connection at the
    header; one that does not buffers everything we stream.
    """
    result = AttackResult("partial_frame", notes={"announced": announce})
    started = time.monotonic()
    sock = _connect_counted(address, result)
    if sock is None:
        result.seconds = time.monotonic() - started
        return result
    try:
        head = greeting(mechanism) + frame_header(announce, command=command_frame, long=True)
        sock.sendall(head)
        result.bytes_sent = len(head)
        sent, closed = _stream(sock, stream, started + seconds)
        result.bytes_sent += sent
        if not closed:
            closed = _wait_closed(sock, 0.5)
        if closed:
            result.closed_by_peer = 1
            result.max_bytes_before_close = result.bytes_sent
    except OSError:
        result.closed_by_peer = 1
        result.max_bytes_before_close = result.bytes_sent
    finally:
        _abort(sock)
    result.seconds = time.monotonic() - started
    return result


def parallel(attacks: list[Callable[[], AttackResult]], name: str) -> AttackResult:
    """Run attacks in threads at once; sums their results (max for max_bytes_before_close)."""
    results: list[AttackResult] = []
    lock = threading.Lock()

    def run(attack: Callable[[], AttackResult]) -> None:
        out = attack()
        with lock:
            results.append(out)

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(a,), daemon=True) for a in attacks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    total = AttackResult(name)
    for out in results:
        total.connections += out.connections
        total.bytes_sent += out.bytes_sent
        total.closed_by_peer += out.closed_by_peer
        total.connect_failures += out.connect_failures
        total.max_bytes_before_close = max(total.max_bytes_before_close, out.max_bytes_before_close)
    total.notes["per_connection_bytes"] = sorted(out.bytes_sent for out in results)
    total.seconds = time.monotonic() - started
    return total


def _long_hello(data: bytes) -> bytes:
    """A HELLO command in a long-size frame (legal framing, still garbage inside)."""
    body = b"\x05HELLO" + data
    return frame_header(len(body), command=True, long=True) + body


def handshake_garbage(
    address: Address, rng: random.Random, *, count: int = 24, wait_s: float = 1.0
) -> AttackResult:
    """After a valid CURVE greeting: commands a CurveZMQ server must refuse.

    A HELLO of the right size with random keys, nonce and box; commands with
    wrong names (READY, WELCOME, INITIATE, ERROR, random); a name longer than
    its body; a message frame before the handshake; a HELLO in a long frame.
    """
    result = AttackResult("handshake_garbage")
    started = time.monotonic()
    hello_data = HELLO_BODY_BYTES - 6  # after the name length byte and b"HELLO"
    variants: list[tuple[str, Callable[[], bytes]]] = [
        ("hello_random", lambda: command(b"HELLO", b"\x01\x00" + rng.randbytes(hello_data - 2))),
        ("hello_short", lambda: command(b"HELLO", rng.randbytes(rng.randrange(0, hello_data)))),
        ("hello_long_frame", lambda: _long_hello(rng.randbytes(hello_data))),
        ("ready", lambda: command(b"READY", rng.randbytes(64))),
        ("welcome", lambda: command(b"WELCOME", rng.randbytes(160))),
        ("initiate", lambda: command(b"INITIATE", rng.randbytes(rng.randrange(100, 250)))),
        ("error", lambda: command(b"ERROR", b"\x05oops!")),
        ("random_name", lambda: command(rng.randbytes(rng.randrange(1, 20)), rng.randbytes(100))),
        ("name_overflows", lambda: frame(b"\xff" + b"HELLO", command=True)),
        ("message_first", lambda: frame(rng.randbytes(100))),
        ("empty_command", lambda: frame(b"", command=True)),
    ]
    return _send_variants(
        result, address, variants, count=count, wait_s=wait_s, started=started, prefix=greeting()
    )


def multipart_bomb(
    address: Address,
    *,
    frames: int = 64,
    frame_bytes: int = 4 * MiB,
    max_bytes: int = 512 * MiB,
    seconds: float = 15.0,
) -> AttackResult:
    """After a valid CURVE greeting: many long frames with the more flag, streamed whole."""
    result = AttackResult("multipart_bomb", notes={"frames": frames, "frame_bytes": frame_bytes})
    started = time.monotonic()
    deadline = started + seconds
    sock = _connect_counted(address, result)
    if sock is None:
        result.seconds = time.monotonic() - started
        return result
    closed = False
    try:
        sock.sendall(greeting())
        result.bytes_sent = GREETING_BYTES
        for i in range(frames):
            if result.bytes_sent + frame_bytes > max_bytes or time.monotonic() >= deadline:
                break
            head = frame_header(frame_bytes, more=i < frames - 1, long=True)
            sock.settimeout(2.0)
            sock.sendall(head)
            result.bytes_sent += len(head)
            sent, closed = _stream(sock, frame_bytes, deadline)
            result.bytes_sent += sent
            if closed:
                break
        if not closed:
            closed = _wait_closed(sock, 0.5)
    except OSError:
        closed = True
    finally:
        _abort(sock)
    if closed:
        result.closed_by_peer = 1
        result.max_bytes_before_close = result.bytes_sent
    result.seconds = time.monotonic() - started
    return result


def connection_flood(
    address: Address,
    *,
    count: int = 2000,
    seconds: float = 5.0,
    rst: bool = True,
    send_greeting: bool = False,
) -> AttackResult:
    """Connect and close as fast as possible (RST close by default), at most ``count`` times."""
    result = AttackResult("connection_flood", notes={"rst": rst, "greeting": send_greeting})
    started = time.monotonic()
    payload = greeting()
    while result.connections + result.connect_failures < count and time.monotonic() - started < seconds:
        try:
            sock = _connect(address, timeout_s=1.0)
        except OSError:
            result.connect_failures += 1
            continue
        result.connections += 1
        try:
            if send_greeting:
                sock.sendall(payload)
                result.bytes_sent += len(payload)
        except OSError:
            result.closed_by_peer += 1
        finally:
            if rst:
                _abort(sock)
            else:
                sock.close()
    result.seconds = time.monotonic() - started
    return result


# ------------------------------------------------- a hostile "neighbour"


class OversizedFrameServer:
    """A raw TCP listener that answers every connection with a greeting and a huge frame.

    Run it at the address of a neighbour that is down: the victim's PUSH
    socket dials it, and gets a ZMTP greeting (``mechanism``, as-server) and a
    frame header announcing ``announce`` bytes, followed by up to ``stream``
    bytes of it. Bounded: ``max_connections`` served, ``max_bytes`` in all,
    ``seconds`` of serving after :meth:`serve` is called.
    """

    def __init__(
        self,
        listener: socket.socket,
        *,
        announce: int,
        stream: int,
        max_connections: int = 64,
        max_bytes: int = 4 * 2**30,
        mechanism: bytes = b"CURVE",
        watch_pid: int | None = None,
    ) -> None:
        self.listener = listener
        self.watch_pid = watch_pid  # count the connections that come from this process
        self.announce, self.stream = announce, stream
        self.max_connections, self.max_bytes = max_connections, max_bytes
        self.mechanism = mechanism
        self.result = AttackResult("oversized_frame_server", notes={"announced": announce})
        self.peers: list[tuple[str, int]] = []  # (host, port) of each connection served
        self.per_connection: list[int] = []  # bytes sent on each, in order
        self.from_watched: list[int] = []  # bytes sent on each connection from ``watch_pid``
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def serve(self, seconds: float) -> None:
        """Start serving in a thread for at most ``seconds``."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(seconds,), daemon=True)
        self._thread.start()

    def stop(self) -> AttackResult:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        return self.result

    def _run(self, seconds: float) -> None:
        started = time.monotonic()
        deadline = started + seconds
        self.listener.settimeout(0.1)
        head = greeting(self.mechanism, as_server=True) + frame_header(self.announce, long=True)
        while not self._stop.is_set() and time.monotonic() < deadline:
            if self.result.connections >= self.max_connections or self.result.bytes_sent >= self.max_bytes:
                break
            try:
                sock, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            self.result.connections += 1
            self.peers.append(peer)
            watched = self.watch_pid is not None and peer[1] in local_ports_of(self.watch_pid)
            sent = 0
            closed = False
            try:
                sock.settimeout(2.0)
                sock.sendall(head)
                sent = len(head)
                budget = min(self.stream, self.max_bytes - self.result.bytes_sent)
                streamed, closed = _stream(sock, budget, deadline)
                sent += streamed
                if not closed:
                    closed = _wait_closed(sock, 0.2)
            except OSError:
                closed = True
            finally:
                _abort(sock)
            self.result.bytes_sent += sent
            self.per_connection.append(sent)
            if watched:
                self.from_watched.append(sent)
            if closed:
                self.result.closed_by_peer += 1
                self.result.max_bytes_before_close = max(self.result.max_bytes_before_close, sent)
        self.result.seconds = time.monotonic() - started
        self.result.notes["per_connection_bytes"] = list(self.per_connection)
        self.result.notes["from_watched_bytes"] = list(self.from_watched)


# ---------------------------------------------------- process probes


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (VmRSS)."""
    return _status_kib(pid, "VmRSS") / 1024


def _status_kib(pid: int, field_name: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise LookupError(f"{field_name} not in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Sampler:
    """Samples a process's RSS (MiB) and descriptors every ``interval_s`` in a thread; keeps the peaks."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_rss_mib = 0.0
        self.peak_fds = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def _sample(self) -> None:
        try:
            self.peak_rss_mib = max(self.peak_rss_mib, rss_mib(self.pid))
            self.peak_fds = max(self.peak_fds, fd_count(self.pid))
            self.samples += 1
        except (OSError, LookupError):
            pass  # the process is gone: the caller checks that separately

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()


def local_ports_of(pid: int) -> set[int]:
    """Local TCP ports of the sockets ``pid`` holds (IPv4 and IPv6)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{name}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{table}", encoding="ascii") as handle:
            next(handle, None)
            for line in handle:
                cols = line.split()
                if len(cols) > 9 and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports
