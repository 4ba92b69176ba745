"""Misbehaving members, for attack experiments (scenario fault ``attack``).

An attacking node trains and mixes like everyone else, but what it sends is
not its honest state. Each attack is what a compromised member could really
do with its own valid key (or, for ``forge``, without a member key):

- ``scale``: its state multiplied by ``factor`` (default 10);
- ``noise``: its state plus Gaussian noise of ``factor`` (default 1) times the
  state's RMS, per tensor;
- ``signflip``: its state multiplied by ``-factor`` (default 1);
- ``replay``: its first update, re-sent unchanged every round;
- ``forge``: its honest state, signed with a key that is not in the roster;
- ``wrong-model``: its honest state, under another base model's fingerprint;
- ``equivocate``: its honest update, then a second, different one (scaled
  by ``factor``, default 10) for the same round, a moment later;
- ``far-future``: its honest state under a round number far ahead of
  everyone's (2^62, or the current round plus ``factor`` when given), to make
  the others skip their training.

The receivers' gates and robust mixing rules are what the experiments test;
see docs/security.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import blake3
import numpy as np

from p2pfm.config.schema import AttackKind
from p2pfm.core import wire
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import GossipProtocol

ATTACKS: tuple[str, ...] = get_args(AttackKind)  # defined once, in AttackKind
DEFAULT_FACTOR = {"scale": 10.0, "noise": 1.0, "signflip": 1.0, "equivocate": 10.0}  # others: 1.0

Array = np.ndarray[Any, Any]


class Attacker:
    """Builds the messages a misbehaving node sends instead of its honest update (a ``Publisher``)."""

    gap_s = 0.3  # equivocate: the receivers get time to read the first version before the second

    def __init__(
        self, kind: str, factor: float | None, seed: int, wire_dtypes: Mapping[str, str] | None = None
    ) -> None:
        """``wire_dtypes``: what its updates travel as (the network's: its attacks reach the mixing
        rule instead of being refused as another schema)."""
        if kind not in ATTACKS:
            raise ValueError(f"unknown attack {kind!r}; valid: {', '.join(ATTACKS)}")
        self.kind = kind
        self.factor = DEFAULT_FACTOR.get(kind, 1.0) if factor is None else factor
        self._given = factor  # far-future: None claims 2^62, a given factor that many rounds ahead
        self._rng = np.random.default_rng(seed)
        self._first: bytes | None = None
        self.wire_dtypes = dict(wire_dtypes or {})
        # A key no roster lists: derived, so runs are reproducible.
        self._outsider = Identity(blake3.blake3(f"p2pfm-forger/{seed}".encode()).digest())

    def messages(
        self, protocol: GossipProtocol, state: Mapping[str, Array], *, samples: int, wall_time_ms: int
    ) -> list[bytes]:
        """The messages to send this round, in order."""
        if self.kind == "replay":
            if self._first is None:  # the first update is genuine; later ones repeat it
                self._first = self._update(protocol, state, samples, wall_time_ms)
            return [self._first]
        if self.kind == "equivocate":
            scaled = {name: (value * self.factor).astype(value.dtype) for name, value in state.items()}
            return [
                self._update(protocol, state, samples, wall_time_ms),
                self._update(protocol, scaled, samples, wall_time_ms),
            ]
        if self.kind in ("forge", "wrong-model", "far-future"):
            config = protocol.config
            fingerprint = config.fingerprint
            if self.kind == "wrong-model":
                fingerprint = blake3.blake3(b"another base model" + fingerprint).digest()
            claimed = protocol.round
            if self.kind == "far-future":
                claimed = 2**62 if self._given is None else protocol.round + int(self._given)
            body = wire.encode_update(
                network=config.network,
                round=claimed,
                seq=protocol.take_seq(),
                ts_ms=wall_time_ms,
                fingerprint=fingerprint,
                degree=len(protocol.neighbours),
                samples=samples,
                tensors=state,
                wire_dtypes=self.wire_dtypes,
                limits=config.limits,
            )
            signer = self._outsider if self.kind == "forge" else protocol.identity
            return [wire.sign(body, signer)]
        return [self._update(protocol, self._poison(state), samples, wall_time_ms)]

    def _update(
        self, protocol: GossipProtocol, state: Mapping[str, Array], samples: int, wall_time_ms: int
    ) -> bytes:
        return protocol.make_update(
            state, samples=samples, wall_time_ms=wall_time_ms, wire_dtypes=self.wire_dtypes
        )

    def _poison(self, state: Mapping[str, Array]) -> dict[str, Array]:
        out: dict[str, Array] = {}
        for name, value in state.items():
            if self.kind == "scale":
                out[name] = (value * self.factor).astype(value.dtype)
            elif self.kind == "signflip":
                out[name] = (value * -self.factor).astype(value.dtype)
            else:  # noise
                rms = float(np.sqrt(np.mean(np.square(value, dtype=np.float64)))) if value.size else 0.0
                noise = self._rng.normal(0.0, self.factor * (rms or 1.0), value.shape)
                out[name] = (value + noise).astype(value.dtype)
        return out
