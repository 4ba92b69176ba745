"""A joiner's catch-up rule and the node's membership driver (p2pfm/node/overlay.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from p2pfm.core import wire
from p2pfm.core.identity import Identity, PeerId
from p2pfm.core.wire import Update
from p2pfm.net.memory import LinkFaults, MemoryNetwork
from p2pfm.node.overlay import JoinSettings, catch_up_state

IDS = [Identity(bytes([i + 1]) * 32) for i in range(5)]


def _update(i: int, round_: int, value: Any) -> Update:
    message = wire.sign(
        wire.encode_update(
            network="n", round=round_, seq=1, ts_ms=0, fingerprint=bytes(32), degree=2, samples=1,
            tensors={"x": np.asarray(value, np.float32)},
        ),
        IDS[i],
    )  # fmt: skip
    return wire.open_update(message, wire.WireLimits())


def _updates(*items: tuple[int, int, Any]) -> dict[PeerId, Update]:
    return {IDS[i].peer_id: _update(i, r, v) for i, r, v in items}


def test_three_sources_outvote_one_liar_coordinate_by_coordinate() -> None:
    found = catch_up_state(
        _updates((0, 7, [1.0, 2.0]), (1, 7, [1.1, 2.1]), (2, 7, [1e6, -1e6])), JoinSettings(), timed_out=False
    )
    assert found is not None
    round_, state = found
    assert round_ == 7 and np.allclose(state["x"], [1.1, 2.0]) and state["x"].dtype == np.float32


def test_two_sources_that_disagree_wait_for_a_third() -> None:
    settings = JoinSettings()
    assert (
        catch_up_state(_updates((0, 3, [1.0, 1.0]), (1, 3, [50.0, 50.0])), settings, timed_out=False) is None
    )
    found = catch_up_state(_updates((0, 3, [1.0, 1.0]), (1, 3, [1.02, 0.98])), settings, timed_out=False)
    assert found is not None and np.allclose(found[1]["x"], [1.01, 0.99])


def test_one_source_is_enough_only_once_the_listening_time_is_up() -> None:
    one = _updates((0, 4, [1.0]))
    assert catch_up_state(one, JoinSettings(), timed_out=False) is None
    assert catch_up_state(one, JoinSettings(), timed_out=True) == (4, {"x": np.float32([1.0])})


def test_the_newest_round_with_enough_sources_is_taken() -> None:
    found = catch_up_state(
        _updates((0, 9, [9.0]), (1, 8, [8.0]), (2, 8, [8.2]), (3, 8, [8.1])), JoinSettings(), timed_out=False
    )
    assert found is not None and found[0] == 8 and np.allclose(found[1]["x"], [8.1])


def test_the_memory_control_channel_is_not_conflated_and_reaches_non_neighbours() -> None:
    clock = [0.0]
    network = MemoryNetwork(clock=lambda: clock[0], default_faults=LinkFaults(delay_s=0.5))
    a, b, c = (ident.peer_id for ident in IDS[:3])
    ta, tb = network.attach(a, [b]), network.attach(b, [a])
    network.attach(c, [])
    for k in range(3):
        assert ta.send_control(b, "memory://b", bytes([k]))
    ta.send(b"update-1")
    ta.send(b"update-2")  # conflates with update-1 at the receiver, as ZeroMQ's socket does
    assert ta.send_control(c, "memory://c", b"to c") and ta.send([b"x"][0], [c]) == 0  # c is no neighbour
    assert tb.receive(0.0) == []  # still in flight (0.5 s)
    clock[0] = 1.0
    got = tb.receive(0.0)
    assert [bytes(r.message) for r in got if r.control] == [b"\x00", b"\x01", b"\x02"]
    assert [bytes(r.message) for r in got if not r.control] == [b"update-2"]
    assert all(r.link == a for r in got)
    ta.set_peers({c: "memory://c"})
    assert ta.send(b"now to c") == 1
