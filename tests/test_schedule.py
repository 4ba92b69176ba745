"""p2pfm.core.schedule: time-varying topologies (one-peer-exp:N, matching:N[:SEED]) and their use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from p2pfm import cli
from p2pfm.core.errors import LocalProtocolError, TopologyError
from p2pfm.core.fingerprint import fingerprint, schema_document
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import GossipProtocol, ProtocolConfig
from p2pfm.core.schedule import RoundSchedule, contraction_per_round
from p2pfm.core.topology import parse_topology
from p2pfm.core.wire import TensorSpec
from p2pfm.lab.sim import SimConfig, simulate


def _is_matching(schedule: RoundSchedule, round_: int) -> bool:
    partners = [schedule.partners(i, round_) for i in range(schedule.n)]
    return all(
        len(p) <= 1 and all(schedule.partners(j, round_) == (i,) for j in p) for i, p in enumerate(partners)
    )


@pytest.mark.parametrize("n", [2, 8, 16, 64])
def test_one_peer_exp_on_a_power_of_two_averages_exactly_in_log2_n_rounds(n: int) -> None:
    schedule = parse_topology(f"one-peer-exp:{n}").schedule
    assert schedule is not None and schedule.bits == int(np.log2(n))
    assert all(_is_matching(schedule, r) for r in range(1, 2 * schedule.bits + 1))
    assert schedule.partners(5 % n, 1) == ((5 % n) ^ 1,)  # round 1 pairs neighbours at distance 1
    product = np.eye(n)
    for r in range(1, schedule.bits + 1):
        product = schedule.round_matrix(r) @ product
    np.testing.assert_allclose(product, np.full((n, n), 1.0 / n), atol=1e-15)
    assert contraction_per_round(schedule, schedule.bits) == 0.0
    if n > 2:  # one round short of a period, the halves of the cube still disagree
        assert contraction_per_round(schedule, schedule.bits - 1) == pytest.approx(1.0)


def test_one_peer_exp_elsewhere_still_contracts_and_skips_missing_partners() -> None:
    topology = parse_topology("one-peer-exp:12")
    schedule = topology.schedule
    assert schedule is not None and schedule.bits == 4
    assert schedule.partners(4, 4) == ()  # 4 XOR 8 = 12 is not a node: no exchange that round
    assert topology.neighbours(4) == (0, 5, 6) and topology.partners(4, 1) == (5,)
    assert 0.0 < schedule.lambda2 < 1.0


def test_matchings_are_reproducible_per_round_and_seed() -> None:
    a, b, other = (parse_topology(spec).schedule for spec in ("matching:9:3", "matching:9:3", "matching:9:4"))
    assert a is not None and b is not None and other is not None
    rounds = range(1, 13)
    assert all(_is_matching(a, r) for r in rounds)
    assert [a.partners(0, r) for r in rounds] == [b.partners(0, r) for r in rounds]
    assert [a.partners(0, r) for r in rounds] != [other.partners(0, r) for r in rounds]
    assert all(sum(not a.partners(i, r) for i in range(9)) == 1 for r in rounds)  # N odd: one sits out
    assert parse_topology("matching:9").n_edges == 9 * 8 // 2  # any pair may meet: the union is complete
    assert 0.0 < a.lambda2 < 1.0


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("one-peer-exp:1", "N must be in 2.."),
        ("one-peer-exp:4:5", "expected one-peer-exp:N"),
        ("matching:x", "non-negative integers"),
        ("matching:8:1:2", "expected matching:N[:SEED]"),
    ],
)
def test_bad_schedule_specs_are_one_line_topology_errors(spec: str, fragment: str) -> None:
    with pytest.raises(TopologyError, match=fragment.replace("[", r"\[").replace(".", r"\.")):
        parse_topology(spec)


def test_a_rounds_partners_are_the_only_ones_waited_for_and_the_degree_says_so() -> None:
    me, a, b = (Identity(bytes([i]) * 32) for i in (1, 2, 3))
    spec = TensorSpec("x", "float32", (2,))
    digest = fingerprint({"q": schema_document([spec])})
    config = ProtocolConfig(network="n", fingerprint=digest, round_timeout_s=5.0, schema=(spec,))
    protocol = GossipProtocol(me, [a.peer_id, b.peer_id], config)
    sender = GossipProtocol(a, [me.peer_id], config)
    protocol.start_round(1, 0.0, partners=[a.peer_id])
    assert protocol.poll(0.0) is None  # waits for a only
    sender.start_round(1, 0.0, partners=[me.peer_id])
    protocol.receive(sender.make_update({"x": np.ones(2, np.float32)}, samples=1, wall_time_ms=0), 0.0)
    done = protocol.poll(0.0)
    assert done is not None and set(done.updates) == {a.peer_id} and not done.missing
    assert done.weights == {a.peer_id: 0.5}  # both have one partner this round: Metropolis 1/(1+1)
    with pytest.raises(LocalProtocolError, match="partners must be neighbours"):
        protocol.start_round(2, 1.0, partners=[Identity(b"\x09" * 32).peer_id])


def test_the_simulator_reaches_the_exact_average_on_one_peer_exp_16() -> None:
    result = simulate(SimConfig("one-peer-exp:16", rounds=4, dim=32, dtype="float64", keep_states=True))
    distances = [r.consensus_distance for r in result.rounds]
    assert distances[4] < 1e-12 * distances[0] and distances[3] > 1e-3 * distances[0]
    assert all(r.messages == 16 and r.delivered == 16 for r in result.rounds[1:])  # one per node and round
    start = np.stack([s["x"] for s in result.initial_states]).mean(axis=0)
    np.testing.assert_allclose(result.final_states[0]["x"], start, atol=1e-12)
    assert result.lambda2 == 0.0 and result.rejected == 0


def test_topology_show_describes_the_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["topology", "show", "one-peer-exp:16", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["exact_average_after"] == 4 and doc["lambda2"] == 0.0 and doc["max_degree"] == 4
    assert cli.main(["topology", "show", "matching:16", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["exact_average_after"] is None and 0.0 < doc["lambda2"] < 1.0 and doc["edges"] == 120


def test_a_node_config_on_a_schedule_knows_its_partner_each_round(tmp_path: Path) -> None:
    from tests.test_node_config import _base, _write  # noqa: PLC0415

    ids = {str(i): Identity(bytes([i + 1]) * 32).peer_id for i in range(4)}
    doc = _base()
    doc.pop("peers")
    doc["topology"] = {
        "spec": "one-peer-exp:4",
        "self": "0",
        "members": {n: {"id": ids[n].hex, "address": f"tcp://127.0.0.1:{6000 + int(n)}"} for n in ids},
    }
    from p2pfm.config.node_config import load_node_config  # noqa: PLC0415

    config = load_node_config(_write(tmp_path, doc))
    assert sorted(p.name for p in config.peers) == ["1", "2"]  # 0 XOR 1, 0 XOR 2
    assert config.partners is not None
    assert [config.partners(r) for r in (1, 2, 3)] == [(ids["1"],), (ids["2"],), (ids["1"],)]
