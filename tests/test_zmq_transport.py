"""ZmqTransport on loopback: real ZeroMQ sockets, bounded waits."""

from __future__ import annotations

import json
import platform
import resource
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from p2pfm.config.schema import check_address
from p2pfm.core import wire
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import Identity
from p2pfm.net.zmq_transport import (
    DROP_FAULT,
    DROP_QUEUE_FULL,
    TransportSettings,
    ZmqTransport,
    raise_open_files_limit,
)
from p2pfm.node.faults import LossyTransport

A, B = Identity(b"\1" * 32), Identity(b"\2" * 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _frames(value: float, size: int = 1000, signer: Identity = A) -> bytes:
    body = wire.encode_update(
        network="n", round=1, seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=1,
        tensors={"x": np.full(size, value, dtype=np.float32)},
    )  # fmt: skip
    return wire.sign(body, signer)


def _receiver(address: str, **kw: object) -> ZmqTransport:
    """B listening, admitting A."""
    return ZmqTransport(address, {}, identity=B, allowed=[A.peer_id], **kw)  # type: ignore[arg-type]


def _sender(to: str, **kw: object) -> ZmqTransport:
    """A with B as its one neighbour."""
    return ZmqTransport(f"tcp://127.0.0.1:{_free_port()}", {B.peer_id: to}, identity=A, **kw)  # type: ignore[arg-type]


def _receive_one(transport: ZmqTransport, timeout_s: float = 5.0) -> memoryview:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = transport.receive(0.1, max_messages=1)
        if got:
            return got[0].message
    raise AssertionError("no message within the timeout")


def test_round_trip_zero_copy_and_counted() -> None:
    port = _free_port()
    with (
        _receiver(f"tcp://127.0.0.1:{port}") as receiver,
        _sender(f"tcp://127.0.0.1:{port}") as sender,
    ):
        frames = _frames(3.0)
        assert sender.send(frames) == 1
        views = _receive_one(receiver)
        update = wire.open_update(views, wire.WireLimits())
        assert float(update.tensors["x"][0]) == 3.0
        size = wire.message_bytes(frames)
        assert sender.stats.bytes_sent == size == receiver.stats.bytes_received
        assert receiver.stats.messages_received == 1


def test_dead_neighbour_never_blocks_and_drops_are_counted() -> None:
    dead = f"tcp://127.0.0.1:{_free_port()}"  # nobody listens here
    settings = TransportSettings(send_queue_messages=2)
    with _sender(dead, settings=settings) as sender:
        start = time.monotonic()
        taken = [sender.send(_frames(float(i))) for i in range(20)]
        assert time.monotonic() - start < 1.0
        assert sum(taken) <= 3  # the bounded queue (plus at most one in flight)
        assert sender.stats.dropped[DROP_QUEUE_FULL] == 20 - sum(taken)


def test_queued_messages_arrive_when_the_neighbour_comes_up_and_after_restart() -> None:
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    with _sender(address) as sender:
        sender.send(_frames(1.0))  # neighbour not up yet: queued
        first = _receiver(address)
        views = _receive_one(first)
        assert float(wire.open_update(views, wire.WireLimits()).tensors["x"][0]) == 1.0
        first.close()  # neighbour dies ...
        time.sleep(0.2)
        second = _receiver(address)  # ... and restarts on the same address
        try:
            deadline = time.monotonic() + 10.0
            value = None
            while value != 2.0 and time.monotonic() < deadline:
                sender.send(_frames(2.0))
                got = second.receive(0.2)
                for item in got:
                    value = float(wire.open_update(item.message, wire.WireLimits()).tensors["x"][0])
            assert value == 2.0
        finally:
            second.close()


def test_fault_injected_link_loss() -> None:
    """The scenario `drop` fault wraps the real transport (p2pfm.node.faults.LossyTransport)."""
    port = _free_port()
    with (
        _receiver(f"tcp://127.0.0.1:{port}") as receiver,
        _sender(f"tcp://127.0.0.1:{port}", settings=TransportSettings(send_queue_messages=1000)) as inner,
    ):
        sender = LossyTransport(inner, [B.peer_id], {B.peer_id: 0.5}, seed=1)
        for i in range(200):
            sender.send(_frames(float(i)))
        dropped = sender.stats.dropped[DROP_FAULT]
        assert 60 < dropped < 140
        assert sender.stats.messages_sent == 200 - dropped
        _receive_one(receiver)  # the rest of the link works


def test_inbound_keeps_only_the_newest_message_per_link_and_names_the_link() -> None:
    """The PULL socket conflates: a burst (or a multipart bomb) costs one message per link."""
    port = _free_port()
    c = Identity(b"\3" * 32)
    with (
        ZmqTransport(
            f"tcp://127.0.0.1:{port}", {}, identity=B, allowed=[A.peer_id, c.peer_id], max_message_bytes=2**20
        ) as receiver,
        _sender(f"tcp://127.0.0.1:{port}", settings=TransportSettings(send_queue_messages=100)) as sender_a,
        ZmqTransport(
            f"tcp://127.0.0.1:{_free_port()}", {B.peer_id: f"tcp://127.0.0.1:{port}"}, identity=c
        ) as sender_c,
    ):
        deadline = time.monotonic() + 5.0
        while receiver.stats.handshakes_completed < 1 and time.monotonic() < deadline:
            receiver.receive(0.05)
        for i in range(50):
            sender_a.send(_frames(float(i)))
        sender_c.send(_frames(100.0, signer=c))
        time.sleep(0.5)
        got = []
        deadline = time.monotonic() + 5.0
        while len(got) < 2 and time.monotonic() < deadline:
            got += receiver.receive(0.1)
        time.sleep(0.2)
        got += receiver.receive(0.1)
        by_link = {item.link: wire.open_update(item.message, wire.WireLimits()) for item in got}
        assert set(by_link) == {A.peer_id, c.peer_id}
        assert float(by_link[A.peer_id].tensors["x"][0]) == 49.0  # the newest of the burst
        assert by_link[c.peer_id].sender == c.peer_id
        assert len(got) <= 3  # not 51


def test_message_above_the_bound_never_arrives() -> None:
    port = _free_port()
    small = 2000 * 4 + 4096
    with (
        ZmqTransport(
            f"tcp://127.0.0.1:{port}", {}, identity=B, allowed=[A.peer_id], max_message_bytes=small
        ) as receiver,
        _sender(f"tcp://127.0.0.1:{port}") as sender,
    ):
        sender.send(_frames(1.0, size=4000))  # 16 KB > bound: the connection is dropped
        assert receiver.receive(1.0) == []
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # libzmq reconnects; a message within the bound gets through
            sender.send(_frames(2.0, size=2000))
            got = receiver.receive(0.2)
            if got:
                assert float(wire.open_update(got[0].message, wire.WireLimits()).tensors["x"][0]) == 2.0
                break
        else:
            raise AssertionError("a message within the bound never arrived")


def test_open_files_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        raised, hard_after = raise_open_files_limit()
        assert hard_after == hard
        assert raised == hard or hard == resource.RLIM_INFINITY
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_raw_tcp_garbage_changes_nothing() -> None:
    port = _free_port()
    with (
        _receiver(f"tcp://127.0.0.1:{port}") as receiver,
        _sender(f"tcp://127.0.0.1:{port}") as sender,
    ):
        for payload in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 40):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                raw.sendall(payload)
        assert receiver.receive(0.3) == []  # nothing decodable reached the node
        sender.send(_frames(7.0))
        views = _receive_one(receiver)
        assert float(wire.open_update(views, wire.WireLimits()).tensors["x"][0]) == 7.0


def test_bind_conflict_and_bad_addresses_are_config_errors() -> None:
    port = _free_port()
    with _receiver(f"tcp://127.0.0.1:{port}"), pytest.raises(ConfigError, match=r"node\.listen"):
        _receiver(f"tcp://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match=r"transport\.insecure"):
        ZmqTransport(f"tcp://127.0.0.1:{_free_port()}", {})
    for bad in ("127.0.0.1:5000", "tcp://:5000", "tcp://host:port", "tcp://h:70000"):
        with pytest.raises(ConfigError):
            check_address("node.listen", bad)
    assert check_address("x", "tcp://10.0.0.2:5550") == "tcp://10.0.0.2:5550"


def test_unknown_curve_key_gets_no_connection() -> None:
    port = _free_port()
    mallory = Identity(b"\x66" * 32)
    with (
        _receiver(f"tcp://127.0.0.1:{port}") as receiver,
        ZmqTransport(
            f"tcp://127.0.0.1:{_free_port()}", {B.peer_id: f"tcp://127.0.0.1:{port}"}, identity=mallory
        ) as outsider,
    ):
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and receiver.stats.refused_connections == 0:
            outsider.send(_frames(6.0))
            assert receiver.receive(0.1) == []
        assert receiver.stats.refused_connections >= 1
        assert receiver.stats.messages_received == 0


def test_plaintext_client_gets_no_connection_and_insecure_mode_works() -> None:
    port = _free_port()
    with (
        _receiver(f"tcp://127.0.0.1:{port}") as receiver,
        ZmqTransport(
            f"tcp://127.0.0.1:{_free_port()}",
            {B.peer_id: f"tcp://127.0.0.1:{port}"},
            TransportSettings(insecure=True),
        ) as plaintext,
    ):
        for _ in range(5):
            plaintext.send(_frames(5.0))
        assert receiver.receive(1.0) == []  # a NULL-mechanism peer cannot talk to a CURVE server
    port = _free_port()
    insecure = TransportSettings(insecure=True)
    with (
        ZmqTransport(f"tcp://127.0.0.1:{port}", {}, insecure) as receiver,
        ZmqTransport(
            f"tcp://127.0.0.1:{_free_port()}", {B.peer_id: f"tcp://127.0.0.1:{port}"}, insecure
        ) as sender,
    ):
        sender.send(_frames(4.0))
        views = _receive_one(receiver)
        assert float(wire.open_update(views, wire.WireLimits()).tensors["x"][0]) == 4.0


def test_a_bad_answer_at_a_down_neighbours_address_does_not_cut_the_link() -> None:
    """libzmq never re-dials after a protocol error; the transport rebuilds the socket itself."""
    port = _free_port()
    impostor = socket.socket()
    impostor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    impostor.bind(("127.0.0.1", port))
    impostor.listen(4)
    with _sender(f"tcp://127.0.0.1:{port}") as sender:
        impostor.settimeout(5.0)
        conn, _ = impostor.accept()
        # A ZMTP 3.0 greeting with the NULL mechanism to a CURVE client: a protocol error.
        conn.sendall(b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32))
        time.sleep(0.5)
        conn.close()
        impostor.close()
        with _receiver(f"tcp://127.0.0.1:{port}") as receiver:  # the real neighbour comes up
            deadline = time.monotonic() + 10.0
            got = []
            while not got and time.monotonic() < deadline:
                sender.send(_frames(8.0))
                got = receiver.receive(0.2)
            assert got, "the link stayed cut after one bad answer"
            assert sender.stats.links_rebuilt >= 1


# A process with a sender and a receiver transport for 40 MiB updates (above glibc's 32 MiB mmap
# ceiling): the minor page faults of libzmq's I/O threads while each CURVE message crosses.
_LARGE_MESSAGES = textwrap.dedent(
    """
    import glob, json, os
    import numpy as np
    from p2pfm.core import wire
    from p2pfm.core.identity import Identity
    from p2pfm.net.zmq_transport import ZmqTransport

    A, B = Identity(b"\\1" * 32), Identity(b"\\2" * 32)
    here, limit = "tcp://127.0.0.1:*", 64 * 2**20
    rx = ZmqTransport(here, {}, identity=B, allowed=[A.peer_id], max_message_bytes=limit)
    tx = ZmqTransport(here, {B.peer_id: rx.listen_address}, identity=A, max_message_bytes=limit)
    body = wire.encode_update(
        network="n", round=1, seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=1,
        tensors={"x": np.ones(10 * 2**20, np.float32)},
    )
    message = wire.sign(body, A)

    def io_faults():
        total = 0
        for task in glob.glob(f"/proc/{os.getpid()}/task/*"):
            with open(task + "/comm") as comm, open(task + "/stat") as stat:
                if comm.read().startswith("ZMQbg/IO"):
                    total += int(stat.read().rsplit(")", 1)[1].split()[7])
        return total

    faults = []
    for _ in range(4):
        before = io_faults()
        tx.send(message)
        got = []
        for _ in range(100):
            got = rx.receive(0.1)
            if got:
                break
        assert got and got[0].message.nbytes == len(message)
        del got
        faults.append(io_faults() - before)
    print(json.dumps({"faults": faults, "keeps": [tx.keeps_buffers, rx.keeps_buffers]}))
    tx.close()
    rx.close()
    """
)


@pytest.mark.slow  # a process of its own: the allocator settings are process-wide
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")
def test_large_messages_reuse_memory_instead_of_fresh_pages() -> None:
    """Without keep_large_buffers, each 40 MiB CURVE message costs libzmq ~30,000 fresh pages
    (the received frame, and the plaintext copy and box of the encryption); with it, none."""
    done = subprocess.run(
        [sys.executable, "-c", _LARGE_MESSAGES], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["keeps"] == [True, True]
    pages_per_message = 40 * 2**20 // resource.getpagesize()
    # The first messages grow the heap; after that the freed buffers are reused.
    assert report["faults"][-1] < pages_per_message // 4, report


def test_small_message_bounds_leave_the_allocator_alone() -> None:
    port = _free_port()
    with _receiver(f"tcp://127.0.0.1:{port}", max_message_bytes=2**20) as receiver:
        assert receiver.keeps_buffers is False
