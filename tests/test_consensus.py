from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfm.consensus import consensus_distance, metropolis_weights, mix, network_mean
from p2pfm.errors import LocalProtocolError
from p2pfm.topology import mixing_matrix, parse_topology


def _s(*values: float) -> dict[str, np.ndarray[Any, Any]]:
    return {"w": np.array(values, dtype=np.float32)}


def test_metropolis_weights_from_degrees() -> None:
    assert metropolis_weights(2, {"a": 2, "b": 5}) == {"a": pytest.approx(1 / 3), "b": pytest.approx(1 / 6)}


def test_mix_gives_missing_weight_to_self() -> None:
    mixed = mix(_s(1.0), {"a": _s(4.0)}, {"a": 0.25})
    np.testing.assert_allclose(mixed["w"], 0.75 * 1.0 + 0.25 * 4.0)
    assert mixed["w"].dtype == np.float32
    alone = mix(_s(1.0, 2.0), {}, {})
    np.testing.assert_array_equal(alone["w"], [1.0, 2.0])


@settings(max_examples=200)
@given(
    own=st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3),
    others=st.lists(st.lists(st.floats(-1e6, 1e6), min_size=3, max_size=3), max_size=6),
    degrees=st.lists(st.integers(1, 10), min_size=7, max_size=7),
)
def test_mix_is_a_convex_combination(own: list[float], others: list[list[float]], degrees: list[int]) -> None:
    received = {i: {"w": np.array(v)} for i, v in enumerate(others)}
    weights = metropolis_weights(max(len(others), 1), {i: degrees[i] for i in received})
    mixed = mix({"w": np.array(own)}, received, weights)["w"]
    stacked = np.stack([np.array(own), *[np.array(v) for v in others]])
    assert np.all(mixed >= stacked.min(axis=0) - 1e-6)
    assert np.all(mixed <= stacked.max(axis=0) + 1e-6)


def test_mix_refuses_misuse() -> None:
    with pytest.raises(LocalProtocolError):
        mix(_s(1.0), {"a": _s(1.0)}, {})
    with pytest.raises(LocalProtocolError):
        mix(_s(1.0), {"a": _s(1.0), "b": _s(1.0)}, {"a": 0.7, "b": 0.7})
    with pytest.raises(LocalProtocolError):
        mix(_s(1.0), {"a": _s(1.0)}, {"a": -0.1})
    with pytest.raises(LocalProtocolError):
        mix(_s(1.0), {"a": _s(1.0, 2.0)}, {"a": 0.5})
    with pytest.raises(LocalProtocolError):
        mix(_s(1.0), {"a": {**_s(1.0), "extra": np.zeros(1)}}, {"a": 0.5})


def test_one_synchronous_round_equals_multiplying_by_w() -> None:
    topology = parse_topology("torus:3x4")
    matrix = mixing_matrix(topology)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((topology.n_nodes, 5))
    states = [{"w": x[i]} for i in range(topology.n_nodes)]
    new = []
    for i in range(topology.n_nodes):
        neighbours = topology.neighbours(i)
        weights = metropolis_weights(topology.degree(i), {j: topology.degree(j) for j in neighbours})
        new.append(mix(states[i], {j: states[j] for j in neighbours}, weights)["w"])
    np.testing.assert_allclose(np.stack(new), matrix @ x, atol=1e-12)
    # Symmetric, doubly stochastic W preserves the network mean exactly.
    np.testing.assert_allclose(np.stack(new).mean(axis=0), x.mean(axis=0), atol=1e-12)


def test_consensus_distance() -> None:
    assert consensus_distance([_s(1.0, 2.0), _s(1.0, 2.0)]) == 0.0
    assert consensus_distance([_s(0.0), _s(0.0)]) == 0.0
    # x = (1, -1): mean 0, spread 1 each, size 1 each -> 1.
    assert consensus_distance([_s(1.0), _s(-1.0)]) == pytest.approx(1.0)
    scaled = consensus_distance([_s(3.0, 1.0), _s(1.0, 5.0)])
    assert consensus_distance([_s(300.0, 100.0), _s(100.0, 500.0)]) == pytest.approx(scaled)
    with pytest.raises(LocalProtocolError):
        consensus_distance([])
    mean = network_mean([_s(1.0, 2.0), _s(3.0, 6.0)])
    np.testing.assert_allclose(mean["w"], [2.0, 4.0])
