"""The Transport interface: every transport the node may be given has its exact calls."""

from __future__ import annotations

import inspect

import pytest

from p2pfm.net import link
from p2pfm.net.link import Transport, TransportStats
from p2pfm.net.memory import MemoryTransport
from p2pfm.net.zmq_transport import ZmqTransport
from p2pfm.node.faults import LossyTransport

TRANSPORTS = [MemoryTransport, ZmqTransport, LossyTransport]


@pytest.mark.parametrize("transport", TRANSPORTS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("method", ["send", "receive", "close"])
def test_every_transport_takes_the_interfaces_arguments(transport: type, method: str) -> None:
    """The node calls e.g. ``receive(timeout_s)``, ``send(message, peers)``: names, defaults must match."""
    expected = inspect.signature(getattr(Transport, method))
    actual = inspect.signature(getattr(transport, method))
    assert [(p.name, p.kind, p.default) for p in actual.parameters.values()] == [
        (p.name, p.kind, p.default) for p in expected.parameters.values()
    ]


def test_counters_are_per_transport_and_drop_reasons_distinct() -> None:
    first, second = TransportStats(), TransportStats()
    first.dropped[link.DROP_FAULT] += 1
    first.handshake_failures["auth"] += 1
    assert second.dropped == {} and second.handshake_failures == {}  # no shared mutable default
    assert link.DROP_FAULT != link.DROP_QUEUE_FULL
