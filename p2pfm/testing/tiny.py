"""A tiny random BERT classifier and a toy task: real LoRA adapters in the simulator, in seconds.

``build_tiny_model(folder)`` writes a 2-layer, 32-wide BERT checkpoint
(random weights, a word-level tokenizer: no download) and a JSONL topic
task whose labels every word carries; ``TinyModel.learners(nodes)`` is then
a learner factory for ``p2pfm.simulate(..., learner=...)``: node i trains
LoRA adapters (p2pfm/learn/adapter_learner.py) on its shard of the task and
evaluates on the shared test split (``accuracy``, ``loss``).

This module loads torch, tokenizers and transformers when a function is
called, not when it is imported (the pytest plugin imports nothing of it
until the ``tiny_model`` fixture is used).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from p2pfm.core.identity import Identity, write_key_file

if TYPE_CHECKING:
    from p2pfm.learn.learner import Learner
    from p2pfm.simulation import LearnerFactory

_WORDS = [f"w{i}" for i in range(90)]  # label 1 texts draw from the first half, label 0 from the second
_SPECIALS = ["[PAD]", "[UNK]"]
_NETWORK = "p2pfm-tiny"


@dataclass(frozen=True)
class TinyModel:
    """A tiny model folder and its toy data (``build_tiny_model``)."""

    folder: Path
    model_dir: Path
    data: Path  # JSONL: {"text", "label"} per line, two balanced labels

    def learners(
        self,
        nodes: int,
        *,
        partition: str = "iid",
        rank: int = 2,
        batch_size: int = 8,
        lr: float = 0.01,
        seed: int = 0,
        alpha: float = 0.5,
    ) -> LearnerFactory:
        """A learner factory: node i (of ``nodes``) trains LoRA on shard i (``partition``: iid or dirichlet).

        Every node starts from the same adapter (``seed``), as a real
        network's nodes do.
        """
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")

        def make(index: int) -> Learner:
            from p2pfm.config.node_config import node_config_from_dict  # noqa: PLC0415
            from p2pfm.learn.adapter_learner import AdapterLearner  # noqa: PLC0415  (torch)

            if not 0 <= index < nodes:
                raise ValueError(f"node {index} is not in 0..{nodes - 1}")
            data: dict[str, Any] = {
                "source": str(self.data), "partition": partition, "shards": nodes, "shard": index,
            }  # fmt: skip
            if partition == "dirichlet":
                data["alpha"] = alpha
            doc: dict[str, Any] = {
                "node": {"key": "node.key", "listen": "tcp://127.0.0.1:1", "network": _NETWORK, "out": "out"},
                "peers": [{"id": Identity(bytes([2]) * 32).peer_id.hex, "address": "tcp://127.0.0.1:2"}],
                "model": {"path": str(self.model_dir), "task": "classification", "num_labels": 2},
                "lora": {"rank": rank, "target_modules": ["query", "value"]},
                "data": data,
                "train": {"batch_size": batch_size, "lr": lr, "max_length": 16, "threads": 1},
                "gossip": {"seed": seed},
            }
            return AdapterLearner(node_config_from_dict(doc, self.folder / "node.toml"))

        return make


def build_tiny_model(folder: Path, *, seed: int = 0, examples: int = 200) -> TinyModel:
    """Write the tiny BERT (``folder/model``), its toy data (``folder/data.jsonl``) and a key file."""
    import torch  # noqa: PLC0415
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    model_dir = folder / "model"
    vocab = {token: i for i, token in enumerate(_SPECIALS + _WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]"
    )
    fast.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    )  # fmt: skip
    BertModel(config).save_pretrained(model_dir)
    rng = random.Random(seed)
    rows = []
    for i in range(examples):
        label = i % 2
        pool = _WORDS[:45] if label else _WORDS[45:]
        rows.append({"text": " ".join(rng.choice(pool) for _ in range(8)), "label": label})
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    write_key_file(Identity(bytes([1]) * 32), folder / "node.key", force=True)
    return TinyModel(folder, model_dir, data)
