from __future__ import annotations

import json
import pathlib
import shutil
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import make_tiny_bert
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.learn.adapter import (
    AdapterModel,
    LoraSettings,
    ModelSettings,
    adapter_fingerprint,
    build_adapter_model,
    fingerprint_document,
    get_state,
    save_adapter,
    set_state,
    snapshot_state,
)

LORA = LoraSettings(rank=4, alpha=8.0)
LLAMA_LORA = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def build_cls(
    model_dir: pathlib.Path, *, seed: int = 7, lora: LoraSettings = LORA, labels: int = 3
) -> AdapterModel:
    return build_adapter_model(ModelSettings(str(model_dir), num_labels=labels), lora, seed=seed)


def random_state(am: AdapterModel, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in am.schema}


def test_same_seed_gives_identical_initial_adapter(tiny_bert_dir: pathlib.Path) -> None:
    a = get_state(build_cls(tiny_bert_dir))
    torch.manual_seed(12345)  # whatever ran before in this process must not matter
    torch.rand(1000)
    b = get_state(build_cls(tiny_bert_dir))
    assert a.keys() == b.keys()
    assert any(k.endswith("classifier.weight") for k in a)  # the head is gossiped state
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_different_seed_gives_different_a_and_head(tiny_bert_dir: pathlib.Path) -> None:
    a, b = get_state(build_cls(tiny_bert_dir, seed=1)), get_state(build_cls(tiny_bert_dir, seed=2))
    for name in a:
        if "lora_B" in name or name.endswith("bias"):
            np.testing.assert_array_equal(a[name], b[name])  # B and biases start at zero
        else:
            assert not np.array_equal(a[name], b[name]), name


def test_schema_matches_state(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    state = get_state(am)
    assert [s.name for s in am.schema] == sorted(state)
    for spec in am.schema:
        assert spec.dtype == "float32"
        assert state[spec.name].shape == spec.shape
        assert state[spec.name].dtype == np.float32 and state[spec.name].flags.c_contiguous
    # 2 layers x (query, value) x (A, B) + classifier weight and bias
    assert len(am.schema) == 10
    assert len(am.fingerprint) == 32


def test_get_state_returns_copies(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    first = get_state(am)
    for value in first.values():
        value[...] = value + 1.0
    second = get_state(am)
    assert all(not np.array_equal(first[k], second[k]) for k in first)


def test_a_snapshot_keeps_the_state_it_was_taken_at(tiny_bert_dir: pathlib.Path) -> None:
    """An overlapped node snapshots, trains on, and brings the snapshot to the host later."""
    am = build_cls(tiny_bert_dir)
    before = get_state(am)
    later = snapshot_state(am)
    set_state(am, random_state(am, 3))  # training moves the live parameters
    taken = later()
    assert taken.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(taken[name], before[name])
        assert taken[name].dtype == np.float32 and taken[name].flags.c_contiguous
    assert any(not np.array_equal(get_state(am)[name], before[name]) for name in before)


def test_set_state_round_trip_in_place(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    params = [p for p in am.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = [(id(p), p.data_ptr()) for p in params]
    state = random_state(am, 0)
    for value in state.values():
        value.setflags(write=False)  # wire tensors are read-only views
    set_state(am, state)
    got = get_state(am)
    for name in state:
        np.testing.assert_array_equal(got[name], state[name])
    after = [p for p in am.model.parameters() if p.requires_grad]
    assert [(id(p), p.data_ptr()) for p in after] == before
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in after]


def test_set_state_accepts_float64(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    state = {k: v.astype(np.float64) for k, v in random_state(am, 1).items()}
    set_state(am, state)
    for name, value in get_state(am).items():
        np.testing.assert_allclose(value, state[name], rtol=1e-6)


def test_set_state_rejects_bad_input_without_touching_params(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    original = get_state(am)
    good = random_state(am, 2)
    name = am.schema[0].name
    missing = dict(good)
    del missing[name]
    extra = {**good, "base_model.model.evil.weight": np.zeros(3, np.float32)}
    wrong_shape = {**good, name: np.zeros((1, 2), np.float32)}
    wrong_dtype = {**good, name: good[name].astype(np.int32)}
    for bad in (missing, extra, wrong_shape, wrong_dtype):
        with pytest.raises(LocalProtocolError):
            set_state(am, bad)
    for key, value in get_state(am).items():
        np.testing.assert_array_equal(value, original[key])


def test_fingerprint_stable_across_builds_and_paths(
    tiny_bert_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    copy = shutil.copytree(tiny_bert_dir, tmp_path / "elsewhere" / "same-model")
    a, b, c = build_cls(tiny_bert_dir), build_cls(tiny_bert_dir), build_cls(copy)
    assert a.fingerprint == b.fingerprint == c.fingerprint
    doc = json.dumps(fingerprint_document(a.settings, a.lora, tiny_bert_dir, a.schema, "classification"))
    assert str(tiny_bert_dir) not in doc and "transformers_version" not in doc


def test_fingerprint_changes_with_identity(tiny_bert_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    base = build_cls(tiny_bert_dir).fingerprint
    other_weights = make_tiny_bert(tmp_path / "other", seed=1)
    variants = [
        build_cls(tiny_bert_dir, lora=LoraSettings(rank=2, alpha=8.0)),
        build_cls(
            tiny_bert_dir, lora=LoraSettings(rank=4, alpha=8.0, target_modules=("query", "key", "value"))
        ),
        build_cls(tiny_bert_dir, labels=4),
        build_cls(other_weights),
    ]
    prints = [base] + [am.fingerprint for am in variants]
    assert len(set(prints)) == len(prints)


def test_fingerprint_ignores_target_order(tiny_bert_dir: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    swapped = LoraSettings(rank=4, alpha=8.0, target_modules=("value", "query"))
    assert (
        adapter_fingerprint(am.settings, swapped, tiny_bert_dir, am.schema, "classification")
        == am.fingerprint
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_save_adapter_loads_with_plain_peft(tiny_bert_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    am = build_cls(tiny_bert_dir)
    set_state(am, random_state(am, 3))
    out = tmp_path / "adapter"
    save_adapter(am, out)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}

    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    loaded = PeftModel.from_pretrained(base, out)
    reloaded = AdapterModel(loaded, am.tokenizer, am.settings, am.lora, am.schema, am.fingerprint)
    expected, got = get_state(am), get_state(reloaded)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    enc = am.tokenizer(["w1 w2 apple w3"], return_tensors="pt")
    am.model.eval()
    loaded.eval()
    with torch.no_grad():
        want = am.model(**enc).logits
        have = loaded(**enc).logits
    torch.testing.assert_close(have, want)


def test_causal_lm_llama(tiny_llama_dir: pathlib.Path) -> None:
    settings = ModelSettings(str(tiny_llama_dir), task="causal-lm")
    a = build_adapter_model(settings, LLAMA_LORA, seed=3)
    b = build_adapter_model(settings, LLAMA_LORA, seed=3)
    assert a.tokenizer.pad_token == a.tokenizer.eos_token  # the tokenizer had no pad token
    names = [s.name for s in a.schema]
    assert len(names) == 8 and all(("q_proj" in n or "v_proj" in n) for n in names)
    sa, sb = get_state(a), get_state(b)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name])
    assert a.fingerprint == b.fingerprint
    set_state(a, random_state(a, 4))
    enc = a.tokenizer(["w1 w2 w3"], return_tensors="pt")
    with torch.no_grad():
        logits = a.model(input_ids=enc["input_ids"]).logits
    assert logits.shape == (1, 3, a.model.config.vocab_size)


def test_missing_model_dir(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_adapter_model(ModelSettings(str(tmp_path / "nope"), num_labels=2), LORA, seed=0)
    assert info.value.field == "model.path" and "does not exist" in str(info.value)


def test_directory_that_is_not_a_model(tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError) as info:
        build_adapter_model(ModelSettings(str(tmp_path), num_labels=2), LORA, seed=0)
    assert info.value.field == "model.path"


def test_unknown_target_modules(tiny_bert_dir: pathlib.Path) -> None:
    with pytest.raises(ConfigError) as info:
        build_cls(tiny_bert_dir, lora=LoraSettings(target_modules=("q_proj",)))
    assert info.value.field == "lora.target_modules"
    assert "\n" not in str(info.value)


def test_packaged_minilm_classifier() -> None:
    start = time.perf_counter()
    am = build_adapter_model(ModelSettings("minilm", num_labels=5), LoraSettings(), seed=0)
    elapsed = time.perf_counter() - start
    state = get_state(am)
    nbytes = sum(v.nbytes for v in state.values())
    # 6 layers x (query, value) x (A 8x384 + B 384x8) + classifier 5x384 + 5
    assert len(state) == 6 * 2 * 2 + 2
    assert nbytes == 4 * (6 * 2 * 2 * 8 * 384 + 5 * 384 + 5)  # 302,612 bytes, ~0.3 MB
    assert sum(s.nbytes for s in am.schema) == nbytes
    # Pinned (docs/training.md): a change means nodes on different versions would refuse each other.
    assert am.fingerprint.hex() == "3d9ce562f925c18e55d878d78728d42ea72a2ce71a88b898f983129ab11511f7"
    assert elapsed < 30


def _copy_without(model_dir: pathlib.Path, out: pathlib.Path, drop: Callable[[str], bool]) -> list[str]:
    """Copy a model folder, leaving out of model.safetensors the weights ``drop`` picks; their names."""
    import safetensors.numpy  # noqa: PLC0415

    shutil.copytree(model_dir, out)
    weights = safetensors.numpy.load_file(str(out / "model.safetensors"))
    dropped = sorted(name for name in weights if drop(name))
    safetensors.numpy.save_file(
        {k: v for k, v in weights.items() if k not in dropped}, str(out / "model.safetensors")
    )
    return dropped


def test_a_checkpoint_missing_body_weights_is_refused(
    tiny_bert_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Only a classifier's new head may be missing: a lost encoder weight would be trained on as noise."""
    dropped = _copy_without(
        tiny_bert_dir, tmp_path / "broken", lambda name: "layer.0.attention.self.query.weight" in name
    )
    assert len(dropped) == 1
    with pytest.raises(ConfigError) as info:
        build_cls(tmp_path / "broken")
    assert info.value.field == "model.path" and "query.weight" in str(info.value)
    build_cls(tiny_bert_dir)  # the intact one: only the new classifier head is missing, which is fine


def test_a_causal_lm_missing_its_head_is_refused(
    tiny_llama_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    dropped = _copy_without(tiny_llama_dir, tmp_path / "broken", lambda name: name.startswith("lm_head."))
    assert dropped, "the tiny llama must have an untied head for this test to mean anything"
    with pytest.raises(ConfigError) as info:
        build_adapter_model(ModelSettings(str(tmp_path / "broken"), task="causal-lm"), LLAMA_LORA, seed=0)
    assert info.value.field == "model.path" and "lm_head" in str(info.value)
