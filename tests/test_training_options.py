"""Training options of the learning algorithms: the checkpointed algorithm state, the trainer's drift
correction, logit adjustment and FFA-LoRA (``lora.freeze_a``), on the tiny BERT of conftest.py."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from p2pfm.config.schema import decode
from p2pfm.config.settings import TrainSettings
from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.learn.adapter import (
    AdapterModel,
    LoraSettings,
    ModelSettings,
    build_adapter_model,
    fingerprint_document,
    get_state,
    params_by_name,
    save_adapter,
    set_state,
)
from p2pfm.learn.checkpoint import ALGORITHM_FILE, Checkpoint, load_checkpoint, save_checkpoint
from p2pfm.learn.train import Trainer
from tests.conftest import Ex, file_mode, topic_examples

Array = np.ndarray[Any, Any]
LORA = LoraSettings(rank=4, alpha=8.0)
FROZEN = LoraSettings(rank=4, alpha=8.0, freeze_a=True)
# fp32: exact comparisons (auto would pick bf16 autocast on CPUs with native bf16).
STILL = TrainSettings(batch_size=8, lr=0.0, max_length=16, device="cpu", threads=1, precision="fp32")
FAST = TrainSettings(batch_size=16, lr=3e-2, max_length=16, device="cpu", threads=1, precision="fp32")


def _build(model_dir: pathlib.Path, *, lora: LoraSettings = LORA, seed: int = 7) -> AdapterModel:
    return build_adapter_model(ModelSettings(str(model_dir), num_labels=2), lora, seed=seed)


def _random_state(am: AdapterModel, seed: int, scale: float = 1.0) -> dict[str, Array]:
    rng = np.random.default_rng(seed)
    return {s.name: (scale * rng.standard_normal(s.shape)).astype(np.float32) for s in am.schema}


def _no_dropout(am: AdapterModel) -> None:
    """Training forwards become deterministic (the tiny BERT has hidden and attention dropout 0.1)."""
    for module in am.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


# --------------------------------------------------------------------------- #
# Checkpoint.algorithm
# --------------------------------------------------------------------------- #

ADAPTER = {"layer.lora_B": np.arange(6, dtype=np.float32).reshape(3, 2)}


def test_checkpoint_keeps_the_algorithm_state(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "checkpoint"
    algorithm = {
        "momentum/layer.lora_B": np.linspace(-1, 1, 6, dtype=np.float32).reshape(3, 2),
        "correction/x": np.array([1e-30, -0.0, 3.5], np.float64),
    }
    save_checkpoint(folder, Checkpoint(3, 9, ADAPTER, {"version": 1}, 3, algorithm))
    assert (folder / ALGORITHM_FILE).is_file()
    assert file_mode(folder / ALGORITHM_FILE) == 0o600
    loaded = load_checkpoint(folder)
    assert loaded is not None and (loaded.round, loaded.seq, loaded.rounds_trained) == (3, 9, 3)
    assert loaded.algorithm.keys() == algorithm.keys()
    for name, value in algorithm.items():
        assert loaded.algorithm[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded.algorithm[name], value)


def test_an_empty_algorithm_state_writes_no_file(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, Checkpoint(1, 1, ADAPTER, {"version": 1}))  # dpsgd: nothing to keep
    assert not (folder / ALGORITHM_FILE).exists()
    loaded = load_checkpoint(folder)
    assert loaded is not None and loaded.algorithm == {}
    # A later checkpoint without algorithm state leaves no stale file behind.
    save_checkpoint(folder, Checkpoint(2, 2, ADAPTER, {"version": 1}, algorithm={"correction/x": np.ones(2)}))
    save_checkpoint(folder, Checkpoint(3, 3, ADAPTER, {"version": 1}))
    assert not (folder / ALGORITHM_FILE).exists()
    loaded = load_checkpoint(folder)
    assert loaded is not None and loaded.round == 3 and loaded.algorithm == {}


def test_a_damaged_algorithm_file_is_a_config_error(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, Checkpoint(1, 1, ADAPTER, {"version": 1}, algorithm={"correction/x": np.ones(2)}))
    (folder / ALGORITHM_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ConfigError) as info:
        load_checkpoint(folder)
    assert info.value.field == "node.out" and "\n" not in str(info.value)


# --------------------------------------------------------------------------- #
# Trainer.train_steps(steps, correction)
# --------------------------------------------------------------------------- #


def test_the_correction_is_added_after_every_step(tiny_bert_dir: pathlib.Path) -> None:
    """lr = 0: the optimizer leaves the parameters alone, so the change is steps x correction exactly."""
    am = _build(tiny_bert_dir)
    trainer = Trainer(am, topic_examples(32, seed=0), STILL, seed=0)
    before = get_state(am)
    names = [s.name for s in am.schema]
    corrected = [n for n in names if "lora_B" in n or n.endswith("classifier.bias")]
    rng = np.random.default_rng(1)
    correction = {n: (1e-3 * rng.standard_normal(before[n].shape)).astype(np.float32) for n in corrected}
    loss = trainer.train_steps(3, correction)
    assert math.isfinite(loss) and trainer.step == 3
    after = get_state(am)
    for name in names:
        if name in correction:
            np.testing.assert_allclose(after[name] - before[name], 3 * correction[name], rtol=1e-4, atol=1e-7)
        else:  # not in the correction: untouched
            np.testing.assert_array_equal(after[name], before[name])


def test_no_correction_and_an_empty_one_change_nothing(tiny_bert_dir: pathlib.Path) -> None:
    am = _build(tiny_bert_dir)
    trainer = Trainer(am, topic_examples(32, seed=0), STILL, seed=0)
    before = get_state(am)
    trainer.train_steps(1)
    trainer.train_steps(1, {})
    trainer.train_steps(1, None)
    for name, value in get_state(am).items():
        np.testing.assert_array_equal(value, before[name])


def test_a_correction_that_does_not_match_the_adapter_is_refused(tiny_bert_dir: pathlib.Path) -> None:
    am = _build(tiny_bert_dir)
    trainer = Trainer(am, topic_examples(32, seed=0), STILL, seed=0)
    spec = am.schema[0]
    before = get_state(am)
    bad = [
        {"base_model.model.nowhere.weight": np.zeros(3, np.float32)},  # unknown name
        {spec.name: np.zeros((spec.shape[0] + 1, *spec.shape[1:]), np.float32)},  # wrong shape
        {spec.name: np.zeros(spec.shape, np.float32).ravel()},  # same size, wrong shape
    ]
    for correction in bad:
        with pytest.raises(LocalProtocolError, match="does not match the adapter"):
            trainer.train_steps(2, correction)
    assert trainer.step == 0  # refused before any step
    for name, value in get_state(am).items():
        np.testing.assert_array_equal(value, before[name])


def test_a_correction_of_a_frozen_a_is_refused(tiny_bert_dir: pathlib.Path) -> None:
    am = _build(tiny_bert_dir, lora=FROZEN)
    trainer = Trainer(am, topic_examples(32, seed=0), STILL, seed=0)
    a_name = next(n for n, _ in am.model.named_parameters() if ".lora_A." in n)
    state_name = a_name.replace(".default", "")  # peft's state-dict name of that parameter
    shape = tuple(dict(am.model.named_parameters())[a_name].shape)
    with pytest.raises(LocalProtocolError, match="does not match the adapter"):
        trainer.train_steps(1, {state_name: np.zeros(shape, np.float32)})


# --------------------------------------------------------------------------- #
# TrainSettings.logit_adjustment
# --------------------------------------------------------------------------- #


def _skewed(n_ones: int, n_zeros: int) -> list[Ex]:
    ones = [e for e in topic_examples(2 * n_ones, seed=3) if e.label == 1][:n_ones]
    zeros = [e for e in topic_examples(2 * n_zeros, seed=4) if e.label == 0][:n_zeros]
    return ones + zeros


def _settings(tau: float, batch: int) -> TrainSettings:
    return TrainSettings(
        batch_size=batch,
        lr=0.0,
        max_length=16,
        device="cpu",
        threads=1,
        precision="fp32",
        logit_adjustment=tau,
    )


def test_logit_adjustment_shifts_the_training_loss_by_the_label_prior(tiny_bert_dir: pathlib.Path) -> None:
    """One batch = the whole skewed shard (24 of label 1, 6 of label 0): the loss is the mean of
    cross-entropy(logits + tau * log((counts + 1) / (n + C))), computed here by hand."""
    am = _build(tiny_bert_dir)
    _no_dropout(am)
    shard = _skewed(24, 6)
    tau = 1.5
    plain = Trainer(am, shard, _settings(0.0, len(shard)), seed=0).train_steps(1)
    adjusted = Trainer(am, shard, _settings(tau, len(shard)), seed=0).train_steps(1)
    enc = am.tokenizer(
        [e.text for e in shard], truncation=True, max_length=16, padding="longest", return_tensors="pt"
    )
    labels = torch.tensor([e.label for e in shard])
    with torch.no_grad():
        logits = am.model(**enc).logits.float()
    prior = torch.tensor([(6 + 1) / (30 + 2), (24 + 1) / (30 + 2)])
    want_plain = float(torch.nn.functional.cross_entropy(logits, labels))
    want_adjusted = float(torch.nn.functional.cross_entropy(logits + tau * prior.log(), labels))
    assert plain == pytest.approx(want_plain, rel=1e-5)
    assert adjusted == pytest.approx(want_adjusted, rel=1e-5)
    assert abs(adjusted - plain) > 0.05, (plain, adjusted)


def test_logit_adjustment_is_invisible_on_balanced_labels(tiny_bert_dir: pathlib.Path) -> None:
    """A uniform prior adds the same constant to every logit: cross-entropy does not change."""
    am = _build(tiny_bert_dir)
    shard = _skewed(10, 10)
    plain = Trainer(am, shard, _settings(0.0, 8), seed=0).train_steps(2)
    adjusted = Trainer(am, shard, _settings(2.0, 8), seed=0).train_steps(2)  # same batches, same masks
    assert adjusted == pytest.approx(plain, rel=1e-5)


def test_logit_adjustment_does_not_touch_evaluation(tiny_bert_dir: pathlib.Path) -> None:
    am = _build(tiny_bert_dir)
    set_state(am, _random_state(am, 5, scale=0.3))  # a model that is not indifferent between labels
    shard, test = _skewed(24, 6), topic_examples(20, seed=9)
    plain = Trainer(am, shard, _settings(0.0, 8), seed=0).evaluate(test)
    adjusted_trainer = Trainer(am, shard, _settings(4.0, 8), seed=0)
    assert adjusted_trainer.evaluate(test) == plain
    assert am.model.training  # train mode restored, so the next training step is adjusted again
    plain_loss = Trainer(am, shard, _settings(0.0, 8), seed=0).train_steps(1)
    adjusted_loss = Trainer(am, shard, _settings(4.0, 8), seed=0).train_steps(1)
    assert abs(adjusted_loss - plain_loss) > 0.05, (plain_loss, adjusted_loss)


@pytest.mark.parametrize("tau", [-0.5, 4.5])
def test_logit_adjustment_range(tau: float) -> None:
    with pytest.raises(ConfigError) as info:
        decode(TrainSettings, {"logit_adjustment": tau}, "train")
    assert info.value.field == "train.logit_adjustment"
    assert decode(TrainSettings, {"logit_adjustment": 4}, "train").logit_adjustment == 4.0


# --------------------------------------------------------------------------- #
# LoraSettings.freeze_a (FFA-LoRA)
# --------------------------------------------------------------------------- #


def _a_tensors(am: AdapterModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in am.model.named_parameters() if ".lora_A." in n}


def test_frozen_a_is_not_trainable_nor_gossiped(tiny_bert_dir: pathlib.Path) -> None:
    am = _build(tiny_bert_dir, lora=FROZEN)
    names = [s.name for s in am.schema]
    assert not any(".lora_A." in n for n in names)
    assert sum(".lora_B." in n for n in names) == 4 and len(names) == 6  # 2 layers x (query, value) + head
    assert set(get_state(am)) == set(names)
    a_params = [p for n, p in am.model.named_parameters() if ".lora_A." in n]
    assert len(a_params) == 4 and not any(p.requires_grad for p in a_params)
    unfrozen = _build(tiny_bert_dir)  # same seed: the same A, which every node of the network shares
    for name, value in _a_tensors(unfrozen).items():
        torch.testing.assert_close(_a_tensors(am)[name], value, rtol=0, atol=0)


def test_training_leaves_a_where_the_seed_put_it(tiny_bert_dir: pathlib.Path) -> None:
    am = _build(tiny_bert_dir, lora=FROZEN)
    a_before, state_before = _a_tensors(am), get_state(am)
    trainer = Trainer(am, topic_examples(64, seed=0), FAST, seed=0)
    assert len(trainer.params) == 6
    trainer.train_steps(3)
    for name, value in _a_tensors(am).items():
        torch.testing.assert_close(value, a_before[name], rtol=0, atol=0)
    state_after = get_state(am)
    moved = [n for n in state_after if not np.array_equal(state_after[n], state_before[n])]
    assert sum(".lora_B." in n for n in moved) == 4  # B does train


def test_frozen_a_fingerprint(tiny_bert_dir: pathlib.Path) -> None:
    frozen = _build(tiny_bert_dir, lora=FROZEN, seed=7)
    assert frozen.fingerprint == _build(tiny_bert_dir, lora=FROZEN, seed=7).fingerprint
    assert frozen.fingerprint != _build(tiny_bert_dir, lora=LORA, seed=7).fingerprint
    assert frozen.fingerprint != _build(tiny_bert_dir, lora=FROZEN, seed=8).fingerprint  # other A
    # Trainable A: the seed is not fingerprinted (docs/training.md), as before freeze_a existed.
    assert _build(tiny_bert_dir, seed=7).fingerprint == _build(tiny_bert_dir, seed=8).fingerprint
    settings = ModelSettings(str(tiny_bert_dir), num_labels=2)
    document = fingerprint_document(settings, FROZEN, tiny_bert_dir, frozen.schema, "classification", seed=7)
    assert document["lora"] == {
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ["query", "value"],
        "freeze_a": True,
        "seed": 7,
    }
    plain = fingerprint_document(settings, LORA, tiny_bert_dir, frozen.schema, "classification", seed=7)
    assert set(plain["lora"]) == {"rank", "alpha", "dropout", "target_modules"}
    json.dumps(document)  # canonical JSON must be able to write it


def test_frozen_a_set_and_get_state_round_trip(tiny_bert_dir: pathlib.Path) -> None:
    am = _build(tiny_bert_dir, lora=FROZEN)
    a_before = _a_tensors(am)
    state = _random_state(am, 11)
    set_state(am, state)
    got = get_state(am)
    assert got.keys() == state.keys()
    for name in state:
        np.testing.assert_array_equal(got[name], state[name])
    for name, value in _a_tensors(am).items():  # set_state writes no A
        torch.testing.assert_close(value, a_before[name], rtol=0, atol=0)
    a_state_name = next(iter(a_before)).replace(".default", "")
    with pytest.raises(LocalProtocolError):  # an A is not part of this adapter's state
        set_state(am, {**state, a_state_name: np.zeros(a_before[next(iter(a_before))].shape, np.float32)})


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_frozen_a_adapter_loads_with_plain_peft(tiny_bert_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    am = _build(tiny_bert_dir, lora=FROZEN)
    set_state(am, _random_state(am, 3))
    out = tmp_path / "adapter"
    save_adapter(am, out)
    saved = safetensors.numpy.load_file(str(out / "adapter_model.safetensors"))
    assert sum(".lora_A." in n for n in saved) == 4  # the PEFT layout holds A, although it is not gossiped
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, out)
    for name, value in _a_tensors(am).items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name].detach(), value, rtol=0, atol=0)
    enc = am.tokenizer(["w1 w2 apple w3", "w50 w60 river"], return_tensors="pt", padding=True)
    am.model.eval()
    loaded.eval()
    with torch.no_grad():
        want = am.model(**enc).logits
        have = loaded(**enc).logits
    torch.testing.assert_close(have, want, rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# train.optimizer
# --------------------------------------------------------------------------- #


def test_sgd_steps_along_the_gradient_and_resumes(tiny_bert_dir: pathlib.Path) -> None:
    """optimizer = "sgd": one step moves every trainable tensor by exactly -lr x its gradient."""
    am = _build(tiny_bert_dir)
    _no_dropout(am)
    settings = TrainSettings(batch_size=8, lr=0.5, optimizer="sgd", precision="fp32", threads=1)
    trainer = Trainer(am, topic_examples(32, seed=0), settings, seed=0)
    assert type(trainer.optimizer) is torch.optim.SGD
    before = get_state(am)
    trainer.train_steps(1)
    after = get_state(am)
    grads = {n: p.grad for n, p in params_by_name(am.model).items()}
    moved = 0
    for name, grad in grads.items():
        assert grad is not None
        np.testing.assert_allclose(after[name] - before[name], -0.5 * grad.numpy(), rtol=1e-4, atol=1e-7)
        moved += int(np.any(after[name] != before[name]))
    assert moved > 0
    resumed = Trainer(_build(tiny_bert_dir), topic_examples(32, seed=0), settings, seed=0)
    resumed.load_state_dict(trainer.state_dict())  # SGD's (empty) state survives a checkpoint
    assert resumed.step == 1


def test_the_optimizer_setting_is_checked() -> None:
    with pytest.raises(ConfigError) as info:
        decode(TrainSettings, {"optimizer": "adam"}, "train")
    assert info.value.field == "train.optimizer"
