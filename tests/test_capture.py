"""A packet capture of a running link: no tensor bytes travel in the clear.

Captures the loopback interface with a raw AF_PACKET socket (needs root;
skips otherwise) while one node sends a recognisable adapter to another,
once over the default CurveZMQ link and once with ``transport.insecure``
as the control that shows the capture would see the bytes if they were there.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest

from p2pfm.core import wire
from p2pfm.core.identity import Identity
from p2pfm.net.zmq_transport import TransportSettings, ZmqTransport

A, B = Identity(b"\x0a" * 32), Identity(b"\x0b" * 32)
# A tensor whose bytes are easy to find: the ASCII of a marker, repeated.
MARKER = b"P2PFM-TENSOR-BYTES-"
TENSOR = np.frombuffer(MARKER * 64, dtype=np.uint8).copy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _capture(port: int, stop: threading.Event, out: bytearray) -> None:
    """Append the TCP payload of every loopback packet to or from ``port``."""
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    sniffer.bind(("lo", 0))
    sniffer.settimeout(0.1)
    try:
        while not stop.is_set():
            try:
                packet = sniffer.recv(262144)
            except TimeoutError:
                continue
            if len(packet) < 34 or packet[12:14] != b"\x08\x00" or packet[23] != 6:  # IPv4, TCP
                continue
            ip_header = (packet[14] & 0x0F) * 4
            tcp = 14 + ip_header
            src, dst = struct.unpack("!HH", packet[tcp : tcp + 4])
            if port in (src, dst):
                out += packet[tcp + (packet[tcp + 12] >> 4) * 4 :]
    finally:
        sniffer.close()


def _captured_traffic(insecure: bool) -> bytes:
    port = _free_port()
    settings = TransportSettings(insecure=insecure)
    stop, payload = threading.Event(), bytearray()
    sniffer = threading.Thread(target=_capture, args=(port, stop, payload))
    sniffer.start()
    time.sleep(0.2)
    try:
        with (
            ZmqTransport(
                f"tcp://127.0.0.1:{port}", {}, settings, identity=B, allowed=[A.peer_id]
            ) as receiver,
            ZmqTransport(
                f"tcp://127.0.0.1:{_free_port()}",
                {B.peer_id: f"tcp://127.0.0.1:{port}"},
                settings,
                identity=A,
            ) as sender,
        ):
            body = wire.encode_update(
                network="capture", round=1, seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=1,
                tensors={"lora": TENSOR},
            )  # fmt: skip
            sender.send(wire.sign(body, A))
            deadline = time.monotonic() + 10
            got = []
            while not got and time.monotonic() < deadline:
                got = receiver.receive(0.1)
            assert got, "the message did not arrive"
            arrived = wire.open_update(got[0].message, wire.WireLimits())
            assert arrived.tensors["lora"].tobytes() == TENSOR.tobytes()  # it did arrive intact
            time.sleep(0.3)
    finally:
        stop.set()
        sniffer.join(timeout=10)
    return bytes(payload)


def test_no_tensor_bytes_on_the_wire() -> None:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003)).close()
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot open a raw packet socket here ({exc})")
    plaintext = _captured_traffic(insecure=True)
    assert MARKER in plaintext  # control: the capture does see payloads in the clear
    encrypted = _captured_traffic(insecure=False)
    assert len(encrypted) > len(TENSOR)  # the message did travel through the capture
    assert MARKER not in encrypted
    assert MARKER[:8] not in encrypted
