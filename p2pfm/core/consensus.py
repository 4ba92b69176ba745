"""Consensus math: pure functions over dicts of arrays (no I/O, no protocol).

A *state* is a mapping from tensor name to a numpy array; every node's state
has the same names and shapes (the protocol's schema gate enforces that for
peer data, so a mismatch here is a local bug: LocalProtocolError).

Besides the plain weighted mean (``mix``) there are Byzantine-robust rules,
chosen by ``gossip.rule``: coordinate-wise trimmed mean and median, and
self-centred clipping (ClippedGossip) with an adaptive radius. docs/robust.md
says when to use which and what none of them protects against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Literal, TypeVar, get_args

import numpy as np

from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.topology import metropolis_weight

K = TypeVar("K", bound=Hashable)
Array = np.ndarray[Any, Any]
State = Mapping[str, Array]

MixRule = Literal["mean", "trimmed-mean", "median", "clip"]
MIX_RULES: tuple[str, ...] = get_args(MixRule)  # defined once, in MixRule

_WEIGHT_SLACK = 1e-9  # float error allowed when weights sum to exactly one
# Coordinates sorted per block: a (n, 65536) float64 block is ~4.7 MB for n = 9,
# small enough to stay in cache and measured ~3x faster than one big sort.
_CHUNK = 1 << 16


def metropolis_weights(own_degree: int, neighbour_degrees: Mapping[K, int]) -> dict[K, float]:
    """Metropolis-Hastings weights W_ij = 1 / (1 + max(d_i, d_j)) for each neighbour j.

    Only degrees are needed, and each neighbour's degree rides on its
    message, so a node computes its row of W without knowing the graph.
    """
    return {peer: metropolis_weight(own_degree, degree) for peer, degree in neighbour_degrees.items()}


_MIX_BLOCK = 1 << 16  # elements mixed at a time (512 KiB of float64 per temporary)


def mix(own: State, received: Mapping[K, State], weights: Mapping[K, float]) -> dict[str, Array]:
    """Return ``x_i <- (1 - sum_j w_ij) x_i + sum_j w_ij x_j`` over the senders in ``received``.

    ``weights`` must give a weight for every sender in ``received``; the
    weight of a neighbour that missed the deadline simply is not there, so it
    stays with the node itself (keeps W row-stochastic). Sums accumulate in
    float64 and are cast back to each tensor's own dtype.
    """
    self_weight = _self_weight(received, weights)
    _check_schema(own, received)
    mixed: dict[str, Array] = {}
    # float64 temporaries of one block, reused: they stay in cache, and a large tensor costs no
    # tensor-sized float64 arrays (element by element the arithmetic is the same: bit-identical).
    acc_buffer = np.empty(_MIX_BLOCK, dtype=np.float64)
    term_buffer = np.empty(_MIX_BLOCK, dtype=np.float64)
    for name, mine in own.items():
        flat_mine = np.ravel(mine)
        theirs = [(np.ravel(state[name]), weights[peer]) for peer, state in received.items()]
        out = np.empty(flat_mine.size, dtype=mine.dtype)
        for start in range(0, flat_mine.size, _MIX_BLOCK):
            stop = min(start + _MIX_BLOCK, flat_mine.size)
            acc, term = acc_buffer[: stop - start], term_buffer[: stop - start]
            np.multiply(flat_mine[start:stop], self_weight, out=acc, dtype=np.float64)
            for flat, weight in theirs:
                np.multiply(flat[start:stop], weight, out=term, dtype=np.float64)  # no float64 copy first
                acc += term
            out[start:stop] = acc  # rounded to the tensor's dtype
        mixed[name] = out.reshape(mine.shape)
    return mixed


def _self_weight(received: Mapping[K, State], weights: Mapping[K, float]) -> float:
    """Validate one row of W (one finite weight >= 0 per sender, sum <= 1); return W_ii."""
    if set(received) != set(weights):
        raise LocalProtocolError("mixing needs exactly one weight per received state")
    total = 0.0
    for peer, weight in weights.items():
        if not (weight >= 0.0 and np.isfinite(weight)):
            raise LocalProtocolError(f"weight for {peer!r} must be finite and >= 0, got {weight}")
        total += weight
    if total > 1.0 + _WEIGHT_SLACK:
        raise LocalProtocolError(f"neighbour weights sum to {total} > 1")
    return max(0.0, 1.0 - total)


def _check_schema(own: State, received: Mapping[K, State]) -> None:
    """Every received state must hold exactly the node's tensor names, each with the same shape."""
    for peer, state in received.items():
        for name, mine in own.items():
            theirs = state.get(name)
            if theirs is None or theirs.shape != mine.shape:
                raise LocalProtocolError(f"state of {peer!r} lacks {name!r} or has another shape")
        extra = set(state) - set(own)
        if extra:
            raise LocalProtocolError(f"state of {peer!r} has tensors {sorted(extra)} the node lacks")


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


# --------------------------------------------------------------------------- #
# Byzantine-robust mixing rules (docs/robust.md)
# --------------------------------------------------------------------------- #


def _coordinatewise(
    own: State, received: Mapping[K, State], reduce: Callable[[Array], Array]
) -> dict[str, Array]:
    """Apply ``reduce`` to the sorted values of every coordinate over ``{own} ∪ received``.

    Per tensor and per block of ``_CHUNK`` coordinates, the n = 1 + len(received)
    values are stacked into a float64 ``(n, chunk)`` block and sorted along axis
    0; ``reduce`` maps that sorted block to ``(chunk,)``. NaN sorts last, so a
    peer's NaN counts as the largest value (and is trimmed like one). The result
    is cast back to each tensor's own dtype.
    """
    _check_schema(own, received)
    peers = list(received.values())
    out: dict[str, Array] = {}
    for name, mine in own.items():
        flats = [np.ravel(mine)] + [np.ravel(state[name]) for state in peers]  # n x (size,)
        result = np.empty(mine.size, dtype=mine.dtype)
        for start in range(0, mine.size, _CHUNK):
            block = np.stack([flat[start : start + _CHUNK] for flat in flats], dtype=np.float64)
            result[start : start + _CHUNK] = reduce(np.sort(block, axis=0))
        out[name] = result.reshape(mine.shape)
    return out


def _median_of_sorted(ordered: Array) -> Array:
    """Median along axis 0 of an already sorted ``(n, chunk)`` block -> ``(chunk,)``."""
    n = ordered.shape[0]
    if n % 2:
        return np.asarray(ordered[n // 2])
    return np.asarray(0.5 * (ordered[n // 2 - 1] + ordered[n // 2]))


def _order_statistic(
    own: State,
    received: Mapping[K, State],
    weights: Mapping[K, float],
    tolerated: int,
    reduce: Callable[[Array], Array],
) -> dict[str, Array]:
    """``_coordinatewise(reduce)`` when n = 1 + len(received) > 2 * ``tolerated``, else ``mix``.

    A coordinate-wise rule meant to survive ``tolerated`` arbitrary neighbours
    needs them to be a strict minority of the n inputs. With n <= 2*tolerated
    they may be half of them or more, no order statistic is safe, and the
    plain Metropolis mean is used: its bound (neighbour j moves x_i by at most
    W_ij times its own offset) holds however many neighbours lie.
    """
    if 1 + len(received) <= 2 * tolerated:
        return mix(own, received, weights)
    _self_weight(received, weights)
    return _coordinatewise(own, received, reduce)


def trimmed_mean(
    own: State, received: Mapping[K, State], weights: Mapping[K, float], *, trim: int
) -> dict[str, Array]:
    """Coordinate-wise trimmed mean over the n = 1 + len(received) states.

    Per coordinate the ``trim`` largest and ``trim`` smallest of the n values
    are dropped and the other n - 2*trim averaged with equal weights, so up to
    ``trim`` arbitrary values (on either side) cannot pull the result outside
    the range of the remaining ones. ``trim=0`` is the plain uniform mean.
    ``weights`` (one row of Metropolis W, as for ``mix``) is checked and
    otherwise only used when there are too few inputs to trim.

    Too few inputs to trim (n <= 2*trim): the result is ``mix(own, received,
    weights)``, the plain Metropolis mean. Up to ``trim`` of the n - 1
    neighbours may be Byzantine, so they can be half the inputs or more and no
    order statistic (the median included) is guaranteed to stay in the honest
    range; one lone heard neighbour may be honest or not and nothing in the
    values tells which. The most a rule can then guarantee is the mean's:
    every neighbour gets its Metropolis weight W_ij and no more, and the node
    keeps W_ii = 1 - sum_j W_ij (the late neighbours' weight included). The
    uniform median of {own, x_j} would give a lone x_j weight 1/2 > W_ij.

    With enough inputs the rule may give one value more than its W_ij (n = 3,
    trim = 1: the median of three can be a neighbour's own value), but only a
    value inside the honest range: an outlier is trimmed.
    """
    if isinstance(trim, bool) or not isinstance(trim, int) or trim < 0:
        raise LocalProtocolError(f"trim must be an int >= 0, got {trim!r}")
    return _order_statistic(
        own, received, weights, trim, lambda ordered: ordered[trim : ordered.shape[0] - trim].mean(axis=0)
    )


def coordinate_median(
    own: State, received: Mapping[K, State], weights: Mapping[K, float]
) -> dict[str, Array]:
    """Coordinate-wise median over the n = 1 + len(received) states (mean of the middle two if n is even).

    It survives any minority of bad inputs. With n <= 2 (one neighbour heard,
    or none) even a single neighbour is half the inputs, so, as in
    ``trimmed_mean``, the result is ``mix(own, received, weights)``: the lone
    neighbour keeps its Metropolis weight W_ij instead of the median of two's
    1/2. With n = 4 the mean of the middle two gives one value weight 1/2,
    more than any W_ij (<= 1/4 there); a single outlier is never one of the
    middle two unless it lies between honest values, so it cannot leave the
    honest range.
    """
    return _order_statistic(own, received, weights, 1, _median_of_sorted)


def _distance(own: State, theirs: State) -> float:
    """``||theirs - own||_2`` over the whole state (all tensors together, as ``flatten`` would).

    Returns ``inf`` when the difference holds an Inf or NaN. Finite entries
    large enough to overflow the sum of squares (|z| > ~1e154) are handled by a
    rescaled pass, so a huge but finite attacker still gets a finite norm.
    """
    diffs = [
        np.subtract(np.ravel(theirs[name]), np.ravel(mine), dtype=np.float64) for name, mine in own.items()
    ]
    with np.errstate(over="ignore", invalid="ignore"):
        total = sum(float(np.dot(diff, diff)) for diff in diffs)
        if math.isfinite(total):
            return math.sqrt(total)
        if not all(np.isfinite(diff).all() for diff in diffs):
            return math.inf
        # Only finite entries whose squares overflow get here, so peak > 0.
        peak = max(float(np.max(np.abs(diff))) for diff in diffs if diff.size)
        return peak * math.sqrt(sum(float(np.dot(diff / peak, diff / peak)) for diff in diffs))


def _distances(own: State, received: Mapping[K, State]) -> dict[K, float]:
    """``||x_j - x_i||`` for every sender j; one float64 pass over each tensor per sender."""
    _check_schema(own, received)
    squares = dict.fromkeys(received, 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        for name, mine in own.items():
            base = np.asarray(mine, dtype=np.float64).ravel()
            for peer, state in received.items():
                diff = np.subtract(np.ravel(state[name]), base, dtype=np.float64)
                squares[peer] += float(np.dot(diff, diff))
    # Overflow or Inf/NaN: redo that sender alone, carefully (rare, attacker-only path).
    return {
        peer: math.sqrt(square) if math.isfinite(square) else _distance(own, received[peer])
        for peer, square in squares.items()
    }


def _clip_scale(distance: float, radius: float) -> float:
    """The factor ``min(1, radius / distance)`` of CLIP; 0 for a non-finite distance (NaN/Inf peer)."""
    if not math.isfinite(distance):
        return 0.0
    if distance <= radius:
        return 1.0
    return radius / distance


def _clip(
    own: State,
    received: Mapping[K, State],
    weights: Mapping[K, float],
    distances: Mapping[K, float],
    radius: float,
) -> dict[str, Array]:
    """``x_i + sum_j W_ij * CLIP(x_j - x_i, radius)`` given precomputed ``||x_j - x_i||``."""
    coefficients = {peer: weights[peer] * _clip_scale(distances[peer], radius) for peer in received}
    out: dict[str, Array] = {}
    for name, mine in own.items():
        base = np.asarray(mine, dtype=np.float64)
        acc = base.copy()
        for peer, state in received.items():
            if coefficients[peer] > 0.0:
                pull = np.subtract(state[name], base, dtype=np.float64)  # x_j - x_i
                pull *= coefficients[peer]
                acc += pull
        out[name] = acc.astype(mine.dtype, copy=False)
    return out


def self_centered_clip(
    own: State, received: Mapping[K, State], weights: Mapping[K, float], *, radius: float
) -> dict[str, Array]:
    """ClippedGossip (He, Karimireddy & Jaggi, 2022): ``x_i + sum_j W_ij CLIP(x_j - x_i, radius)``.

    ``CLIP(z, t) = z * min(1, t / ||z||_2)`` with the norm over the WHOLE state
    (all tensors flattened together), so a neighbour's pull on x_i is at most
    ``W_ij * radius`` in norm whatever it sends. The implicit self weight
    ``W_ii = 1 - sum_j W_ij`` (and the weight of a neighbour that missed the
    deadline) stays with x_i, like ``mix``. Equivalently the result is the convex
    combination ``(1 - sum_j W_ij s_j) x_i + sum_j W_ij s_j x_j``, s_j in [0, 1].
    ``radius=0`` keeps the own state; ``radius=inf`` is ``mix``. A neighbour
    whose state holds Inf or NaN contributes nothing.
    """
    if not radius >= 0.0:  # also refuses NaN
        raise LocalProtocolError(f"clipping radius must be >= 0, got {radius}")
    _self_weight(received, weights)
    return _clip(own, received, weights, _distances(own, received), radius)


def _radius(distances: Mapping[K, float], weights: Mapping[K, float], byzantine_weight: float) -> float:
    """The (1 - delta) weighted quantile of the neighbour distances; see ``clipping_radius``."""
    if not (0.0 <= byzantine_weight < 1.0):
        raise LocalProtocolError(f"byzantine_weight must be in [0, 1), got {byzantine_weight}")
    if not distances:
        return 0.0
    peers = list(distances)
    dist = np.array([distances[peer] for peer in peers])  # (k,)
    weight = np.array([weights[peer] for peer in peers])  # (k,)
    candidates = np.concatenate(([0.0], dist))  # (k + 1,): own state at distance 0, then each neighbour
    # tail[c] = total weight of the neighbours strictly farther than candidate c, i.e. clipped by tau = c.
    tail = (weight[None, :] * (dist[None, :] > candidates[:, None])).sum(axis=1)
    return float(candidates[tail <= byzantine_weight + _WEIGHT_SLACK].min())


def clipping_radius(
    own: State, received: Mapping[K, State], weights: Mapping[K, float], *, byzantine_weight: float
) -> float:
    """Adaptive ClippedGossip radius: clip only the farthest neighbours holding ``byzantine_weight`` of W_i.

    With d_j = ||x_j - x_i|| (whole state) and delta = ``byzantine_weight``
    (absolute weight in row i of W, the paper's delta_i), returns the smallest
    tau in {0} ∪ {d_j} with ``sum_{j: d_j > tau} W_ij <= delta``: walk the
    neighbours from the farthest down, accumulating W_ij; the first one whose
    weight makes the sum exceed delta is not clipped and its distance is tau
    (tau = 0 when all neighbours together hold <= delta: all are suspect).
    This is the weighted (1 - delta) quantile of the distances over row i of W
    (the node itself sits at distance 0). So the clipped set is the largest
    far-end set of weight <= delta: if the Byzantine neighbours hold at most
    delta and are the farthest, each is clipped to a radius no larger than
    some honest neighbour's distance. No neighbours -> 0.0.
    """
    _self_weight(received, weights)
    return _radius(_distances(own, received), weights, byzantine_weight)


def robust_mix(
    rule: MixRule,
    own: State,
    received: Mapping[K, State],
    weights: Mapping[K, float],
    *,
    trim: int = 1,
    byzantine_weight: float = 0.25,
) -> dict[str, Array]:
    """Mix with the rule named by ``gossip.rule``: one of ``MIX_RULES``.

    ``"mean"`` is ``mix`` (weights used as given); ``"trimmed-mean"`` and
    ``"median"`` are ``trimmed_mean`` / ``coordinate_median``: uniform over
    {own} ∪ received, and ``mix`` with these weights when there are too few
    inputs to trim (n <= 2*trim, resp. n <= 2); ``"clip"`` is
    ``self_centered_clip`` with ``clipping_radius(byzantine_weight=...)``
    (distances computed once).
    """
    if rule == "mean":
        return mix(own, received, weights)
    if rule == "trimmed-mean":
        return trimmed_mean(own, received, weights, trim=trim)
    if rule == "median":
        return coordinate_median(own, received, weights)
    if rule == "clip":
        _self_weight(received, weights)
        distances = _distances(own, received)
        return _clip(own, received, weights, distances, _radius(distances, weights, byzantine_weight))
    raise LocalProtocolError(f"unknown mixing rule {rule!r}; expected one of {', '.join(MIX_RULES)}")
