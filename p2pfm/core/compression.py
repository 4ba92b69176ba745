"""Compressed gossip with error feedback (``gossip.compression``): CHOCO-gossip's public estimates.

Every node i keeps a public estimate ``x̂_i`` of its own state: what all its
neighbours hold of it. Each round it sends only the compressed difference
``q = C(x_i - x̂_i)`` and everybody, itself included, adds what ``q``
decodes to: ``x̂_i += D(q)``. What the compressor drops this round stays in
``x_i - x̂_i`` and travels in a later round (error feedback), so the
estimates follow the states however coarse ``C`` is. A node mixes the
estimates, not the states (Koloskova et al. 2019)::

    x_i <- x_i + gamma * (rule(x̂_i, {x̂_j}) - x̂_i)

with ``gamma`` = ``gossip.compression_step`` and ``rule`` = ``gossip.rule``
(the robust rules see full estimates, never differences). Without
compression ``x̂ = x`` and, with ``gamma = 1``, this is the plain mix.

A difference only means something on top of the estimate it was taken
against, so messages form a chain: an update that carries ``base`` (the
round of the sender's previous message) is a difference; one without it is
a *keyframe*, a full state that (re)starts the chain. A receiver that
missed a link of a chain (a lost message, a restart) holds no estimate of
that sender until its next keyframe, and mixes as if it had not been heard;
its own next updates name that sender in ``resync``, asking for one.
A sender sends a keyframe first, every ``gossip.keyframe_every`` rounds,
whenever it has a neighbour that its last keyframe did not reach, and when
a neighbour asks for one in an update of a round after its last keyframe
(so at most every other round, whoever asks). When
every node starts from the same adapter (the same model, LoRA settings and
``gossip.seed``, which the fingerprint then binds), the chains start from it
instead: ``base = 0`` names that shared start, and the first keyframe is
saved.

Encodings (p2pfm/core/codec.py, docs/protocol.md section 5):

========== ==================== ====================
name       difference           keyframe
========== ==================== ====================
none       (full states, as without compression)
bf16       bfloat16             bfloat16
q8         q8                   q8
topk8_dN   topk8_dN             q8
sign1      sign1                q8
========== ==================== ====================

Nothing here does I/O: the node (p2pfm/node/loop.py) calls it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import numpy as np

from p2pfm.core import codec
from p2pfm.core.consensus import MixRule, robust_mix
from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import PeerId
from p2pfm.core.wire import bfloat16_bits_to_float32, float32_to_bfloat16_bits

Array = np.ndarray[Any, Any]
State = Mapping[str, Array]
#: gossip.compression: what a round's difference travels as (the table above).
CompressionName = Literal[
    "none", "bf16", "q8", "topk8_d4", "topk8_d8", "topk8_d16", "topk8_d32", "topk8_d64", "sign1"
]
COMPRESSIONS: Final[tuple[CompressionName, ...]] = get_args(CompressionName)


def delta_encoding(compression: CompressionName) -> str:
    """The wire dtype a difference travels as."""
    if compression == "none":
        raise LocalProtocolError("compression 'none' sends full states, never differences")
    return "bfloat16" if compression == "bf16" else compression


def keyframe_encoding(compression: CompressionName) -> str:
    """The wire dtype a keyframe (a full state) travels as."""
    return {"none": "float32", "bf16": "bfloat16"}.get(compression, codec.Q8)


def received(encoding: str, array: Array | codec.Encoded) -> Array:
    """What a receiver decodes from ``array`` sent as ``encoding``, bit for bit (float32)."""
    if isinstance(array, codec.Encoded):
        return array.decoded()
    values: Array = np.ascontiguousarray(array, dtype=np.float32)
    if encoding == "float32":
        copied: Array = values.copy()
        return copied
    if encoding == "bfloat16":
        widened: Array = bfloat16_bits_to_float32(float32_to_bfloat16_bits(values))
        return widened
    return codec.roundtrip(encoding, values)


@dataclass(frozen=True)
class Outgoing:
    """One round's message content: what to encode, as what, and on what it builds."""

    tensors: dict[str, Array | codec.Encoded]  # a full state (keyframe) or a difference; lossy: encoded
    wire_dtypes: dict[str, str]
    base: int | None  # None: a keyframe; else the round of the sender's previous message


class OwnEstimate:
    """This node's public estimate ``x̂_i`` and the messages that keep its neighbours' copies equal to it."""

    def __init__(
        self,
        compression: CompressionName,
        *,
        keyframe_every: int,
        start: State | None = None,
        audience: frozenset[PeerId] = frozenset(),
    ) -> None:
        """``start``: a state every node of ``audience`` holds already (the shared initial adapter):
        the chain starts from it (round 0), so the first message is a difference, not a keyframe."""
        if compression not in COMPRESSIONS:
            raise LocalProtocolError(f"unknown compression {compression!r}; one of {', '.join(COMPRESSIONS)}")
        if keyframe_every < 1:
            raise LocalProtocolError(f"keyframe_every must be >= 1, got {keyframe_every}")
        self.compression = compression
        self.keyframe_every = keyframe_every
        self.estimate: dict[str, Array] | None = None
        self._last_round: int | None = None  # the round of the previous message of the chain
        self._keyframe_round = 0
        self._audience: frozenset[PeerId] = frozenset()  # who the last keyframe went to
        self.keyframes = 0  # keyframes sent (counted for the metrics)
        self.keyframes_requested = 0  # of those, sent because a neighbour asked (resync)
        self._requested = False
        if start is not None and compression != "none":
            self.estimate = {name: np.array(value, np.float32) for name, value in start.items()}
            self._last_round, self._audience = 0, audience

    def outgoing(self, state: State, round_: int, neighbours: frozenset[PeerId]) -> Outgoing:
        """The message of round ``round_`` for ``state``; advances the estimate as receivers will."""
        if self.compression == "none":
            self.estimate = {name: np.array(value, np.float32) for name, value in state.items()}
            return Outgoing(dict(state), {}, None)
        keyframe = (
            self.estimate is None
            or self._last_round is None
            or round_ - self._keyframe_round >= self.keyframe_every
            or not neighbours <= self._audience
            or self._requested
        )
        if keyframe:
            if self._requested:
                self.keyframes_requested += 1
                self._requested = False
            encoding = keyframe_encoding(self.compression)
            tensors = {name: _sent(encoding, value) for name, value in state.items()}
            self.estimate = {name: received(encoding, value) for name, value in tensors.items()}
            self._keyframe_round, self._audience = round_, neighbours
            self.keyframes += 1
            base = None
        else:
            assert self.estimate is not None and self._last_round is not None
            encoding = delta_encoding(self.compression)
            estimate = self.estimate
            tensors = {
                name: _sent(encoding, np.subtract(value, estimate[name], dtype=np.float32))
                for name, value in state.items()
            }
            for name, difference in tensors.items():
                self.estimate[name] = self.estimate[name] + received(encoding, difference)
            base = self._last_round
        self._last_round = round_
        return Outgoing(tensors, {name: encoding for name in tensors}, base)

    def keyframe_asked(self, in_round: int) -> bool:
        """A neighbour asks for a keyframe (``resync``) while this node is in round ``in_round``: granted?

        Granted when this node's last keyframe was sent for a round before
        ``in_round``: a request that comes in the keyframe's own round was made
        before the keyframe could have arrived, and is stale. So a neighbour
        that asks every round gets a keyframe at most every other round
        (docs/protocol.md 8.3). ``in_round`` is this node's round, never the
        asking update's, which a neighbour may claim ahead of ours.
        """
        if self.compression == "none" or self.estimate is None or self._keyframe_round >= in_round:
            return False
        self._requested = True
        return True

    def restart(self) -> None:
        """Forget the chain (after a restart nothing of it survives): the next message is a keyframe."""
        self.estimate, self._last_round, self._audience = None, None, frozenset()
        self._requested = False


def _sent(encoding: str, array: Array) -> Array | codec.Encoded:
    """What ``outgoing`` hands to the wire: a lossy encoding's bytes, encoded here once; else the array."""
    values = np.ascontiguousarray(array, np.float32)
    return codec.Encoded.of(encoding, values) if encoding in codec.ENCODINGS else values


class NeighbourEstimates:
    """``x̂_j`` of each neighbour, advanced by every accepted update of its chain, in order."""

    def __init__(self) -> None:
        self._state: dict[PeerId, dict[str, Array]] = {}
        self._round: dict[PeerId, int] = {}
        self.broken: dict[str, int] = {}  # updates that could not be applied, by reason
        self._lost: dict[PeerId, None] = {}  # neighbours whose chain broke, oldest first: ask for keyframes

    def apply(self, peer: PeerId, round_: int, base: int | None, tensors: State) -> bool:
        """Take an accepted update; False (and no estimate of ``peer``) when it cannot be applied."""
        if base is None:
            estimate = {name: np.array(value, np.float32) for name, value in tensors.items()}
            self._lost.pop(peer, None)
        elif self._round.get(peer) == base and peer in self._state:
            current = self._state[peer]
            if set(current) != set(tensors):
                return self._break(peer, "schema")
            estimate = {name: current[name] + np.asarray(tensors[name], np.float32) for name in current}
        else:
            return self._break(peer, "missed_base")
        if not all(np.isfinite(value).all() for value in estimate.values()):
            return self._break(peer, "non_finite")
        self._state[peer], self._round[peer] = estimate, round_
        return True

    def start(self, state: State, peers: frozenset[PeerId]) -> None:
        """Every peer of ``peers`` starts from ``state``: round 0 of its chain, the shared initial adapter."""
        shared = {name: np.array(value, np.float32) for name, value in state.items()}
        for peer in peers:  # one copy for all: apply() makes new arrays, never writes into these
            self._state[peer], self._round[peer] = shared, 0

    def get(self, peer: PeerId) -> dict[str, Array] | None:
        return self._state.get(peer)

    def lost(self, limit: int) -> tuple[PeerId, ...]:
        """Up to ``limit`` neighbours whose chain broke (oldest first): the next update's ``resync``."""
        return tuple(itertools.islice(self._lost, limit))

    def forget(self, peer: PeerId) -> None:
        """Drop ``peer`` altogether (no longer a neighbour)."""
        self._drop(peer)
        self._lost.pop(peer, None)

    def _drop(self, peer: PeerId) -> None:
        self._state.pop(peer, None)
        self._round.pop(peer, None)

    def keep_only(self, peers: frozenset[PeerId]) -> None:
        """Drop the estimates of peers that are no longer neighbours (memory stays bounded by the degree)."""
        for peer in [p for p in (*self._state, *self._lost) if p not in peers]:
            self.forget(peer)

    def _break(self, peer: PeerId, reason: str) -> bool:
        self._drop(peer)
        self._lost[peer] = None
        self.broken[reason] = self.broken.get(reason, 0) + 1
        return False


def choco_mix(
    rule: MixRule,
    local: State,
    own_estimate: State,
    estimates: Mapping[PeerId, State],
    weights: Mapping[PeerId, float],
    *,
    step: float,
    trim: int = 1,
    byzantine_weight: float = 0.25,
) -> dict[str, Array]:
    """``local + step * (rule(x̂_i, {x̂_j}) - x̂_i)``: the state after mixing the estimates.

    ``weights`` are the Metropolis weights of the neighbours in
    ``estimates``; a neighbour without one keeps its weight with this node.
    """
    mixed = robust_mix(
        rule, own_estimate, estimates, {p: weights[p] for p in estimates}, trim=trim,
        byzantine_weight=byzantine_weight,
    )  # fmt: skip
    return {
        name: (value + step * (mixed[name] - own_estimate[name])).astype(value.dtype, copy=False)
        for name, value in ((n, np.asarray(v)) for n, v in local.items())
    }
