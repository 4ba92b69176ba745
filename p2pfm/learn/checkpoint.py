"""Per-round checkpoints: written atomically, read back with --resume, never unpickled.

A checkpoint folder (mode 0700, files 0600: it holds the adapter and the
optimizer state) is replaced as a whole: the files are written into
``<folder>.tmp``, the current folder is renamed to ``<folder>.old``, the staging
folder to ``<folder>``, and ``.old`` is deleted; a crash between the two renames
leaves ``.old``, which ``load_checkpoint`` falls back to. Files:

- ``adapter.safetensors``: the adapter after mixing (numpy arrays);
- ``trainer.safetensors``: every tensor of ``Trainer.state_dict()`` (optimizer
  moments and steps, torch/CUDA RNG states), named by its path in that dict,
  e.g. ``optimizer/state/0/exp_avg``;
- ``trainer.json``: the rest of ``Trainer.state_dict()`` as JSON, a tensor
  replaced by ``{"$tensor": name}``, a tuple by ``{"$tuple": [...]}`` and a dict
  whose keys are not all plain strings by ``{"$dict": [[key, value], ...]}``
  (JSON integers are unbounded, so the 128-bit numpy generator state fits);
- ``algorithm.safetensors`` (only when it holds something): the gossip
  algorithm's local state (p2pfm/learn/algorithm.py: outer momentum, drift
  correction), flat names such as ``momentum/<tensor>``; absent = none;
- ``meta.json``: ``{"format": "p2pfm-checkpoint-v2", "round": r, "seq": s,
  "rounds_trained": t}``: the last completed round and the last sequence number
  sent (so peers accept our next messages), and how many rounds were trained.

Nothing is unpickled: whoever can write the out folder must not be able to run
code as the process that holds the node's key. A checkpoint of the previous
format (``trainer.pt``, a pickle) is refused with a ConfigError, never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors
import safetensors.numpy

if TYPE_CHECKING:
    import torch

from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.core.private_files import make_private_dir, write_private_file

CHECKPOINT_FORMAT = "p2pfm-checkpoint-v2"
ADAPTER_FILE = "adapter.safetensors"
TRAINER_TENSORS_FILE = "trainer.safetensors"
TRAINER_STATE_FILE = "trainer.json"
META_FILE = "meta.json"
ALGORITHM_FILE = "algorithm.safetensors"
_LEGACY_TRAINER_FILE = "trainer.pt"  # format v1: a pickle, never loaded
_TENSOR, _TUPLE, _DICT = "$tensor", "$tuple", "$dict"
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class Checkpoint:
    round: int  # the last completed round
    seq: int  # the last sequence number sent
    adapter: dict[str, np.ndarray[Any, Any]]
    trainer: dict[str, Any]  # Trainer.state_dict()
    rounds_trained: int = 0  # rounds the node actually ran (catching up skips some)
    algorithm: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)  # RoundAlgorithm.state_dict()


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """Replace the checkpoint in ``folder`` (see the module docstring for the steps and the files)."""
    tensors: dict[str, torch.Tensor] = {}
    trainer_json = json.dumps(_encode(checkpoint.trainer, "", tensors))
    meta = {
        "format": CHECKPOINT_FORMAT,
        "round": checkpoint.round,
        "seq": checkpoint.seq,
        "rounds_trained": checkpoint.rounds_trained,
    }
    staging = folder.with_name(folder.name + ".tmp")
    _remove(staging)  # a half-written one from a crash
    make_private_dir(staging)
    write_private_file(staging / ADAPTER_FILE, safetensors.numpy.save(checkpoint.adapter))
    write_private_file(staging / TRAINER_TENSORS_FILE, _save_tensors(tensors))
    write_private_file(staging / TRAINER_STATE_FILE, trainer_json.encode("utf-8"))
    if checkpoint.algorithm:
        write_private_file(staging / ALGORITHM_FILE, safetensors.numpy.save(checkpoint.algorithm))
    write_private_file(staging / META_FILE, json.dumps(meta).encode("utf-8"))
    old = folder.with_name(folder.name + ".old")
    if os.path.lexists(folder):
        _remove(old)
        folder.rename(old)
    staging.rename(folder)
    _remove(old)


def load_checkpoint(folder: Path) -> Checkpoint | None:
    """The saved checkpoint, or None when there is none yet; ConfigError (field node.out) when unusable."""
    if not (folder / META_FILE).exists():
        old = folder.with_name(folder.name + ".old")  # crashed between the two renames
        if (old / META_FILE).exists():
            folder = old
        else:
            return None
    if not (folder / TRAINER_STATE_FILE).exists() and (folder / _LEGACY_TRAINER_FILE).exists():
        raise ConfigError(
            "node.out",
            f"checkpoint in {folder} has the old format ({_LEGACY_TRAINER_FILE}, a pickle, which is never "
            f"loaded: it could run code); remove {folder} to start over",
        )
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{META_FILE} does not say format {CHECKPOINT_FORMAT!r}")
        adapter = safetensors.numpy.load_file(str(folder / ADAPTER_FILE))
        tensors = _load_tensors(folder / TRAINER_TENSORS_FILE)
        state = json.loads((folder / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        used: set[str] = set()
        trainer = _decode(state, tensors, used)
        if not isinstance(trainer, dict):
            raise ValueError(f"{TRAINER_STATE_FILE} is not a JSON object")
        if used != set(tensors):
            raise ValueError(f"{TRAINER_TENSORS_FILE} does not match {TRAINER_STATE_FILE}")
        rounds_trained = int(meta["rounds_trained"])
        algorithm_path = folder / ALGORITHM_FILE
        algorithm = safetensors.numpy.load_file(str(algorithm_path)) if algorithm_path.exists() else {}
        return Checkpoint(
            int(meta["round"]), int(meta["seq"]), dict(adapter), trainer, rounds_trained, dict(algorithm)
        )
    except (OSError, ValueError, KeyError, TypeError, safetensors.SafetensorError) as exc:
        raise ConfigError(
            "node.out", f"checkpoint in {folder} is unreadable ({exc}); remove it to start over"
        ) from None


def _save_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """The trainer's tensors as safetensors bytes; without tensors, no torch is needed (numpy learners)."""
    if not tensors:
        return safetensors.numpy.save({})
    from safetensors.torch import save  # noqa: PLC0415  torch only when the trainer has tensors

    return save(tensors)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safetensors.safe_open(str(path), framework="numpy") as handle:
        if not list(handle.keys()):
            return {}
    from safetensors.torch import load_file  # noqa: PLC0415  (bfloat16 moments need torch to load)

    return load_file(str(path))


def _remove(path: Path) -> None:
    """Delete a leftover staging or old folder; a symlink there is unlinked, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _child(name: str, part: object) -> str:
    return f"{name}/{part}" if name else str(part)


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-able data; its tensors move to ``tensors``, named by their path in ``value``."""
    torch = sys.modules.get("torch")  # not imported: then nothing here is a torch tensor
    if torch is not None and isinstance(value, torch.Tensor):
        key = name if name not in tensors else f"{name}#{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(item, _child(name, i), tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(item, _child(name, i), tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(key, str) and not key.startswith("$") for key in value):
            return {key: _encode(item, _child(name, key), tensors) for key, item in value.items()}
        for key in value:
            if not isinstance(key, _SCALARS):
                raise LocalProtocolError(f"trainer state {name or '/'} has a {type(key).__name__} key")
        return {_DICT: [[key, _encode(item, _child(name, key), tensors)] for key, item in value.items()]}
    raise LocalProtocolError(
        f"trainer state {name or '/'} is a {type(value).__name__}, which a checkpoint cannot store"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    """Inverse of ``_encode``; ValueError on anything ``_encode`` does not write."""
    if isinstance(value, list):
        return [_decode(item, tensors, used) for item in value]
    if not isinstance(value, dict):
        return value
    if not any(key.startswith("$") for key in value):
        return {key: _decode(item, tensors, used) for key, item in value.items()}
    if len(value) != 1:
        raise ValueError(f"unexpected entry {sorted(value)} in {TRAINER_STATE_FILE}")
    ((tag, body),) = value.items()
    if tag == _TENSOR and isinstance(body, str):
        if body not in tensors:
            raise ValueError(f"tensor {body!r} is missing from {TRAINER_TENSORS_FILE}")
        used.add(body)
        return tensors[body]
    if tag == _TUPLE and isinstance(body, list):
        return tuple(_decode(item, tensors, used) for item in body)
    if tag == _DICT and isinstance(body, list):
        out = {}
        for pair in body:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], _SCALARS)):
                raise ValueError(f"{_DICT} entries must be [key, value] pairs, got {pair!r}")
            out[pair[0]] = _decode(pair[1], tensors, used)
        return out
    raise ValueError(f"unexpected entry {tag!r} in {TRAINER_STATE_FILE}")
