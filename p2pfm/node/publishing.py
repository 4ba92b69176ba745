"""What a node sends each round: a publishing strategy.

An honest node sends one update of its state. The attacks of
p2pfm/node/attacks.py are other strategies with the same interface, so the
node loop never branches on whether it attacks: the factory picks the
strategy from ``faults.attack``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from p2pfm.core.compression import NeighbourEstimates, OwnEstimate
from p2pfm.core.protocol import GossipProtocol

Array = np.ndarray[Any, Any]


class Publisher(Protocol):
    gap_s: float  # pause between two messages of one round (they are sent in order)

    def messages(
        self, protocol: GossipProtocol, state: Mapping[str, Array], *, samples: int, wall_time_ms: int
    ) -> list[bytes]:
        """The signed messages to send this round, in order (the protocol's round is already started)."""
        ...


class Honest:
    """One update of the node's own state, in the configured wire dtypes.

    With compression (``own``: the node's public estimate) the update is the
    compressed change of that estimate, or a keyframe (p2pfm/core/compression.py),
    and names the neighbours whose chains ``neighbours`` lost (``resync``).
    """

    gap_s = 0.0

    def __init__(
        self,
        wire_dtypes: Mapping[str, str] | None = None,
        own: OwnEstimate | None = None,
        neighbours: NeighbourEstimates | None = None,
    ) -> None:
        self.wire_dtypes = dict(wire_dtypes or {})
        self.own = own
        self.neighbours = neighbours

    def messages(
        self, protocol: GossipProtocol, state: Mapping[str, Array], *, samples: int, wall_time_ms: int
    ) -> list[bytes]:
        if self.own is None:
            return [
                protocol.make_update(
                    state, samples=samples, wall_time_ms=wall_time_ms, wire_dtypes=self.wire_dtypes
                )
            ]
        audience = protocol.neighbours if protocol.partners is None else frozenset(protocol.partners)
        out = self.own.outgoing(state, protocol.round, audience)
        most = protocol.config.limits.max_resync_peers
        lost = () if self.neighbours is None else self.neighbours.lost(most)
        message = protocol.make_update(
            out.tensors,
            samples=samples,
            wall_time_ms=wall_time_ms,
            wire_dtypes=out.wire_dtypes,
            base=out.base,
            resync=lost,
        )
        return [message]
