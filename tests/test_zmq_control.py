"""The membership control channel over ZeroMQ: control sockets, the hello endpoint, admission changes."""

from __future__ import annotations

import socket
import time

import pytest
import zmq

from p2pfm.core.control import ControlLimits, decode_control, encode_control
from p2pfm.core.errors import RejectReason, RemoteProtocolError
from p2pfm.core.identity import Identity
from p2pfm.core.records import make_peer_record
from p2pfm.net.link import ControlTransport, Received
from p2pfm.net.zmq_control import fetch_record
from p2pfm.net.zmq_transport import ZmqTransport

A, B, C = Identity(b"\1" * 32), Identity(b"\2" * 32), Identity(b"\3" * 32)
MAX = ControlLimits().max_control_bytes


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(me: Identity, allowed: list[Identity], *, hello: bool = False) -> tuple[ZmqTransport, str]:
    control = f"tcp://127.0.0.1:{_port()}"
    record = make_peer_record(me, "n", 1, [control, f"tcp://127.0.0.1:{_port()}"]).signed
    transport = ZmqTransport(
        f"tcp://127.0.0.1:{_port()}", {}, identity=me, allowed=[i.peer_id for i in allowed],
        control_listen=control, hello_listen=f"tcp://127.0.0.1:{_port()}" if hello else None,
        record=record, max_control_bytes=MAX,
    )  # fmt: skip
    return transport, control


def _control(transport: ZmqTransport, count: int, timeout_s: float = 5.0) -> list[Received]:
    got: list[Received] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += [r for r in transport.receive(0.05) if r.control]
    return got


def test_control_messages_reach_a_non_neighbour_unconflated_and_authenticated() -> None:
    b, b_control = _node(B, [A])
    a, _ = _node(A, [B])
    try:
        assert isinstance(a, ControlTransport)
        for seq in range(1, 6):
            message = encode_control(A, kind="ping", network="n", to=B.peer_id, seq=seq, rv=0)
            assert a.send_control(B.peer_id, b_control, message)
        got = _control(b, 5)
        assert [decode_control(r.message, "n").seq for r in got] == [1, 2, 3, 4, 5]  # none conflated
        assert all(r.link == A.peer_id for r in got)
    finally:
        a.close()
        b.close()


def test_a_key_admitted_later_can_connect_and_one_removed_cannot() -> None:
    b, b_control = _node(B, [A])
    c, _ = _node(C, [B])
    try:
        ping = encode_control(C, kind="ping", network="n", to=B.peer_id, seq=1, rv=0)
        c.send_control(B.peer_id, b_control, ping)
        assert _control(b, 1, timeout_s=1.0) == []  # C is not admitted
        assert b.stats.refused_connections >= 1
        b.admit([A.peer_id, C.peer_id])  # a newer roster adds C
        deadline = time.monotonic() + 10.0
        got: list[Received] = []
        seq = 2
        while not got and time.monotonic() < deadline:  # C's socket reconnects by itself
            c.send_control(
                B.peer_id, b_control, encode_control(C, kind="ping", network="n", to=B.peer_id, seq=seq, rv=0)
            )
            seq += 1
            got = _control(b, 1, timeout_s=0.5)
        assert got and got[0].link == C.peer_id
    finally:
        b.close()
        c.close()


def test_the_hello_endpoint_serves_the_signed_record_and_nothing_else() -> None:
    b, b_control = _node(B, [A], hello=True)
    try:
        assert b.hello_address is not None
        # Nobody calls b.receive(): the hello answers on its own thread (a node answers while it trains).
        record = fetch_record(b.hello_address, "n", timeout_s=5.0)
        assert record.peer == B.peer_id and record.address == b_control
        with pytest.raises(RemoteProtocolError) as info:
            fetch_record(b.hello_address, "other-network", timeout_s=5.0)
        assert info.value.reason is RejectReason.WRONG_NETWORK
        junk = zmq.Context.instance().socket(zmq.DEALER)
        junk.setsockopt(zmq.LINGER, 0)
        junk.connect(b.hello_address)
        junk.send(b"x" * 1000)  # over the request bound: the connection is dropped, nothing answered
        assert not junk.poll(500)
        junk.close()
    finally:
        b.close()


def test_no_answer_is_a_timeout() -> None:
    with pytest.raises(TimeoutError):
        fetch_record(f"tcp://127.0.0.1:{_port()}", "n", timeout_s=0.3)
