"""How far averaging LoRA factors is from averaging the updates they make.

A LoRA pair changes a weight by ``B @ A`` (times alpha / r). Gossip averages
``A`` and ``B`` separately, and ``mean(B) @ mean(A)`` is not ``mean(B @ A)``:

    error = || sum_j w_j B_j A_j - (sum_j w_j B_j)(sum_j w_j A_j) ||_F / || sum_j w_j B_j A_j ||_F

over every pair of the adapter (numerator and denominator summed over pairs
before the square roots). It is zero when every node holds the same ``A``
(``lora.freeze_a``), and it is what a node records per round as
``aggregation_error`` (the weights being its row of the mixing matrix).

The products are never formed: with ``P = [w_1 B_1, ..., w_k B_k]`` and
``Q = [A_1; ...; A_k]``, ``||P Q||_F^2 = trace((P^T P)(Q Q^T))``, which costs
``O(d (k r)^2)`` instead of ``O(k d^2 r)`` -- a few milliseconds even for a
7B-shaped adapter. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
State = Mapping[str, Array]

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def lora_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """``(A name, B name)`` of every LoRA pair in an adapter state (peft's naming)."""
    present = set(names)
    pairs = []
    for name in sorted(present):
        if LORA_A in name:
            partner = name.replace(LORA_A, LORA_B, 1)
            if partner in present:
                pairs.append((name, partner))
    return pairs


def _squared_norm_of_product(left: Array, right: Array) -> float:
    """``||left @ right||_F^2`` via the small Gram matrices (float64)."""
    gram_left = left.T @ left  # (m, m)
    gram_right = right @ right.T  # (m, m)
    return float(np.einsum("ij,ji->", gram_left, gram_right))


def aggregation_error(states: Sequence[State], weights: Sequence[float]) -> float | None:
    """The relative error of averaging LoRA factors (module docstring) for a weighted mix.

    ``None`` when the states hold no LoRA B matrix (nothing to measure);
    ``0.0`` when they hold B matrices but no A (A frozen and shared: exact).
    """
    if len(states) != len(weights) or not states:
        raise ValueError("need one weight per state, and at least one state")
    names = list(states[0])
    pairs = lora_pairs(names)
    if not pairs:
        return 0.0 if any(LORA_B in name for name in names) else None
    w = np.asarray(weights, np.float64)
    error_sq = total_sq = 0.0
    for a_name, b_name in pairs:
        a = [np.asarray(s[a_name], np.float64) for s in states]  # (r, d_in) each
        b = [np.asarray(s[b_name], np.float64) for s in states]  # (d_out, r) each
        mean_a = sum(wj * aj for wj, aj in zip(w, a, strict=True))
        mean_b = sum(wj * bj for wj, bj in zip(w, b, strict=True))
        left = np.concatenate([wj * bj for wj, bj in zip(w, b, strict=True)], axis=1)
        right = np.concatenate(a, axis=0)
        total_sq += _squared_norm_of_product(left, right)
        error_sq += _squared_norm_of_product(
            np.concatenate([left, -mean_b], axis=1), np.concatenate([right, mean_a], axis=0)
        )
    if total_sq <= 0.0:
        return 0.0
    return math.sqrt(max(error_sq, 0.0) / total_sq)
