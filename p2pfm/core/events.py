"""What the gossip protocol is configured with, and the events it returns (p2pfm/core/protocol.py).

``ProtocolConfig`` holds a node's checks and timings; ``receive`` answers
with ``Accepted``, ``Rejected`` or ``EquivocationFound``; ``poll`` ends a
round with ``RoundComplete``, which carries what mixing needs and combines
it (``RoundComplete.mix``) under a ``MixSettings`` rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from p2pfm.core import wire
from p2pfm.core.consensus import MIX_RULES, MixRule, robust_mix
from p2pfm.core.errors import LocalProtocolError, RejectReason
from p2pfm.core.identity import PeerId
from p2pfm.core.wire import TensorSpec, Update, WireLimits


@dataclass(frozen=True)
class ProtocolConfig:
    """Everything a node must agree on with its neighbours, plus local bounds."""

    network: str
    fingerprint: bytes
    round_timeout_s: float
    limits: WireLimits = field(default_factory=WireLimits)
    # Expected tensors (names, wire dtypes, shapes); None accepts any schema
    # whose fingerprint matches. A name listed more than once accepts each
    # listed dtype (a compressing node's keyframes and differences).
    schema: tuple[TensorSpec, ...] | None = None
    # Timestamps further than this from the receiver's wall clock are refused
    # (None: not checked). Honest nodes need clocks within this of each other.
    max_clock_skew_s: float | None = 300.0
    # Token bucket per link (the authenticated connection a message came
    # on): a steady rate and a burst, in messages. An honest node sends one
    # update per round.
    max_messages_per_s: float = 10.0
    message_burst: int = 20
    # Updates for rounds further ahead of ours than this are refused
    # (``future_round``); their round still counts as the sender's claim.
    max_rounds_ahead: int = 3
    # Keys an equivocation proof may accuse (the roster's members); None:
    # only our neighbours. A proof about anyone else is refused, so that a
    # neighbour cannot grow our ban list with keys it made up.
    members: frozenset[PeerId] | None = None
    # Wait for neighbours as long as they have been taking (core/deadline.py),
    # never longer than round_timeout_s; False: always round_timeout_s.
    adaptive_deadline: bool = True
    deadline_margin_s: float = 1.0  # an adaptive wait is at least the slowest expected delay plus this
    # Open networks: an adaptive wait is also at least the swing of this node's own round durations
    # (core/deadline.py RoundPace). Off for fixed neighbours, where it cost consensus in tests/test_e2e.py.
    pace_floor: bool = False

    def __post_init__(self) -> None:
        if not self.deadline_margin_s >= 0:
            raise LocalProtocolError(f"deadline_margin_s must be >= 0, got {self.deadline_margin_s}")
        if self.max_messages_per_s <= 0 or self.message_burst < 1:
            raise LocalProtocolError("max_messages_per_s must be > 0 and message_burst >= 1")
        if not self.round_timeout_s > 0:
            raise LocalProtocolError(f"round_timeout_s must be > 0, got {self.round_timeout_s}")
        if len(self.fingerprint) != wire.FINGERPRINT_BYTES:
            raise LocalProtocolError(f"fingerprint must be {wire.FINGERPRINT_BYTES} bytes")
        if type(self.max_rounds_ahead) is not int or self.max_rounds_ahead < 1:
            raise LocalProtocolError(f"max_rounds_ahead must be an int >= 1, got {self.max_rounds_ahead!r}")


@dataclass(frozen=True)
class Accepted:
    sender: PeerId
    round: int
    seq: int
    wire_bytes: int
    # The accepted update itself (a compressing receiver advances its estimate of the sender with it).
    update: Update | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Rejected:
    sender: PeerId | None  # the link's peer when known, else the signer; None when unparseable
    reason: RejectReason
    detail: str


@dataclass(frozen=True)
class EquivocationFound:
    """A sender signed two different updates for one round: it is banned.

    ``evidence`` is the two signed heads (wire.check_evidence verifies them);
    ``reporter`` is the neighbour that relayed the proof, None when we saw
    both heads ourselves; ``new`` is False when the sender was banned already.
    """

    accused: PeerId
    round: int
    evidence: tuple[bytes, bytes]
    reporter: PeerId | None
    new: bool


@dataclass(frozen=True)
class MixSettings:
    """How a node combines a round: ``gossip.rule`` and its parameters (docs/robust.md)."""

    rule: MixRule = "mean"
    trim: int = 1  # trimmed-mean: values dropped at each end per coordinate
    byzantine_weight: float = 0.25  # clip: weight share whose farthest holders get clipped

    def __post_init__(self) -> None:
        if self.rule not in MIX_RULES:
            raise LocalProtocolError(
                f"unknown mixing rule {self.rule!r}; expected one of {', '.join(MIX_RULES)}"
            )


@dataclass(frozen=True)
class RoundComplete:
    """A finished round: what arrived in time, and this node's row of the mixing matrix."""

    round: int
    updates: Mapping[PeerId, Update]  # newest update of each neighbour that is at round >= round
    missing: frozenset[PeerId]  # neighbours not heard in time: their weight stays with us
    timed_out: bool
    # Metropolis weight W_ij of each neighbour in ``updates``, from the degrees
    # the messages carry; W_ii = 1 - sum is the node's own (missing ones' included).
    weights: Mapping[PeerId, float]

    def mix(
        self, own: Mapping[str, np.ndarray[Any, Any]], settings: MixSettings
    ) -> dict[str, np.ndarray[Any, Any]]:
        """The node's next state: its own combined with what arrived, under ``settings.rule``.

        The one place a round is combined: the networked node, the simulator and
        the tests all call this.
        """
        received = {peer: update.tensors for peer, update in self.updates.items()}
        return robust_mix(
            settings.rule,
            own,
            received,
            self.weights,
            trim=settings.trim,
            byzantine_weight=settings.byzantine_weight,
        )


ReceiveEvent = Union[Accepted, Rejected, EquivocationFound]
