"""What a node does with a round's mix: the gossip learning algorithms (``gossip.algorithm``).

Every round a node starts from its state ``x0``, trains K local steps to
``x_local``, publishes ``x_local`` and receives the mix ``m`` of its own and
its neighbours' updates (p2pfm/core/consensus.py). The algorithm turns these
into the state the next round starts from:

- ``dpsgd``: the mix itself (decentralised parallel SGD with local steps:
  ``x_next = m``).
- ``diloco``: an outer optimizer on the pseudo-gradient ``g = x0 - m`` (the
  round's move, as the neighbourhood made it), Nesterov momentum as in
  DiLoCo: ``v = mu * v + g``, ``x_next = x0 - eta * (g + mu * v)``. With
  ``eta = 1`` and ``mu = 0`` it is ``dpsgd``.
- ``scaffold``: a drift correction kept locally and learned from the mix.
  Under label skew each node's local steps head for its own optimum; the
  mix reveals by how much: ``m - x_local`` is what the neighbourhood would
  have moved minus what this node moved. The node accumulates
  ``c += beta * (m - x_local) / K`` and adds ``c`` to its parameters after
  every local step of the next rounds, so its local trajectory follows the
  neighbourhood's direction (SCAFFOLD's ``c - c_i``, in update space, with no
  extra bytes: nothing but the adapter travels). With mean mixing and a
  doubly stochastic weight matrix the corrections sum to zero over the
  network, so they steer each node without moving the network's average.
- ``fedadam``: Adam on the pseudo-gradient ``g = x0 - m`` (beta1 =
  ``outer_momentum``, beta2 = 0.99, bias-corrected, step ``outer_lr``):
  FedOpt's server Adam, run by every node on its own mix. Meant for plain
  SGD local steps (``train.optimizer = "sgd"``): averaging SGD steps
  averages gradients, while averaging per-node Adam steps under label skew
  is a per-coordinate vote (docs/training.md has the measurements).

In a round without local steps (``gossip.consensus_rounds``) every
algorithm only mixes. The outer moments and the correction are local state
(checkpointed beside the adapter, never sent). A neighbour's update is
bounded and robustly mixed (docs/robust.md) before it reaches any of this;
``scaffold``'s correction accumulates what the rule lets through, round
after round (docs/training.md). Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

import numpy as np

from p2pfm.config.schema import AlgorithmName
from p2pfm.config.settings import GossipSettings
from p2pfm.core.errors import LocalProtocolError

Array = np.ndarray[Any, Any]
State = Mapping[str, Array]
ALGORITHMS: tuple[AlgorithmName, ...] = get_args(AlgorithmName)


class RoundAlgorithm:
    """One node's algorithm state across rounds (module docstring)."""

    def __init__(self, settings: GossipSettings) -> None:
        self.settings = settings
        self._start: dict[str, Array] = {}  # x0 of the round in progress
        self._momentum: dict[str, Array] = {}  # diloco's v
        self._correction: dict[str, Array] = {}  # scaffold's c (per local step)
        self._second: dict[str, Array] = {}  # fedadam's second moment
        self._outer_steps = 0  # fedadam's bias correction

    @property
    def needs_start(self) -> bool:
        """Whether ``begin`` must be given the round's starting state (only diloco uses it)."""
        return self.settings.algorithm in ("diloco", "fedadam")

    def begin(self, state: State) -> None:
        """The round starts from ``state`` (before its local steps)."""
        if self.needs_start:
            self._start = {name: np.array(value) for name, value in state.items()}

    @property
    def start(self) -> dict[str, Array]:
        """The starting state ``begin`` was given last (empty when the algorithm needs none)."""
        return self._start

    def shift_start(self, delta: State) -> None:
        """Move the round in progress's start by ``delta`` (an overlapped node's late mix correction).

        With ``gossip.overlap`` round r's mix arrives while round r + 1
        trains and is added to the weights as ``delta``; the round's start
        moves with it, so that its pseudo-gradient is its own move plus
        its own mix, as in a synchronous round (docs/node.md).
        """
        if self._start:
            self._start = {name: value + delta[name] for name, value in self._start.items()}

    def correction(self) -> dict[str, Array] | None:
        """What to add to the parameters after each local step (None: nothing)."""
        return self._correction or None

    def finish(
        self, local: State, mixed: State, steps: int, *, start: State | None = None
    ) -> dict[str, Array]:
        """The state the next round starts from, given the trained ``local`` and its ``mixed`` result.

        Arrays keep the state's dtype (float32 adapters; float64 in exact
        consensus experiments). ``dpsgd`` returns the mix itself. ``start``
        is the round's starting state when it is not the last ``begin``'s
        (an overlapped node finishes round r after round r + 1 began).
        """
        origin = self._start if start is None else start
        name = self.settings.algorithm
        if name == "scaffold" and steps > 0:
            scale = self.settings.drift_beta / steps
            for key, value in mixed.items():
                residual = (np.asarray(value) - np.asarray(local[key])) * scale
                previous = self._correction.get(key)
                self._correction[key] = residual if previous is None else previous + residual
        if name not in ("diloco", "fedadam") or not origin or steps == 0:
            return dict(mixed)  # a consensus round (no local steps) only mixes
        if name == "fedadam":
            return self._adam_step(origin, mixed)
        eta, mu = self.settings.outer_lr, self.settings.outer_momentum
        out: dict[str, Array] = {}
        for key, value in mixed.items():
            x0 = origin[key]
            gradient = x0 - np.asarray(value)  # the pseudo-gradient
            velocity = self._momentum.get(key)
            velocity = gradient if velocity is None else mu * velocity + gradient
            self._momentum[key] = velocity
            out[key] = x0 - eta * (gradient + mu * velocity)
        return out

    def _adam_step(self, origin: State, mixed: State) -> dict[str, Array]:
        """fedadam: Adam (beta1 = outer_momentum, beta2 = 0.99) on the pseudo-gradient ``x0 - m``."""
        beta1, beta2, eps = self.settings.outer_momentum, 0.99, 1e-8
        self._outer_steps += 1
        t = self._outer_steps
        out: dict[str, Array] = {}
        for key, value in mixed.items():
            start = origin[key]
            gradient = start - np.asarray(value)
            first = self._momentum.get(key)
            second = self._second.get(key)
            first = (1 - beta1) * gradient if first is None else beta1 * first + (1 - beta1) * gradient
            squared = gradient * gradient
            second = (1 - beta2) * squared if second is None else beta2 * second + (1 - beta2) * squared
            self._momentum[key], self._second[key] = first, second
            step = (first / (1 - beta1**t)) / (np.sqrt(second / (1 - beta2**t)) + eps)
            out[key] = (start - self.settings.outer_lr * step).astype(start.dtype, copy=False)
        return out

    def state_dict(self) -> dict[str, Array]:
        """The local state to checkpoint, flat: ``momentum/<tensor>``, ``correction/<tensor>``,
        ``second/<tensor>`` and ``outer_steps/count`` (a 1-element int64 array)."""
        out = {f"momentum/{key}": value.copy() for key, value in self._momentum.items()}
        out |= {f"correction/{key}": value.copy() for key, value in self._correction.items()}
        out |= {f"second/{key}": value.copy() for key, value in self._second.items()}
        if self._outer_steps:
            out["outer_steps/count"] = np.array([self._outer_steps], np.int64)
        return out

    def load_state_dict(self, state: Mapping[str, Array]) -> None:
        """Restore ``state_dict()`` output (an empty mapping: a fresh start)."""
        tables: dict[str, dict[str, Array]] = {"momentum": {}, "correction": {}, "second": {}}
        outer_steps = 0
        for key, value in state.items():
            kind, _, name = key.partition("/")
            if key == "outer_steps/count":
                outer_steps = int(np.asarray(value).reshape(-1)[0])
            elif kind in tables and name:
                tables[kind][name] = np.array(value)
            else:
                raise LocalProtocolError(f"unexpected algorithm state entry {key!r}")
        self._momentum, self._correction = tables["momentum"], tables["correction"]
        self._second, self._outer_steps = tables["second"], outer_steps
