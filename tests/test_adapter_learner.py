"""AdapterLearner: the Learner of a real node, LoRA on a (tiny, random) transformers model and its shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from p2pfm.config.node_config import NodeConfig, node_config_from_dict
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import Identity, write_key_file
from p2pfm.learn.adapter_learner import AdapterLearner
from p2pfm.learn.learner import Learner
from tests.conftest import topic_examples, write_jsonl


def _config(folder: Path, model_dir: Path, *, num_labels: int = 2, shard: int = 0) -> NodeConfig:
    folder.mkdir(parents=True, exist_ok=True)
    write_key_file(Identity(bytes([5]) * 32), folder / "node.key", force=True)
    data = write_jsonl(folder / "data.jsonl", topic_examples(40, seed=0))
    doc: dict[str, Any] = {
        "node": {"key": "node.key", "listen": "tcp://127.0.0.1:1", "network": "n", "out": "out"},
        "peers": [{"id": Identity(bytes([6]) * 32).peer_id.hex, "address": "tcp://127.0.0.1:2"}],
        "model": {"path": str(model_dir), "task": "classification", "num_labels": num_labels},
        "lora": {"rank": 2, "target_modules": ["query", "value"]},
        "data": {"source": str(data), "partition": "iid", "shards": 2, "shard": shard},
        "train": {"local_steps": 1, "batch_size": 4, "max_length": 16, "threads": 1},
    }
    return node_config_from_dict(doc, folder / "node.toml")


@pytest.fixture(scope="module")
def learner(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> AdapterLearner:
    return AdapterLearner(_config(tmp_path_factory.mktemp("learner"), tiny_bert_dir))


def test_it_describes_its_shard_and_holds_its_schema(learner: AdapterLearner) -> None:
    typed: Learner = learner
    facts = typed.describe()
    assert facts["device"] == "cpu" and facts["shard_examples"] == len(learner.shard) > 0
    assert facts["test_examples"] == len(learner.test) > 0
    state = typed.get_state()
    assert sorted(state) == sorted(spec.name for spec in typed.schema)
    assert all(state[s.name].shape == s.shape and str(state[s.name].dtype) == s.dtype for s in typed.schema)
    assert len(typed.fingerprint) == 32


def test_training_moves_the_state_and_set_state_replaces_it(learner: AdapterLearner) -> None:
    assert learner.train_steps(0) is None
    before = learner.get_state()
    loss = learner.train_steps(2)
    assert loss is not None and np.isfinite(loss)
    after = learner.get_state()
    assert any(not np.array_equal(before[name], after[name]) for name in before)
    learner.set_state(before)
    assert all(np.array_equal(learner.get_state()[name], before[name]) for name in before)
    assert 0.0 <= learner.evaluate()["accuracy"] <= 1.0


def test_the_final_adapter_is_the_peft_layout(learner: AdapterLearner, tmp_path: Path) -> None:
    learner.save(tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }


def test_a_label_count_the_data_does_not_have_names_the_field(tmp_path: Path, tiny_bert_dir: Path) -> None:
    with pytest.raises(ConfigError, match="set num_labels = 2") as info:
        AdapterLearner(_config(tmp_path, tiny_bert_dir, num_labels=3))
    assert info.value.field == "model.num_labels"
