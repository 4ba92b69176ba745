from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfm.core.consensus import (
    MIX_RULES,
    clipping_radius,
    consensus_distance,
    coordinate_median,
    flatten,
    metropolis_weights,
    mix,
    network_mean,
    robust_mix,
    self_centered_clip,
    trimmed_mean,
)
from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.topology import mixing_matrix, parse_topology


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


# --------------------------------------------------------------------------- #
# Byzantine-robust rules
# --------------------------------------------------------------------------- #

Arr = np.ndarray[Any, Any]
_unit = st.floats(-1.0, 1.0, allow_nan=False)
# Anything a peer could put on the wire, NaN and Inf included.
_anything = st.floats(allow_nan=True, allow_infinity=True, width=64)


def _state(values: list[float], dim: int) -> dict[str, Arr]:
    """Two tensors, so the clipping norm must span both: a (dim,), b (len - dim,)."""
    return {"a": np.array(values[:dim], dtype=np.float64), "b": np.array(values[dim:], dtype=np.float64)}


def _run(rule: str, own: Any, received: Any, weights: Any, **kwargs: Any) -> Arr:
    return flatten(robust_mix(rule, own, received, weights, **kwargs))  # type: ignore[arg-type]


@st.composite
def _honest_round(draw: st.DrawFn, min_neighbours: int = 0) -> tuple[int, dict[str, Arr], dict[int, Any]]:
    """(dim, own state, {peer: state}) with values in [-1, 1]; 2 tensors totalling dim + 2 values."""
    dim = draw(st.integers(1, 4))
    k = draw(st.integers(min_neighbours, 6))
    vector = st.lists(_unit, min_size=dim + 2, max_size=dim + 2)
    own = _state(draw(vector), dim)
    received = {j: _state(draw(vector), dim) for j in range(k)}
    return dim, own, received


def _weights(draw: Any, peers: list[Any]) -> dict[Any, float]:
    """Metropolis weights with an own degree that may exceed the senders (missed deadlines)."""
    own_degree = len(peers) + draw(st.integers(0, 2))
    return metropolis_weights(max(own_degree, 1), {p: draw(st.integers(1, 10)) for p in peers})


@settings(max_examples=150, deadline=None)
@given(data=st.data(), honest=_honest_round())
def test_every_rule_stays_in_the_coordinate_hull(data: st.DataObject, honest: Any) -> None:
    _, own, received = honest
    weights = _weights(data.draw, list(received))
    stacked = np.stack([flatten(own), *[flatten(s) for s in received.values()]])
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    for rule in MIX_RULES:
        out = _run(rule, own, received, weights)
        assert np.all(out >= low - 1e-12) and np.all(out <= high + 1e-12), rule


@settings(max_examples=50, deadline=None)
@given(data=st.data(), values=st.lists(_unit, min_size=3, max_size=5), k=st.integers(0, 6))
def test_every_rule_keeps_an_agreed_state(data: st.DataObject, values: list[float], k: int) -> None:
    own = _state(values, 2)
    received = {j: _state(values, 2) for j in range(k)}
    weights = _weights(data.draw, list(received))
    for rule in MIX_RULES:
        np.testing.assert_allclose(_run(rule, own, received, weights), flatten(own), rtol=1e-12, atol=1e-15)


@st.composite
def _attacker(draw: st.DrawFn, size: int) -> list[float]:
    """Either an honest-looking vector scaled by up to 1e12 (any sign) or arbitrary values."""
    if draw(st.booleans()):
        scale = draw(st.floats(-1e12, 1e12, allow_nan=False))
        return [scale * v for v in draw(st.lists(_unit, min_size=size, max_size=size))]
    return draw(st.lists(_anything, min_size=size, max_size=size))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), honest=_honest_round(min_neighbours=1))  # n >= 3: enough inputs to trim one
def test_one_outlier_cannot_leave_the_honest_range(data: st.DataObject, honest: Any) -> None:
    dim, own, received = honest
    honest_values = np.stack([flatten(own), *[flatten(s) for s in received.values()]])
    low, high = honest_values.min(axis=0), honest_values.max(axis=0)
    attacked = {**received, "mallory": _state(data.draw(_attacker(dim + 2)), dim)}
    weights = _weights(data.draw, list(attacked))
    for rule in ("trimmed-mean", "median"):
        out = _run(rule, own, attacked, weights, trim=1)
        assert np.all(out >= low - 1e-12) and np.all(out <= high + 1e-12), rule


@settings(max_examples=200, deadline=None)
@given(data=st.data(), honest=_honest_round(), radius=st.floats(0.0, 10.0))
def test_clip_bounds_the_attacker_pull_by_weight_times_radius(
    data: st.DataObject, honest: Any, radius: float
) -> None:
    dim, own, received = honest
    attacked = {**received, "mallory": _state(data.draw(_attacker(dim + 2)), dim)}
    weights = _weights(data.draw, list(attacked))
    without = {p: w for p, w in weights.items() if p != "mallory"}  # its weight stays with self
    with_attacker = flatten(self_centered_clip(own, attacked, weights, radius=radius))
    without_attacker = flatten(self_centered_clip(own, received, without, radius=radius))
    assert np.all(np.isfinite(with_attacker))
    assert np.linalg.norm(with_attacker - without_attacker) <= weights["mallory"] * radius + 1e-9


@settings(max_examples=200, deadline=None)
@given(data=st.data(), honest=_honest_round(min_neighbours=1))
def test_adaptive_clip_pulls_no_farther_than_the_farthest_honest_neighbour(
    data: st.DataObject, honest: Any
) -> None:
    dim, own, received = honest
    attacked = {**received, "mallory": _state(data.draw(_attacker(dim + 2)), dim)}
    weights = _weights(data.draw, list(attacked))
    delta = data.draw(st.floats(weights["mallory"], 0.99))  # the attacker holds at most delta
    farthest = max(np.linalg.norm(flatten(s) - flatten(own)) for s in received.values())
    out = _run("clip", own, attacked, weights, byzantine_weight=delta)
    assert np.linalg.norm(out - flatten(own)) <= sum(weights.values()) * farthest + 1e-9


def test_plain_mean_is_not_robust() -> None:
    own = _s(0.5, -0.5)
    received = {0: _s(0.1, 0.2), 1: _s(-0.3, 0.4), "mallory": _s(0.5, 0.5)}
    weights = {0: 0.25, 1: 0.25, "mallory": 0.25}
    honest = _run("mean", own, received, weights)
    scaled = {**received, "mallory": _s(0.5e6, 0.5e6)}
    assert np.linalg.norm(_run("mean", own, scaled, weights) - honest) > 1e3
    for rule in ("trimmed-mean", "median", "clip"):  # the same attack barely moves the others
        assert np.linalg.norm(_run(rule, own, scaled, weights) - _run(rule, own, received, weights)) < 1.0


def _line(*distances: float) -> dict[int, dict[str, Arr]]:
    return {j: {"w": np.array([d])} for j, d in enumerate(distances)}


def test_clipping_radius_clips_only_the_farthest_delta_of_weight() -> None:
    origin = {"w": np.array([0.0])}
    received = _line(1.0, 2.0, 3.0, 100.0)
    for weight in (0.2, 0.25):  # Metropolis on degree 4, and a row with no self weight
        weights = dict.fromkeys(received, weight)
        tau = clipping_radius(origin, received, weights, byzantine_weight=0.25)
        assert tau == 3.0  # only the 100 one is clipped
        mixed = robust_mix("clip", origin, received, weights, byzantine_weight=0.25)
        np.testing.assert_allclose(mixed["w"], weight * (1.0 + 2.0 + 3.0 + 3.0))
    weights = dict.fromkeys(received, 0.2)
    assert clipping_radius(origin, received, weights, byzantine_weight=0.0) == 100.0  # clip nothing
    assert clipping_radius(origin, received, weights, byzantine_weight=0.5) == 2.0  # two farthest
    assert clipping_radius(origin, received, weights, byzantine_weight=0.9) == 0.0  # all suspect
    assert clipping_radius(origin, {}, {}, byzantine_weight=0.25) == 0.0
    tied = _line(5.0, 5.0, 1.0)  # a tie is clipped together or not at all
    assert clipping_radius(origin, tied, dict.fromkeys(tied, 0.2), byzantine_weight=0.25) == 5.0


@settings(max_examples=200, deadline=None)
@given(
    own=st.integers(-1000, 1000),
    others=st.lists(st.tuples(st.integers(-1000, 1000), st.integers(0, 10)), max_size=4),
    delta=st.one_of(st.integers(0, 39).map(lambda k: k / 40), st.floats(0.0, 0.999)),
)
def test_clipping_radius_is_the_weighted_quantile(
    own: int, others: list[tuple[int, int]], delta: float
) -> None:
    # Integer states: the distances are exact, so the test can compare against them.
    received = {j: {"w": np.array([float(v)])} for j, (v, _) in enumerate(others)}
    weights = {j: w / 40 for j, (_, w) in enumerate(others)}
    distances = {j: abs(v - own) for j, (v, _) in enumerate(others)}
    tau = clipping_radius({"w": np.array([float(own)])}, received, weights, byzantine_weight=delta)
    assert tau == 0.0 or tau in distances.values()
    clipped = math.fsum(weights[j] for j, d in distances.items() if d > tau)
    assert clipped <= delta + 1e-9  # the clipped far end holds at most delta
    if tau > 0.0:  # and clipping one more (group of tied) neighbour(s) would exceed delta
        assert math.fsum(weights[j] for j, d in distances.items() if d >= tau) > delta + 1e-9 - 1e-12


def test_clip_norm_spans_the_whole_state() -> None:
    own = {"a": np.zeros(1), "b": np.zeros(1)}
    received = {0: {"a": np.array([3.0]), "b": np.array([4.0])}}  # ||x_j - x_i|| = 5 over both tensors
    out = self_centered_clip(own, received, {0: 0.5}, radius=2.5)
    np.testing.assert_allclose([out["a"][0], out["b"][0]], [0.5 * 0.5 * 3.0, 0.5 * 0.5 * 4.0])
    # Squares that overflow float64 are rescaled: still clipped exactly, to norm 1 here.
    huge = {0: {"a": np.array([1e200]), "b": np.array([-1e200])}}
    out = self_centered_clip(own, huge, {0: 0.5}, radius=1.0)
    np.testing.assert_allclose([out["a"][0], out["b"][0]], [0.5 / math.sqrt(2), -0.5 / math.sqrt(2)])
    # A NaN in one tensor only (the other agrees exactly) still makes the whole peer count as poisoned.
    half_nan = {0: {"a": np.zeros(1), "b": np.array([math.nan])}}
    assert clipping_radius(own, half_nan, {0: 0.5}, byzantine_weight=0.25) == math.inf
    out = robust_mix("clip", own, half_nan, {0: 0.5})
    np.testing.assert_array_equal([out["a"][0], out["b"][0]], [0.0, 0.0])


def test_clip_radius_extremes_and_missing_neighbours() -> None:
    own = _s(1.0, 2.0)
    received = {0: _s(4.0, -2.0), 1: _s(0.0, 0.0)}
    weights = {0: 0.3, 1: 0.2}
    np.testing.assert_array_equal(self_centered_clip(own, received, weights, radius=0.0)["w"], own["w"])
    np.testing.assert_allclose(
        self_centered_clip(own, received, weights, radius=math.inf)["w"], mix(own, received, weights)["w"]
    )
    # A neighbour that missed the deadline: its weight stays with self, as in mix.
    np.testing.assert_allclose(
        self_centered_clip(own, {0: received[0]}, {0: 0.3}, radius=100.0)["w"],
        mix(own, {0: received[0]}, {0: 0.3})["w"],
    )
    # NaN / Inf from a peer: it contributes nothing, the rest still mixes.
    poisoned = {**received, 2: _s(math.nan, math.inf)}
    out = self_centered_clip(own, poisoned, {**weights, 2: 0.25}, radius=1.0)["w"]
    np.testing.assert_allclose(out, self_centered_clip(own, received, weights, radius=1.0)["w"], rtol=1e-6)
    # ... even when it holds more than delta, so the adaptive radius comes out infinite.
    heavy = {**weights, 2: 0.4}
    assert clipping_radius(own, poisoned, heavy, byzantine_weight=0.25) == math.inf
    expected = mix(own, received, weights)["w"]  # the NaN peer's 0.4 stays with self
    np.testing.assert_allclose(robust_mix("clip", own, poisoned, heavy)["w"], expected)


def test_trimmed_mean_and_median_by_hand() -> None:
    own = {"w": np.array([0.0, 10.0])}
    received = {j: {"w": np.array([v, 10.0 + v])} for j, v in enumerate([1.0, 2.0, 3.0, 100.0])}
    weights = dict.fromkeys(received, 0.2)  # the uniform rules only check them when n > 2 * trim
    np.testing.assert_allclose(trimmed_mean(own, received, weights, trim=1)["w"], [2.0, 12.0])
    np.testing.assert_allclose(trimmed_mean(own, received, weights, trim=0)["w"], [106 / 5, 10.0 + 106 / 5])
    np.testing.assert_allclose(coordinate_median(own, received, weights)["w"], [2.0, 12.0])
    even = {j: received[j] for j in range(3)}  # values 0, 1, 2, 3 -> median 1.5
    even_weights = dict.fromkeys(even, 0.2)  # degree 4, one neighbour late
    np.testing.assert_allclose(coordinate_median(own, even, even_weights)["w"], [1.5, 11.5])
    # n = 4 <= 2 * trim: too few inputs to trim, so the plain Metropolis mean (0.4 of self, 0.2 each).
    np.testing.assert_allclose(trimmed_mean(own, even, even_weights, trim=2)["w"], [1.2, 11.2])
    alone: dict[int, dict[str, Arr]] = {}
    np.testing.assert_array_equal(trimmed_mean(own, alone, {}, trim=3)["w"], own["w"])
    np.testing.assert_array_equal(coordinate_median(own, alone, {})["w"], own["w"])
    # A NaN from a peer sorts as the largest value and is trimmed like one.
    nan_peer: dict[Any, dict[str, Arr]] = {**even, "mallory": {"w": np.array([math.nan, math.nan])}}
    nan_weights = dict.fromkeys(nan_peer, 0.2)
    np.testing.assert_allclose(trimmed_mean(own, nan_peer, nan_weights, trim=1)["w"], [2.0, 12.0])


def test_small_rounds_trim_only_when_the_outliers_are_a_minority() -> None:
    own = {"w": np.array([0.0])}
    weight = 1 / 5  # torus, own degree 4: W_ij = 1/5 whatever the neighbours claim
    # n = 3, trim = 1: the median of three. The outlier is dropped, and the honest neighbour's value is
    # taken whole (weight 1 > W_ij): more than the mean gives it, but inside the honest range.
    two = {"honest": {"w": np.array([1.0])}, "mallory": {"w": np.array([1e6])}}
    two_weights = dict.fromkeys(two, weight)
    np.testing.assert_array_equal(trimmed_mean(own, two, two_weights, trim=1)["w"], [1.0])
    np.testing.assert_array_equal(coordinate_median(own, two, two_weights)["w"], [1.0])
    # n = 3 and 4 with trim = 2: the two outliers trim = 2 allows for could be half the inputs, so no
    # order statistic is safe: the plain mean, exactly (the median of 4 would give 5e5 here).
    three = {**two, "eve": {"w": np.array([1e6])}}
    for received in (two, three):
        weights = dict.fromkeys(received, weight)
        np.testing.assert_array_equal(
            trimmed_mean(own, received, weights, trim=2)["w"], mix(own, received, weights)["w"]
        )
    # n = 4 median, one outlier: the mean of the middle two gives an in-range value weight 1/2 > 1/5,
    # and the outlier, wherever it is, stays out of the middle unless it lies between honest values.
    honest = {"a": {"w": np.array([1.0])}, "b": {"w": np.array([2.0])}}
    weights = dict.fromkeys([*honest, "mallory"], weight)
    # Honest values 0, 1, 2; sorted with the attack, the middle two are (0, 1), (1, 1.5), (1, 2).
    for attack, expected in ((-1e6, 0.5), (1.5, 1.25), (1e6, 1.5)):
        attacked = {**honest, "mallory": {"w": np.array([attack])}}
        out = float(coordinate_median(own, attacked, weights)["w"][0])
        assert out == expected and 0.0 <= out <= 2.0


def test_coordinate_rules_span_several_blocks() -> None:
    rng = np.random.default_rng(1)
    states = [{"w": rng.standard_normal((3, 30_000)).astype(np.float32)} for _ in range(6)]  # 90k > 65536
    own, received = states[0], dict(enumerate(states[1:]))
    stacked = np.stack([s["w"].astype(np.float64) for s in states])
    weights = dict.fromkeys(received, 1 / 6)
    median = coordinate_median(own, received, weights)["w"]
    np.testing.assert_allclose(median, np.median(stacked, axis=0), rtol=1e-6)
    ordered = np.sort(stacked, axis=0)
    trimmed = trimmed_mean(own, received, weights, trim=2)["w"]
    np.testing.assert_allclose(trimmed, ordered[2:4].mean(axis=0), rtol=1e-6)


def test_robust_mix_dispatches() -> None:
    rng = np.random.default_rng(2)
    own = {"a": rng.standard_normal(4), "b": rng.standard_normal((2, 2))}
    received = {j: {k: rng.standard_normal(v.shape) for k, v in own.items()} for j in range(5)}
    weights = dict.fromkeys(received, 1 / 6)
    expected = {
        "mean": mix(own, received, weights),
        "trimmed-mean": trimmed_mean(own, received, weights, trim=2),
        "median": coordinate_median(own, received, weights),
        "clip": self_centered_clip(
            own, received, weights, radius=clipping_radius(own, received, weights, byzantine_weight=0.4)
        ),
    }
    assert set(expected) == set(MIX_RULES)
    for rule, want in expected.items():
        got = robust_mix(rule, own, received, weights, trim=2, byzantine_weight=0.4)  # type: ignore[arg-type]
        for name in own:
            np.testing.assert_array_equal(got[name], want[name])


def test_robust_rules_refuse_misuse() -> None:
    own, received, weights = _s(1.0), {0: _s(2.0)}, {0: 0.5}
    with pytest.raises(LocalProtocolError, match="mean, trimmed-mean, median, clip"):
        robust_mix("krum", own, received, weights)  # type: ignore[arg-type]
    for trim in (-1, 1.5, True):
        with pytest.raises(LocalProtocolError):
            trimmed_mean(own, received, weights, trim=trim)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        robust_mix("trimmed-mean", own, received, weights, trim=-1)
    for radius in (-0.1, math.nan):
        with pytest.raises(LocalProtocolError):
            self_centered_clip(own, received, weights, radius=radius)
    for delta in (-0.1, 1.0, math.nan):
        with pytest.raises(LocalProtocolError):
            clipping_radius(own, received, weights, byzantine_weight=delta)
        with pytest.raises(LocalProtocolError):
            robust_mix("clip", own, received, weights, byzantine_weight=delta)
    for rule in MIX_RULES:
        bad_calls = [
            (received, {}),  # a weight missing
            (received, {0: 1.5}),  # weights sum > 1
            ({0: _s(1.0, 2.0)}, weights),  # another shape
            ({0: {**_s(1.0), "extra": np.zeros(1)}}, weights),  # a tensor the node lacks
            ({0: {"v": np.zeros(1)}}, weights),  # a tensor missing
        ]
        for bad_received, bad_weights in bad_calls:
            with pytest.raises(LocalProtocolError):
                robust_mix(rule, own, bad_received, bad_weights)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_robust_rules_keep_dtype_and_leave_inputs_alone(dtype: Any) -> None:
    rng = np.random.default_rng(3)
    own = {"a": rng.standard_normal((3, 2)).astype(dtype), "b": rng.standard_normal(5).astype(dtype)}
    received = {
        j: {k: (v + rng.standard_normal(v.shape)).astype(dtype) for k, v in own.items()} for j in range(4)
    }
    received[9] = {k: np.full(v.shape, 1e4, dtype=dtype) for k, v in own.items()}  # an outlier
    weights = dict.fromkeys(received, 0.18)
    before = (
        {k: v.copy() for k, v in own.items()},
        {j: {k: v.copy() for k, v in s.items()} for j, s in received.items()},
    )
    lone = {9: received[9]}  # one neighbour heard: the trimmed rules fall back to mix
    for rule in MIX_RULES:
        for heard, heard_weights in ((received, weights), (lone, {9: 0.18})):
            out = robust_mix(rule, own, heard, heard_weights)  # type: ignore[arg-type]
            for name, value in own.items():
                assert out[name].dtype == dtype and out[name].shape == value.shape
                assert not np.shares_memory(out[name], value)
    for name, value in own.items():
        np.testing.assert_array_equal(value, before[0][name])
    for j, state in received.items():
        for name, value in state.items():
            np.testing.assert_array_equal(value, before[1][j][name])


# --------------------------------------------------------------------------- #
# Too few inputs to trim: the plain Metropolis mean (docs/robust.md "Exact definitions")
# --------------------------------------------------------------------------- #


def test_a_lone_neighbour_gets_no_more_than_its_metropolis_weight() -> None:
    # Ring, own degree 2, one neighbour (degree 2) heard and the other late: W_ij = 1/3.
    own = {"w": np.array([0.0, 0.0])}
    received = {"mallory": {"w": np.array([1e6, -1e6])}}
    weights = metropolis_weights(2, {"mallory": 2})
    plain = mix(own, received, weights)["w"]
    for rule in ("trimmed-mean", "median"):
        out = robust_mix(rule, own, received, weights, trim=1)["w"]
        assert np.all(np.abs(out) <= 1e6 / 3 * (1 + 1e-12)), (rule, out)
        np.testing.assert_array_equal(out, plain)


@st.composite
def _too_few_to_trim(draw: st.DrawFn) -> tuple[int, dict[str, Arr], dict[Any, dict[str, Arr]]]:
    """(trim, own, received) with n = 1 + len(received) <= 2 * trim; neighbours may be attackers."""
    trim = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 3))
    own = _state(draw(st.lists(_unit, min_size=dim + 2, max_size=dim + 2)), dim)
    finite = st.one_of(_unit, st.floats(-1e12, 1e12, allow_nan=False))
    peers = draw(st.integers(0, 2 * trim - 1))
    received = {
        j: _state(draw(st.lists(finite, min_size=dim + 2, max_size=dim + 2)), dim) for j in range(peers)
    }
    return trim, own, received


@settings(max_examples=200, deadline=None)
@given(data=st.data(), case=_too_few_to_trim())
def test_too_few_inputs_never_move_farther_than_the_mean(data: st.DataObject, case: Any) -> None:
    trim, own, received = case
    weights = _weights(data.draw, list(received))
    mine = flatten(own)
    bound = np.abs(_run("mean", own, received, weights) - mine)  # per coordinate
    rules = ["trimmed-mean"] + (["median"] if len(received) <= 1 else [])  # median: n <= 2
    for rule in rules:
        moved = np.abs(_run(rule, own, received, weights, trim=trim) - mine)
        assert np.all(moved <= bound * (1 + 1e-12)), (rule, trim, moved, bound)
