"""Consensus math: pure functions over dicts of arrays (no I/O, no protocol).

A *state* is a mapping from tensor name to a numpy array; every node's state
has the same names and shapes (the protocol's schema gate enforces that for
peer data, so a mismatch here is a local bug: LocalProtocolError).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from p2pfm.errors import LocalProtocolError
from p2pfm.topology import metropolis_weight

K = TypeVar("K", bound=Hashable)
Array = np.ndarray[Any, Any]
State = Mapping[str, Array]

_WEIGHT_SLACK = 1e-9  # float error allowed when weights sum to exactly one


def metropolis_weights(own_degree: int, neighbour_degrees: Mapping[K, int]) -> dict[K, float]:
    """Metropolis-Hastings weights W_ij = 1 / (1 + max(d_i, d_j)) for each neighbour j.

    Only degrees are needed, and each neighbour's degree rides on its
    message, so a node computes its row of W without knowing the graph.
    """
    return {peer: metropolis_weight(own_degree, degree) for peer, degree in neighbour_degrees.items()}


def mix(own: State, received: Mapping[K, State], weights: Mapping[K, float]) -> dict[str, Array]:
    """Return ``x_i <- (1 - sum_j w_ij) x_i + sum_j w_ij x_j`` over the senders in ``received``.

    ``weights`` must give a weight for every sender in ``received``; the
    weight of a neighbour that missed the deadline simply is not there, so it
    stays with the node itself (keeps W row-stochastic). Sums accumulate in
    float64 and are cast back to each tensor's own dtype.
    """
    if set(received) != set(weights):
        raise LocalProtocolError("mix needs exactly one weight per received state")
    total = 0.0
    for peer, weight in weights.items():
        if not (weight >= 0.0 and np.isfinite(weight)):
            raise LocalProtocolError(f"weight for {peer!r} must be finite and >= 0, got {weight}")
        total += weight
    if total > 1.0 + _WEIGHT_SLACK:
        raise LocalProtocolError(f"neighbour weights sum to {total} > 1")
    self_weight = max(0.0, 1.0 - total)
    mixed: dict[str, Array] = {}
    for name, mine in own.items():
        acc = np.asarray(mine, dtype=np.float64) * self_weight
        for peer, state in received.items():
            theirs = state.get(name)
            if theirs is None or theirs.shape != mine.shape:
                raise LocalProtocolError(f"state of {peer!r} lacks {name!r} or has another shape")
            acc += weights[peer] * np.asarray(theirs, dtype=np.float64)
        mixed[name] = acc.astype(mine.dtype, copy=False)
    for peer, state in received.items():
        extra = set(state) - set(own)
        if extra:
            raise LocalProtocolError(f"state of {peer!r} has tensors {sorted(extra)} the node lacks")
    return mixed


def flatten(state: State) -> Array:
    """Concatenate a state's tensors (sorted by name) into one float64 vector."""
    if not state:
        return np.zeros(0)
    return np.concatenate([np.asarray(state[name], dtype=np.float64).ravel() for name in sorted(state)])


def consensus_distance(states: Sequence[State]) -> float:
    """``mean_i ||x_i - xbar||^2 / mean_i ||x_i||^2``; 0 means every node agrees.

    Scale-free, so a run with large adapters and one with small vectors read
    the same. Returns 0.0 when every state is zero.
    """
    if not states:
        raise LocalProtocolError("consensus_distance needs at least one state")
    matrix = np.stack([flatten(state) for state in states])  # (nodes, parameters)
    mean = matrix.mean(axis=0)
    spread = float(np.mean(np.sum((matrix - mean) ** 2, axis=1)))
    size = float(np.mean(np.sum(matrix**2, axis=1)))
    return spread / size if size > 0.0 else 0.0


def network_mean(states: Sequence[State]) -> dict[str, Array]:
    """The float64 average state over nodes (what consensus should converge to)."""
    names = states[0].keys()
    return {name: np.mean([np.asarray(s[name], dtype=np.float64) for s in states], axis=0) for name in names}
