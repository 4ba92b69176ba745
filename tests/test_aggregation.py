"""The LoRA aggregation error (p2pfm/learn/aggregation.py) against the products formed explicitly."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from p2pfm.learn.aggregation import aggregation_error, lora_pairs

Array = np.ndarray[Any, Any]
PREFIX = "base_model.model.bert.encoder.layer"


def _name(layer: int, module: str, factor: str) -> str:
    return f"{PREFIX}.{layer}.attention.self.{module}.lora_{factor}.weight"


def _random_states(
    rng: np.random.Generator, k: int, *, rank: int = 3, shapes: tuple[tuple[int, int], ...] = ((7, 5), (4, 6))
) -> list[dict[str, Array]]:
    """k adapters with one LoRA pair per (d_out, d_in) shape, plus a head that is no pair."""
    states = []
    for _ in range(k):
        state: dict[str, Array] = {"base_model.model.classifier.weight": rng.standard_normal((2, 5))}
        for layer, (d_out, d_in) in enumerate(shapes):
            state[_name(layer, "query", "A")] = rng.standard_normal((rank, d_in)).astype(np.float32)
            state[_name(layer, "query", "B")] = rng.standard_normal((d_out, rank)).astype(np.float32)
        states.append(state)
    return states


def _brute_force(states: list[dict[str, Array]], weights: list[float]) -> float:
    """The module docstring's formula with every B @ A formed (float64)."""
    error_sq = total_sq = 0.0
    for a_name, b_name in lora_pairs(list(states[0])):
        a = [np.asarray(s[a_name], np.float64) for s in states]
        b = [np.asarray(s[b_name], np.float64) for s in states]
        mean_of_products = sum(w * (bj @ aj) for w, aj, bj in zip(weights, a, b, strict=True))
        product_of_means = sum(w * bj for w, bj in zip(weights, b, strict=True)) @ sum(
            w * aj for w, aj in zip(weights, a, strict=True)
        )
        error_sq += float(np.sum((mean_of_products - product_of_means) ** 2))
        total_sq += float(np.sum(mean_of_products**2))
    return math.sqrt(error_sq / total_sq)


@pytest.mark.parametrize(
    "weights",
    [
        [0.5, 0.5],
        [1 / 3, 1 / 3, 1 / 3],
        [0.6, 0.2, 0.2],
        [0.25, 0.25, 0.25, 0.25],
        [0.7, 0.1, 0.1, 0.05, 0.05],
        [0.9, 0.3],  # weights need not sum to one for the formula
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_explicit_products(weights: list[float], seed: int) -> None:
    states = _random_states(np.random.default_rng(seed), len(weights))
    got = aggregation_error(states, weights)
    want = _brute_force(states, weights)
    assert got is not None and want > 0.05  # random factors: far from exact
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_one_state_is_exact() -> None:
    states = _random_states(np.random.default_rng(3), 1)
    assert aggregation_error(states, [1.0]) == pytest.approx(0.0, abs=1e-7)


def test_a_shared_a_is_exact_whatever_the_bs() -> None:
    """FFA-LoRA: every node holds the same A, so mean(B) A = mean(B A)."""
    rng = np.random.default_rng(4)
    states = _random_states(rng, 4)
    for state in states[1:]:
        for name in state:
            if ".lora_A." in name:
                state[name] = states[0][name].copy()
    assert any(
        not np.array_equal(s[_name(0, "query", "B")], states[0][_name(0, "query", "B")]) for s in states
    )
    got = aggregation_error(states, [0.4, 0.2, 0.2, 0.2])
    assert got is not None and got == pytest.approx(0.0, abs=1e-6)
    assert _brute_force(states, [0.4, 0.2, 0.2, 0.2]) == pytest.approx(0.0, abs=1e-6)


def test_identical_states_are_exact() -> None:
    state = _random_states(np.random.default_rng(5), 1)[0]
    got = aggregation_error([state, dict(state), dict(state)], [0.5, 0.25, 0.25])
    assert got is not None and got == pytest.approx(0.0, abs=1e-6)


def test_b_without_a_is_exactly_zero() -> None:
    """A frozen (lora.freeze_a): the gossiped state has B matrices only, and the mix is exact."""
    rng = np.random.default_rng(6)
    states = [
        {
            _name(0, "query", "B"): rng.standard_normal((4, 2)).astype(np.float32),
            "base_model.model.classifier.bias": rng.standard_normal(2),
        }
        for _ in range(3)
    ]
    assert aggregation_error(states, [0.5, 0.25, 0.25]) == 0.0


def test_no_lora_tensors_is_none() -> None:
    states = [{"x": np.ones(3)}, {"x": np.zeros(3)}]
    assert aggregation_error(states, [0.5, 0.5]) is None
    head_only = [{"base_model.model.classifier.weight": np.ones((2, 3))}] * 2
    assert aggregation_error(head_only, [0.5, 0.5]) is None


def test_zero_products_are_zero_not_nan() -> None:
    """B starts at zero: every B A is zero, and the error is 0.0 (not 0/0)."""
    rng = np.random.default_rng(7)
    states = [
        {
            _name(0, "value", "A"): rng.standard_normal((2, 3)).astype(np.float32),
            _name(0, "value", "B"): np.zeros((4, 2), np.float32),
        }
        for _ in range(2)
    ]
    assert aggregation_error(states, [0.5, 0.5]) == 0.0


def test_lora_pairs_pairs_a_with_its_b_and_ignores_the_rest() -> None:
    names = [
        _name(1, "value", "B"),
        _name(0, "query", "A"),
        _name(0, "query", "B"),
        _name(1, "value", "A"),
        _name(2, "query", "A"),  # no B
        _name(3, "query", "B"),  # no A
        "base_model.model.classifier.weight",
        "lora_A.weight",  # no dots around it: not peft's naming
    ]
    assert lora_pairs(names) == [
        (_name(0, "query", "A"), _name(0, "query", "B")),
        (_name(1, "value", "A"), _name(1, "value", "B")),
    ]
    assert lora_pairs([]) == []


def test_unpaired_factors_do_not_enter_the_error() -> None:
    rng = np.random.default_rng(8)
    states = _random_states(rng, 3)
    weights = [0.5, 0.3, 0.2]
    want = aggregation_error(states, weights)
    for state in states:
        state[_name(9, "query", "A")] = rng.standard_normal((3, 5)).astype(np.float32)  # no partner
    assert aggregation_error(states, weights) == pytest.approx(want, rel=1e-12)


def test_mismatched_lengths_and_empty_input_are_value_errors() -> None:
    states = _random_states(np.random.default_rng(9), 2)
    with pytest.raises(ValueError, match="one weight per state"):
        aggregation_error(states, [1.0])
    with pytest.raises(ValueError, match="one weight per state"):
        aggregation_error(states, [0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match="at least one state"):
        aggregation_error([], [])
