"""A p2pfm node process whose local steps are time, not CPU: for benchmarks/overlap.py.

    python benchmarks/_timed_node.py --config node.toml --step-s 0.5 --dim 2097152

The node is the real one (``build_node``: ZeroMQ with CurveZMQ, signing,
the protocol, the mixing, the store), but its learner computes nothing: a
local step is a sleep of ``--step-s`` seconds, as a step on an accelerator
leaves the host's CPU free, and its state is ``--dim`` float32 values (the
adapter's size). So the time a round spends in local steps is fixed, and the
training-time fraction measures the network and the node's own work alone,
even on a machine with fewer cores than nodes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.config.node_config import load_node_config
from p2pfm.learn.learner import QuadraticLearner
from p2pfm.node.factory import build_node


class TimedLearner(QuadraticLearner):
    """Gradient steps on a quadratic (cheap), each taking ``step_s`` seconds of wall time."""

    def __init__(self, dim: int, step_s: float, seed: int) -> None:
        rng = np.random.default_rng(seed)
        super().__init__(rng.standard_normal(dim), np.zeros(dim), lr=0.1, seed=seed, start=np.zeros(dim))
        self.step_s = step_s

    def train_steps(self, steps: int, correction: Mapping[str, Any] | None = None) -> float | None:
        time.sleep(self.step_s * steps)
        return super().train_steps(steps, correction)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--step-s", type=float, required=True)
    parser.add_argument("--dim", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_node_config(args.config)
    learner = TimedLearner(args.dim, args.step_s, seed=config.shard.shard)
    node = build_node(config, learner=learner)
    result = node.run()
    return 0 if not result.stopped else 130


if __name__ == "__main__":
    sys.exit(main())
