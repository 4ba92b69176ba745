"""Per-round checkpoints: written atomically, read back with --resume.

A checkpoint folder holds three files, replaced together (write to a
temporary folder, then rename over the old one, so a crash mid-write leaves
the previous checkpoint intact):

- ``adapter.safetensors``: the adapter after mixing (numpy arrays, no pickle);
- ``trainer.pt``: optimizer and sampler/RNG state, a local file this node wrote
  itself (never network bytes), loaded with ``weights_only=False``;
- ``meta.json``: ``{"round": r, "seq": s}`` - the last completed round and the
  last sequence number sent, so peers accept our next messages.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import torch

from p2pfm.errors import ConfigError


@dataclass(frozen=True)
class Checkpoint:
    round: int
    seq: int
    adapter: dict[str, np.ndarray[Any, Any]]
    trainer: dict[str, Any]


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    staging = folder.with_name(folder.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    safetensors.numpy.save_file(checkpoint.adapter, str(staging / "adapter.safetensors"))
    torch.save(checkpoint.trainer, staging / "trainer.pt")
    (staging / "meta.json").write_text(json.dumps({"round": checkpoint.round, "seq": checkpoint.seq}))
    for name in ("adapter.safetensors", "trainer.pt", "meta.json"):
        with (staging / name).open("rb") as handle:
            os.fsync(handle.fileno())
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    staging.rename(folder)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The saved checkpoint, or None when there is none yet."""
    if not (folder / "meta.json").exists():
        old = folder.with_name(folder.name + ".old")  # crashed between the two renames
        if (old / "meta.json").exists():
            folder = old
        else:
            return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        adapter = safetensors.numpy.load_file(str(folder / "adapter.safetensors"))
        trainer = torch.load(folder / "trainer.pt", weights_only=False)
        return Checkpoint(int(meta["round"]), int(meta["seq"]), dict(adapter), trainer)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(
            "node.out", f"checkpoint in {folder} is unreadable ({exc}); remove it to start over"
        ) from None
