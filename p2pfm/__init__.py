"""p2pfm: serverless peer-to-peer co-training of foundation models.

Each node fine-tunes LoRA adapters locally and gossips signed, msgpack-encoded
updates to its neighbours, which mix them towards the network-wide average.
See docs/architecture.md for the layers and docs/protocol.md for the wire.

``p2pfm.simulate(...)`` runs real node loops on a topology in-process
(docs/testing.md). Its names load on first use, so ``import p2pfm``
stays light: ``p2pfm keygen`` imports it and must not load torch. Their
types are in ``__init__.pyi``; this module imports none of them
statically, so that modules which read ``p2pfm.__version__`` do not
depend on the simulator (import-linter's layers, tests/test_layers.py).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first used
_LAZY = {
    "simulate": "p2pfm.simulation",
    "SimulationResult": "p2pfm.simulation",
    "RoundResult": "p2pfm.simulation",
    "NodeReport": "p2pfm.simulation",
    "Attack": "p2pfm.simulation",
    "Crash": "p2pfm.simulation",
    "Slow": "p2pfm.simulation",
    "Drop": "p2pfm.simulation",
    "Learner": "p2pfm.learn.learner",
    "ArrayLearner": "p2pfm.learn.array_learner",
}

__all__ = [
    "ArrayLearner",
    "Attack",
    "Crash",
    "Drop",
    "Learner",
    "NodeReport",
    "RoundResult",
    "SimulationResult",
    "Slow",
    "__version__",
    "simulate",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pfm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup finds it directly
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
