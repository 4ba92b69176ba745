"""Checkpoints: exact round trip without pickle, private modes, crash recovery."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import file_mode, topic_examples, umask

from p2pfm.core.errors import ConfigError
from p2pfm.learn.adapter import LoraSettings, ModelSettings, build_adapter_model, get_state, set_state
from p2pfm.learn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from p2pfm.learn.train import Trainer, TrainSettings

ADAPTER = {"layer.lora_A": np.arange(6, dtype=np.float32).reshape(2, 3)}


def _trainer_state() -> dict[str, Any]:
    """Everything Trainer.state_dict() holds, and the awkward cases around it."""
    return {
        "version": 1,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}, 1: {}},
            "param_groups": [{"lr": 2e-3, "betas": (0.9, 0.999), "foreach": None, "params": [0, 1]}],
        },
        "numpy_rng": np.random.default_rng(7).bit_generator.state,  # 128-bit Python ints
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": [torch.zeros(4, dtype=torch.uint8), torch.ones(2, dtype=torch.int64)],
        "python_random": random.getstate(),  # (3, tuple of 625 ints, None)
        "floats": [float("inf"), float("nan"), -0.0, 0.1, 1e-310],
        "$not_a_tag": {"nested": (1, [2, (3,)])},
    }


def _assert_same(got: Any, want: Any, where: str = "") -> None:
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert [(type(k), k) for k in got] == [(type(k), k) for k in want], where
        for key in want:
            _assert_same(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}/{i}")
    elif isinstance(want, float):
        assert repr(got) == repr(want), where  # also tells -0.0, nan and denormals apart
    else:
        assert got == want, where


def test_round_trip_keeps_every_type_and_value(tmp_path: Path) -> None:
    state = _trainer_state()
    save_checkpoint(tmp_path / "checkpoint", Checkpoint(4, 17, ADAPTER, state, rounds_trained=3))
    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert loaded is not None and (loaded.round, loaded.seq, loaded.rounds_trained) == (4, 17, 3)
    np.testing.assert_array_equal(loaded.adapter["layer.lora_A"], ADAPTER["layer.lora_A"])
    _assert_same(loaded.trainer, state)
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == [
        "adapter.safetensors",
        "meta.json",
        "trainer.json",
        "trainer.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no .tmp or .old left over


def test_resume_through_disk_is_exact(tmp_path: Path, tiny_bert_dir: Path) -> None:
    def build() -> Trainer:
        lora = LoraSettings(rank=4, alpha=8.0)
        am = build_adapter_model(ModelSettings(str(tiny_bert_dir), num_labels=2), lora, seed=0)
        settings = TrainSettings(batch_size=16, lr=3e-2, max_length=32, device="cpu", threads=1)
        return Trainer(am, topic_examples(40, seed=0), settings, seed=5)  # epoch ends inside a batch

    straight = build()
    straight.train_steps(4)
    saved = straight.state_dict()
    save_checkpoint(tmp_path / "checkpoint", Checkpoint(4, 9, get_state(straight.am), saved))
    straight.train_steps(4)
    expected = get_state(straight.am)

    torch.manual_seed(999)  # a fresh process would have other RNG states
    random.seed(999)
    loaded = load_checkpoint(tmp_path / "checkpoint")
    assert loaded is not None
    _assert_same(loaded.trainer, saved)
    resumed = build()
    set_state(resumed.am, loaded.adapter)
    resumed.load_state_dict(loaded.trainer)
    assert resumed.step == 4 and random.getstate() == saved["python_random"]
    resumed.train_steps(4)
    for name, value in get_state(resumed.am).items():
        np.testing.assert_array_equal(value, expected[name])
    for p_straight, p_resumed in zip(straight.params, resumed.params, strict=True):
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                resumed.optimizer.state[p_resumed][moment],
                straight.optimizer.state[p_straight][moment],
                atol=0,
                rtol=0,
            )


class _Payload:
    """Unpickling this creates ``marker``: what a planted trainer.pt could do instead of mkdir."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def _plant_old_format(folder: Path, marker: Path) -> None:
    folder.mkdir()
    safetensors.numpy.save_file(ADAPTER, str(folder / "adapter.safetensors"))
    (folder / "meta.json").write_text(json.dumps({"round": 3, "seq": 5}))
    torch.save({"version": 1, "evil": _Payload(marker)}, folder / "trainer.pt")
    torch.load(folder / "trainer.pt", weights_only=False)  # the payload is live: what the old loader ran
    assert marker.exists()
    marker.rmdir()


@pytest.mark.parametrize("where", ["checkpoint", "checkpoint.old"])
def test_old_pickle_checkpoint_is_refused_never_unpickled(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    _plant_old_format(tmp_path / where, marker)
    with pytest.raises(ConfigError, match=r"trainer\.pt, a pickle") as info:
        load_checkpoint(tmp_path / "checkpoint")
    assert not marker.exists()
    message = str(info.value)
    assert "'node.out'" in message and f"remove {tmp_path / where}" in message and "\n" not in message


def test_stray_trainer_pt_beside_a_checkpoint_is_ignored(tmp_path: Path) -> None:
    folder, marker = tmp_path / "checkpoint", tmp_path / "pwned"
    save_checkpoint(folder, Checkpoint(1, 2, ADAPTER, _trainer_state()))
    torch.save(_Payload(marker), folder / "trainer.pt")
    loaded = load_checkpoint(folder)
    assert loaded is not None and loaded.round == 1
    assert not marker.exists()


@pytest.mark.parametrize("mask", [0o022, 0o000], ids=["umask-022", "umask-000"])
def test_checkpoint_is_private_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    folder = tmp_path / "out" / "checkpoint"
    with umask(mask):
        save_checkpoint(folder, Checkpoint(1, 1, ADAPTER, _trainer_state()))
        (tmp_path / "out" / "checkpoint.tmp").mkdir(mode=0o777)  # a crash's leftover, world-readable
        save_checkpoint(folder, Checkpoint(2, 2, ADAPTER, _trainer_state()))
    assert file_mode(tmp_path / "out") == 0o700  # created by the checkpoint: private too
    assert file_mode(folder) == 0o700
    files = list(folder.iterdir())
    assert len(files) == 4 and all(file_mode(f) == 0o600 and f.is_file() for f in files)


def test_every_file_is_private_from_its_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No window: each file already has mode 0600 when its bytes are fsynced, whatever the umask."""
    seen: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            seen.append((stat.S_IMODE(info.st_mode), info.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with umask(0o000):
        save_checkpoint(tmp_path / "checkpoint", Checkpoint(1, 1, ADAPTER, _trainer_state()))
    assert len(seen) == 4 and all(mode == 0o600 and size > 0 for mode, size in seen)


def test_crash_between_the_two_renames_falls_back_to_old(tmp_path: Path) -> None:
    folder, state = tmp_path / "checkpoint", _trainer_state()
    save_checkpoint(folder, Checkpoint(6, 11, ADAPTER, state))
    folder.rename(tmp_path / "checkpoint.old")  # the state right after `folder.rename(old)`
    loaded = load_checkpoint(folder)
    assert loaded is not None and (loaded.round, loaded.seq) == (6, 11)
    _assert_same(loaded.trainer, state)
    save_checkpoint(folder, Checkpoint(7, 12, ADAPTER, _trainer_state()))  # the next round recovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    again = load_checkpoint(folder)
    assert again is not None and again.round == 7


def test_no_checkpoint_yet_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "checkpoint") is None
    (tmp_path / "checkpoint.tmp").mkdir()  # a crash before the first rename: not a checkpoint
    assert load_checkpoint(tmp_path / "checkpoint") is None


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("meta.json", b'{"round": 1, "seq": 1}'),  # no format: not this version's
        ("meta.json", b"[1, 2]"),
        ("trainer.json", b'{"torch_rng": {"$tensor": "nope"}}'),
        ("trainer.json", b'{"x": {"$pickle": "..."}}'),
        ("trainer.json", b"{truncated"),
        ("trainer.safetensors", b"not safetensors"),
        ("adapter.safetensors", b""),
    ],
)
def test_damaged_checkpoint_is_one_line_config_error(tmp_path: Path, name: str, body: bytes) -> None:
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, Checkpoint(1, 1, ADAPTER, _trainer_state()))
    (folder / name).write_bytes(body)
    with pytest.raises(ConfigError, match="unreadable") as info:
        load_checkpoint(folder)
    assert "'node.out'" in str(info.value) and "remove it" in str(info.value)
