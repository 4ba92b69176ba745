"""What a node trains: the ``Learner`` interface, and a model-free one for simulations.

The node loop (p2pfm/node/loop.py) trains, exchanges and mixes whatever a Learner
holds: a dict of named float arrays (the adapter), trained a few local steps
at a time, evaluated, checkpointed. Two implementations:

- ``p2pfm.learn.adapter_learner.AdapterLearner``: LoRA adapters on a transformers
  model, trained on the node's data shard (torch lives there);
- :class:`QuadraticLearner` here: a numpy objective, so that topologies,
  rules, faults and attacks can be simulated with the real node loop and no
  model. Node i minimises ``f_i(x) = ||x - c_i||^2 / 2`` with its own centre
  ``c_i``; the network's optimum is the mean of the centres, so how far each
  node ends from it measures what gossip achieved.

Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import safetensors.numpy

from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.fingerprint import fingerprint, schema_document
from p2pfm.core.private_files import make_private_dir, write_private_file
from p2pfm.core.wire import TensorSpec

Array = np.ndarray[Any, Any]
_DTYPES = {"float32": np.float32, "float64": np.float64}  # float64: exact consensus experiments


class Learner(Protocol):
    """A node's trainable state (float32 tensors) and how to train and evaluate it."""

    schema: tuple[TensorSpec, ...]  # the tensors' names, float32 dtype and shapes
    fingerprint: bytes  # what neighbours must share to average (docs/protocol.md section 7)

    def describe(self) -> dict[str, Any]:
        """Facts for the node's ``start`` event (shard and test sizes, device, ...)."""
        ...

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        """Run ``steps`` local steps; the mean training loss (None for 0 steps).

        ``correction`` (state names -> arrays of their shapes), when given, is
        added to the state after every step (p2pfm/learn/algorithm.py).
        """
        ...

    def evaluate(self) -> dict[str, float]: ...

    def get_state(self) -> dict[str, Array]: ...

    def set_state(self, state: Mapping[str, Array]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything but the state needed to resume exactly (optimizer, RNGs)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save(self, folder: Path) -> None:
        """Write the final state where users expect it (e.g. the PEFT adapter layout)."""
        ...


class LearnerWrapper:
    """A learner around another: everything is the inner learner's unless a subclass overrides it.

    Fault and timing wrappers (``SlowLearner``, the simulator's
    ``TimedLearner``) change how training takes time, never what the learner
    is: its schema, fingerprint, state and checkpoints, and the optional
    extras the node reads when present (``snapshot``, ``shared_start``),
    all pass through, so a wrapped node agrees with its neighbours exactly
    as the bare one would.
    """

    def __init__(self, inner: Learner) -> None:
        self.inner = inner
        self.schema: tuple[TensorSpec, ...] = inner.schema
        self.fingerprint: bytes = inner.fingerprint

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        return self.inner.train_steps(steps, correction)

    def evaluate(self) -> dict[str, float]:
        return self.inner.evaluate()

    def get_state(self) -> dict[str, Array]:
        return self.inner.get_state()

    def set_state(self, state: Mapping[str, Array]) -> None:
        self.inner.set_state(state)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def save(self, folder: Path) -> None:
        self.inner.save(folder)


class QuadraticLearner:
    """Gradient descent on ``||x - centre||^2 / 2`` plus Gaussian gradient noise (module docstring).

    float32 like an adapter by default; ``dtype="float64"`` for consensus
    experiments that must see decay far below float32's rounding.
    """

    def __init__(
        self,
        centre: Array,
        optimum: Array,
        *,
        lr: float = 0.1,
        noise: float = 0.0,
        start: Array | None = None,
        seed: int = 0,
        dtype: str = "float32",
    ) -> None:
        if centre.shape != optimum.shape or centre.ndim != 1:
            raise LocalProtocolError("centre and optimum must be vectors of one length")
        if not 0.0 < lr <= 1.0 or not noise >= 0.0:
            raise LocalProtocolError(f"lr must be in (0, 1] and noise >= 0, got {lr} and {noise}")
        if dtype not in _DTYPES:
            raise LocalProtocolError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = _DTYPES[dtype]
        self.centre = np.asarray(centre, self.dtype)
        self.optimum = np.asarray(optimum, self.dtype)
        self.lr, self.noise = lr, noise
        self._rng = np.random.default_rng(seed)
        self._x = np.array(self.centre if start is None else start, dtype=self.dtype)
        self.schema: tuple[TensorSpec, ...] = (TensorSpec("x", dtype, self._x.shape),)
        self.fingerprint = fingerprint({"quadratic": schema_document(list(self.schema))})

    def describe(self) -> dict[str, Any]:
        return {"learner": "quadratic", "dim": int(self._x.size), "device": "cpu", "autocast": "fp32"}

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        losses = []
        nudge = None if not correction else np.asarray(correction["x"], self.dtype)
        if nudge is not None and nudge.shape != self._x.shape:
            raise LocalProtocolError("the correction must be a vector of the learner's length")
        for _ in range(steps):
            gradient = self._x - self.centre
            losses.append(0.5 * float(np.dot(gradient, gradient)))
            if self.noise:
                gradient = gradient + self._rng.normal(0.0, self.noise, gradient.shape).astype(self.dtype)
            self._x -= self.lr * gradient
            if nudge is not None:
                self._x += nudge
        return float(np.mean(losses)) if losses else None

    def evaluate(self) -> dict[str, float]:
        """``distance``: ||x - optimum|| relative to ||optimum|| (0 = the pooled solution)."""
        scale = float(np.linalg.norm(self.optimum)) or 1.0
        return {"distance": float(np.linalg.norm(self._x - self.optimum)) / scale}

    def get_state(self) -> dict[str, Array]:
        return {"x": self._x.copy()}

    def set_state(self, state: Mapping[str, Array]) -> None:
        x = np.asarray(state["x"], self.dtype)
        if x.shape != self._x.shape or not np.isfinite(x).all():
            raise LocalProtocolError("state must be a finite vector of the learner's length")
        self._x = x.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"numpy_rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.bit_generator.state = state["numpy_rng"]

    def save(self, folder: Path) -> None:
        make_private_dir(folder)
        write_private_file(folder / "state.safetensors", safetensors.numpy.save(self.get_state()))


def quadratic_problem(
    nodes: int, dim: int, *, seed: int = 0, spread: float = 1.0
) -> tuple[list[Array], Array]:
    """Per-node centres (heterogeneous: each node's data points elsewhere) and their mean, the optimum."""
    if nodes < 1 or dim < 1 or not math.isfinite(spread):
        raise LocalProtocolError("need nodes >= 1, dim >= 1 and a finite spread")
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal(dim)
    centres = [(shared + spread * rng.standard_normal(dim)).astype(np.float32) for _ in range(nodes)]
    return centres, np.mean(centres, axis=0).astype(np.float32)
