"""A base for your own numpy learner: the ``Learner`` plumbing around a dict of arrays.

A node (p2pfm/node/loop.py) gossips whatever its learner's ``get_state``
returns. :class:`ArrayLearner` keeps that state as named float arrays and
implements everything but the learning: the schema and fingerprint
neighbours must share, state get/set with shape and finiteness checks, the
resumable RNG state, and saving. A subclass writes ``train_steps`` (and
``evaluate`` when it has something to report) and can run in the simulator
(``p2pfm.simulate(..., learner=...)``, docs/testing.md) or in a node.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors.numpy

from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.fingerprint import fingerprint, schema_document
from p2pfm.core.private_files import make_private_dir, write_private_file
from p2pfm.core.wire import TensorSpec
from p2pfm.learn.learner import Array

_DTYPES = ("float32", "float64")


class ArrayLearner:
    """A ``Learner`` whose state is ``self.state``: named float32 (or float64) arrays.

    ``kind`` names the model in the fingerprint: learners of one network
    must share it and the state's names, dtypes and shapes, or neighbours
    refuse each other's updates (``fingerprint_mismatch``). ``self.rng`` is
    a numpy generator seeded with ``seed``, saved and restored with the
    checkpoint (a crashed node resumes its randomness exactly).
    """

    def __init__(self, state: Mapping[str, npt.ArrayLike], *, kind: str = "array", seed: int = 0) -> None:
        if not state:
            raise LocalProtocolError("an ArrayLearner needs at least one named array")
        self.state: dict[str, Array] = {}
        for name in sorted(state):
            array = np.array(state[name])
            if array.dtype.name not in _DTYPES:
                array = array.astype(np.float32)
            if not np.isfinite(array).all():
                raise LocalProtocolError(f"the initial {name!r} has a NaN or infinity")
            self.state[name] = array
        self.kind = kind
        self.rng = np.random.default_rng(seed)
        self.schema: tuple[TensorSpec, ...] = tuple(
            TensorSpec(name, array.dtype.name, tuple(array.shape)) for name, array in self.state.items()
        )
        self.fingerprint = fingerprint({kind: schema_document(list(self.schema))})

    def describe(self) -> dict[str, Any]:
        return {"learner": self.kind, "parameters": int(sum(a.size for a in self.state.values()))}

    def train_steps(self, steps: int, correction: Mapping[str, Array] | None = None) -> float | None:
        """Run ``steps`` local steps on ``self.state``; their mean loss (None for 0 steps).

        ``correction`` (when given) is added to the state after every step
        (the learning algorithms of p2pfm/learn/algorithm.py need it).
        """
        raise NotImplementedError(f"{type(self).__name__} must define train_steps")

    def evaluate(self) -> dict[str, float]:
        """Metrics after the last round (and every ``eval_every``): none unless a subclass says."""
        return {}

    def get_state(self) -> dict[str, Array]:
        return {name: array.copy() for name, array in self.state.items()}

    def set_state(self, state: Mapping[str, Array]) -> None:
        if set(state) != set(self.state):
            raise LocalProtocolError(f"state names {sorted(state)} differ from {sorted(self.state)}")
        arrays = {name: np.asarray(state[name], self.state[name].dtype) for name in self.state}
        for name, array in arrays.items():
            if array.shape != self.state[name].shape or not np.isfinite(array).all():
                raise LocalProtocolError(f"state {name!r} must be finite, of shape {self.state[name].shape}")
        self.state = {name: array.copy() for name, array in arrays.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"numpy_rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["numpy_rng"]

    def save(self, folder: Path) -> None:
        make_private_dir(folder)
        write_private_file(folder / "state.safetensors", safetensors.numpy.save(self.get_state()))
