"""The Learner of a real node: LoRA adapters (peft) on a transformers model, on its data shard."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from p2pfm.config.node_config import NodeConfig
from p2pfm.core.errors import ConfigError
from p2pfm.learn.adapter import (
    AdapterModel,
    build_adapter_model,
    get_state,
    save_adapter,
    set_state,
    snapshot_state,
)
from p2pfm.learn.data import node_shards
from p2pfm.learn.train import Trainer


class AdapterLearner:
    """``learner.Learner`` over ``adapter`` (the model) and ``train`` (the optimizer loop)."""

    def __init__(self, config: NodeConfig, *, nodes_on_machine: int = 1) -> None:
        self.am: AdapterModel = build_adapter_model(config.model, config.lora, seed=config.gossip.seed)
        test, shards = node_shards(config.data, config.shard.shards)
        labels = test.label_names
        if config.model.task == "classification" and config.model.num_labels != len(labels):
            raise ConfigError(
                "model.num_labels",
                f"the data has {len(labels)} labels ({', '.join(labels)}); set num_labels = {len(labels)}",
            )
        self.test = test.examples
        self.shard = shards[config.shard.shard]
        self.trainer = Trainer(
            self.am,
            self.shard.examples,
            config.train,
            seed=config.gossip.seed * 100_003 + config.shard.shard,
            nodes_on_machine=nodes_on_machine,
        )
        self.schema = self.am.schema
        self.fingerprint = self.am.fingerprint
        # The initial adapter is a function of the model, the LoRA settings and gossip.seed: nodes that
        # share these start from the same state (compressed gossip's chains start from it).
        self.shared_start = True

    def describe(self) -> dict[str, Any]:
        return {
            "shard_examples": len(self.shard),
            "test_examples": len(self.test),
            "device": str(self.trainer.device),
            "autocast": str(self.trainer.autocast_dtype or "fp32"),
        }

    def train_steps(
        self, steps: int, correction: Mapping[str, np.ndarray[Any, Any]] | None = None
    ) -> float | None:
        return self.trainer.train_steps(steps, correction) if steps else None

    def evaluate(self) -> dict[str, float]:
        return self.trainer.evaluate(self.test)

    def get_state(self) -> dict[str, np.ndarray[Any, Any]]:
        return get_state(self.am)

    def snapshot(self) -> Callable[[], dict[str, np.ndarray[Any, Any]]]:
        """The state as it is now, brought to the host when the returned function is called."""
        return snapshot_state(self.am)

    def set_state(self, state: Mapping[str, np.ndarray[Any, Any]]) -> None:
        set_state(self.am, state)

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.trainer.load_state_dict(state)

    def save(self, folder: Path) -> None:
        save_adapter(self.am, folder)
