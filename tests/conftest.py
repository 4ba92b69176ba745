"""Shared fixtures: tiny random-initialised transformers models built in code (no downloads).

Each model directory holds a config, safetensors weights and a word-level
tokenizer saved with ``save_pretrained``, exactly like a real checkpoint
folder, so the code under test loads it through the normal Auto* classes.
Sizes: hidden 32, 2 layers, vocabulary of ~100 words -> a few hundred KB.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import random
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# torch, tokenizers and transformers are imported inside the builders: most
# tests need no model, and importing torch costs seconds per process.

WORDS = [f"w{i}" for i in range(90)] + ["apple", "banana", "cherry", "river", "stone"]


@dataclass(frozen=True)
class Ex:
    """Stand-in for p2pfm.learn.data.Example (text + optional label)."""

    text: str
    label: int | None


def _save_tokenizer(out: pathlib.Path, *, with_pad: bool) -> int:
    """Save a whitespace word-level tokenizer to ``out``; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    specials = ["[PAD]", "[UNK]", "[EOS]"] if with_pad else ["[UNK]", "[EOS]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kwargs = {"pad_token": "[PAD]"} if with_pad else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", **kwargs)
    fast.save_pretrained(out)
    return len(vocab)


def make_tiny_bert(out: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """A 2-layer BertModel checkpoint (no classifier head, like the packaged MiniLM)."""
    import torch  # noqa: PLC0415
    from transformers import BertConfig, BertModel  # noqa: PLC0415

    vocab_size = _save_tokenizer(out, with_pad=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(out)
    return out


def make_tiny_llama(out: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """A 2-layer LlamaForCausalLM checkpoint whose tokenizer has no pad token (pad := eos)."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    vocab_size = _save_tokenizer(out, with_pad=False)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def topic_examples(n: int, *, seed: int, length: int = 8) -> list[Ex]:
    """A learnable task (balanced): label 1 texts use words w0..w44, label 0 texts w45..w89.

    Every token carries the signal, like topic classification of news; a
    single hidden keyword is too hard for a frozen *random* 32-wide encoder
    to pick up in 30 LoRA steps.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        pool = WORDS[:45] if label else WORDS[45:90]
        out.append(Ex(" ".join(rng.choice(pool) for _ in range(length)), label))
    return out


def lm_examples(n: int, *, seed: int) -> list[Ex]:
    """Short texts with a repeated pattern (learnable next-token structure), unlabeled."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(80)
        out.append(Ex(" ".join(f"w{start + k}" for k in range(rng.randrange(4, 10))), None))
    return out


def write_jsonl(path: pathlib.Path, examples: list[Ex]) -> pathlib.Path:
    """Write examples as a p2pfm JSONL data file (``label`` only when set); returns ``path``."""
    rows = ({"text": e.text} if e.label is None else {"text": e.text, "label": e.label} for e in examples)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_classifier_toml(model_dir: pathlib.Path, data: pathlib.Path, partition: str = "iid") -> str:
    """The [model], [lora] and [data] sections of a scenario on the tiny BERT classifier.

    ``partition`` is the scheme, optionally followed by more [data] lines:
    ``"iid"``, or ``"dirichlet\\nalpha = 0.5"``.
    """
    scheme, _, rest = partition.partition("\n")
    return f"""
[model]
path = "{model_dir}"
task = "classification"
num_labels = 2

[lora]
rank = 4
target_modules = ["query", "value"]

[data]
source = "{data}"
partition = "{scheme}"
{rest}
"""


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the block under process umask ``mask``."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def file_mode(path: pathlib.Path) -> int:
    """Permission bits of ``path`` itself (a symlink is not followed)."""
    return stat.S_IMODE(path.lstat().st_mode)


def doc_section(doc: pathlib.Path, title: str) -> str:
    """The section of ``doc`` whose heading starts with ``title``, up to the next heading as high."""
    text = doc.read_text(encoding="utf-8")
    level = len(title.split(" ", 1)[0])
    start = text.index(f"\n{title}") + 1
    end = re.compile(rf"^#{{1,{level}}} ", flags=re.MULTILINE).search(text, start + level + 1)
    return text[start : end.start() if end else len(text)]
