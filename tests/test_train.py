from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
from conftest import Ex, lm_examples, topic_examples

from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.learn.adapter import (
    AdapterModel,
    LoraSettings,
    ModelSettings,
    build_adapter_model,
    get_state,
    set_state,
)
from p2pfm.learn.train import Trainer, TrainSettings, pick_device, threads_for

LORA = LoraSettings(rank=4, alpha=8.0)
FAST = TrainSettings(batch_size=16, lr=3e-2, max_length=32, device="cpu", threads=1)


def build_cls(model_dir: pathlib.Path, seed: int = 0) -> AdapterModel:
    return build_adapter_model(ModelSettings(str(model_dir), num_labels=2), LORA, seed=seed)


def build_lm(model_dir: pathlib.Path, seed: int = 0) -> AdapterModel:
    lora = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    return build_adapter_model(ModelSettings(str(model_dir), task="causal-lm"), lora, seed=seed)


def test_loss_decreases_on_learnable_task(tiny_bert_dir: pathlib.Path) -> None:
    trainer = Trainer(build_cls(tiny_bert_dir), topic_examples(256, seed=0), FAST, seed=0)
    first = trainer.train_steps(5)
    trainer.train_steps(20)
    last = trainer.train_steps(5)
    assert trainer.step == 30
    assert last < first * 0.8, (first, last)


def test_evaluate_classification(tiny_bert_dir: pathlib.Path) -> None:
    trainer = Trainer(build_cls(tiny_bert_dir), topic_examples(64, seed=0), FAST, seed=0)
    trainer.train_steps(2)
    metrics = trainer.evaluate(topic_examples(70, seed=1))  # 70: a partial last eval batch too
    assert set(metrics) == {"accuracy", "loss"}
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["loss"])
    assert trainer.am.model.training  # train mode restored
    trainer.am.model.eval()
    trainer.evaluate(topic_examples(4, seed=1))
    assert not trainer.am.model.training


def test_evaluate_does_not_change_adapter(tiny_bert_dir: pathlib.Path) -> None:
    trainer = Trainer(build_cls(tiny_bert_dir), topic_examples(32, seed=0), FAST, seed=0)
    before = get_state(trainer.am)
    trainer.evaluate(topic_examples(8, seed=1))
    for name, value in get_state(trainer.am).items():
        np.testing.assert_array_equal(value, before[name])


def test_causal_lm_train_and_perplexity(tiny_llama_dir: pathlib.Path) -> None:
    trainer = Trainer(build_lm(tiny_llama_dir), lm_examples(64, seed=0), FAST, seed=0)
    loss = trainer.train_steps(3)
    assert math.isfinite(loss)
    metrics = trainer.evaluate(lm_examples(20, seed=1))
    assert set(metrics) == {"loss", "perplexity"}
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1.0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_causal_lm_padding_does_not_count(tiny_llama_dir: pathlib.Path) -> None:
    """A text's loss must not depend on the longer texts it is batched with (pad = eos here)."""
    am = build_lm(tiny_llama_dir)
    settings = TrainSettings(eval_batch_size=1, device="cpu", threads=1)
    short, long = Ex("w1 w2 w3", None), Ex("w5 w6 w7 w8 w9 w10 w11", None)
    alone = Trainer(am, [short], settings, seed=0).evaluate([short])["loss"]
    batched = Trainer(am, [short], TrainSettings(eval_batch_size=2, device="cpu", threads=1), seed=0)
    both = batched.evaluate([short, long])
    only_long = batched.evaluate([long])
    # token-weighted: 2 predicted tokens of the short text, 6 of the long one
    assert both["loss"] == pytest.approx((2 * alone + 6 * only_long["loss"]) / 8, rel=1e-5)


def test_resume_is_exact(tiny_bert_dir: pathlib.Path) -> None:
    data = topic_examples(40, seed=0)  # 40 / 16: the epoch boundary falls inside a batch
    settings = TrainSettings(batch_size=16, lr=3e-2, max_length=32, device="cpu", threads=1)

    straight = Trainer(build_cls(tiny_bert_dir), data, settings, seed=5)
    straight.train_steps(4)
    checkpoint_adapter = get_state(straight.am)
    checkpoint_trainer = straight.state_dict()
    straight.train_steps(4)
    expected = get_state(straight.am)

    torch.manual_seed(999)  # a fresh process would have a different RNG state
    resumed_am = build_cls(tiny_bert_dir)
    resumed = Trainer(resumed_am, data, settings, seed=5)
    set_state(resumed_am, checkpoint_adapter)
    resumed.load_state_dict(checkpoint_trainer)
    assert resumed.step == 4
    resumed.train_steps(4)
    got = get_state(resumed_am)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, rtol=0)
    for p_straight, p_resumed in zip(straight.params, resumed.params, strict=True):
        m1 = straight.optimizer.state[p_straight]["exp_avg_sq"]
        m2 = resumed.optimizer.state[p_resumed]["exp_avg_sq"]
        torch.testing.assert_close(m1, m2, atol=1e-9, rtol=0)


def test_state_dict_is_a_snapshot(tiny_bert_dir: pathlib.Path) -> None:
    trainer = Trainer(build_cls(tiny_bert_dir), topic_examples(32, seed=0), FAST, seed=0)
    trainer.train_steps(1)
    state = trainer.state_dict()
    moment = state["optimizer"]["state"][0]["exp_avg"].clone()
    trainer.train_steps(1)
    torch.testing.assert_close(state["optimizer"]["state"][0]["exp_avg"], moment)
    assert state["step"] == 1


def test_load_state_dict_rejects_other_shard(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    state = Trainer(am, topic_examples(32, seed=0), FAST, seed=0).state_dict()
    with pytest.raises(LocalProtocolError):
        Trainer(am, topic_examples(33, seed=0), FAST, seed=0).load_state_dict(state)


def test_sampler_visits_every_example_once_per_epoch(tiny_bert_dir: pathlib.Path) -> None:
    settings = TrainSettings(batch_size=5, device="cpu", threads=1)
    trainer = Trainer(build_cls(tiny_bert_dir), topic_examples(20, seed=0), settings, seed=0)
    seen = [i for _ in range(8) for i in trainer._next_indices()]
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:]) == list(range(20))
    assert seen[:20] != seen[20:]  # a fresh shuffle each epoch


def test_bad_labels_and_empty_shard(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    with pytest.raises(LocalProtocolError):
        Trainer(am, [], FAST, seed=0)
    with pytest.raises(LocalProtocolError):
        Trainer(am, [Ex("w1", 2)], FAST, seed=0)  # num_labels is 2
    with pytest.raises(LocalProtocolError):
        Trainer(am, [Ex("w1", None)], FAST, seed=0)
    with pytest.raises(LocalProtocolError):
        Trainer(am, [Ex("w1", 0)], FAST, seed=0).train_steps(0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_pick_device_without_cuda() -> None:
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as info:
            pick_device(setting)
        assert info.value.field == "train.device"
        assert "torch.cuda.is_available() is False" in str(info.value)


def test_threads_for() -> None:
    assert threads_for(3, 8) == 3
    assert threads_for(0, 1) >= 1
    assert threads_for(0, 10_000) == 1
    assert threads_for(0, 2) == max(1, threads_for(0, 1) // 2)
    with pytest.raises(LocalProtocolError):
        threads_for(0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_keeps_fp32_adapter(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    trainer = Trainer(am, topic_examples(64, seed=0), TrainSettings(device="cuda", lr=3e-2), seed=0)
    assert trainer.device.type == "cuda"
    before = get_state(am)
    loss = trainer.train_steps(3)
    assert math.isfinite(loss)
    for param in trainer.params:
        assert param.dtype == torch.float32 and param.device.type == "cuda"
    state = get_state(am)
    assert all(v.dtype == np.float32 and isinstance(v, np.ndarray) for v in state.values())
    assert any(not np.array_equal(state[k], before[k]) for k in state)
    set_state(am, before)  # host -> device copy into the live parameters
    for name, value in get_state(am).items():
        np.testing.assert_array_equal(value, before[name])
    metrics = trainer.evaluate(topic_examples(10, seed=1))
    assert 0.0 <= metrics["accuracy"] <= 1.0
