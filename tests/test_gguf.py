"""The GGUF path of build_adapter_model, on a tiny llama GGUF written in the test (no downloads).

The file is what llama.cpp's converter would write for a 2-layer Llama: tensors
under GGUF names (``blk.N.attn_q.weight``, ...), q/k rows permuted the way
``convert_hf_to_gguf.py`` permutes them, no ``output.weight`` (tied embeddings)
and a byte-level BPE ("gpt2") tokenizer in the metadata. Loading it must give
back exactly the Hugging Face weights it was made from.
"""

from __future__ import annotations

import math
import pathlib
import shutil
from typing import Any

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from p2pfm.config.settings import LoraSettings, ModelSettings, TrainSettings  # noqa: E402
from p2pfm.core.errors import ConfigError  # noqa: E402
from p2pfm.learn.adapter import (  # noqa: E402
    AdapterModel,
    _cast_to_float32,
    build_adapter_model,
    get_state,
)
from p2pfm.learn.data import Example  # noqa: E402
from p2pfm.learn.train import Trainer  # noqa: E402

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
RMS_EPS, ROPE_THETA, CONTEXT = 1e-5, 5000.0, 128  # not LlamaConfig's defaults: must come from the file
RANK = 4
LORA = LoraSettings(rank=RANK, alpha=8.0, target_modules=("q_proj", "v_proj"))
FILE = "tiny.gguf"
EOS = "<|endoftext|>"

# Byte-level BPE: <|endoftext|> (control), the 256 byte symbols, then " w" and " w0".." w9".
MERGES = ["Ġ w"] + [f"Ġw {d}" for d in range(10)]
BYTE_SYMBOLS: list[str] = list(bytes_to_unicode().values())  # type: ignore[no-untyped-call]
TOKENS = [EOS, *BYTE_SYMBOLS, "Ġw", *(f"Ġw{d}" for d in range(10))]
VOCAB = len(TOKENS)  # 268

Weights = dict[str, np.ndarray[Any, np.dtype[np.float32]]]


def _permute_like_llama_cpp(w: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """convert_hf_to_gguf.py's q/k row order (rotary halves interleaved); transformers undoes it on load."""
    split = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(w.shape))


def _hf_to_gguf_names(layer: int) -> dict[str, str]:
    prefix = f"model.layers.{layer}."
    return {
        prefix + "input_layernorm.weight": f"blk.{layer}.attn_norm.weight",
        prefix + "self_attn.q_proj.weight": f"blk.{layer}.attn_q.weight",
        prefix + "self_attn.k_proj.weight": f"blk.{layer}.attn_k.weight",
        prefix + "self_attn.v_proj.weight": f"blk.{layer}.attn_v.weight",
        prefix + "self_attn.o_proj.weight": f"blk.{layer}.attn_output.weight",
        prefix + "post_attention_layernorm.weight": f"blk.{layer}.ffn_norm.weight",
        prefix + "mlp.gate_proj.weight": f"blk.{layer}.ffn_gate.weight",
        prefix + "mlp.up_proj.weight": f"blk.{layer}.ffn_up.weight",
        prefix + "mlp.down_proj.weight": f"blk.{layer}.ffn_down.weight",
    }


def write_tiny_gguf(
    path: pathlib.Path, *, seed: int, dtype: str = "F32", drop: tuple[str, ...] = ()
) -> Weights:
    """Write a tiny llama GGUF; returns the HF-named float32 weights loading it must reproduce.

    ``dtype`` is how the 2-D weights are stored: "F32", "F16" or "Q8_0" (norms are always F32,
    as llama.cpp keeps them). The returned weights are the stored values as float32, i.e.
    already rounded to F16 or quantised and dequantised to Q8_0.
    """
    rng = np.random.default_rng(seed)
    hf: Weights = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, HIDDEN)).astype(np.float32)}
    shapes = {
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj.weight": (FFN, HIDDEN),
        "mlp.up_proj.weight": (FFN, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, FFN),
    }
    names: dict[str, str] = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    for layer in range(LAYERS):
        names.update(_hf_to_gguf_names(layer))
        for suffix, shape in shapes.items():
            hf[f"model.layers.{layer}.{suffix}"] = rng.normal(0, 0.2, shape).astype(np.float32)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            hf[f"model.layers.{layer}.{norm}.weight"] = (1 + rng.normal(0, 0.1, HIDDEN)).astype(np.float32)
    hf["model.norm.weight"] = (1 + rng.normal(0, 0.1, HIDDEN)).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-test-llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (VOCAB - 1))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)  # and no padding token: build_adapter_model must fall back to eos

    expected: Weights = {}
    for hf_name, value in hf.items():
        if hf_name in drop:  # a truncated file: the tensor is not written
            continue
        stored = value
        if hf_name.endswith("q_proj.weight"):
            stored = _permute_like_llama_cpp(value, HEADS)
        elif hf_name.endswith("k_proj.weight"):
            stored = _permute_like_llama_cpp(value, KV_HEADS)
        if value.ndim == 1 or dtype == "F32":
            writer.add_tensor(names[hf_name], np.ascontiguousarray(stored))
            expected[hf_name] = value
        elif dtype == "F16":
            writer.add_tensor(names[hf_name], np.ascontiguousarray(stored.astype(np.float16)))
            expected[hf_name] = value.astype(np.float16).astype(np.float32)
        else:
            qtype = gguf.GGMLQuantizationType[dtype]
            writer.add_tensor(names[hf_name], gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            # Blocks run along a row, and the permutation only reorders rows: quantising the
            # permuted matrix and un-permuting it gives the quantised original.
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def make_gguf_dir(out: pathlib.Path, *, seed: int = 0, dtype: str = "F32") -> tuple[pathlib.Path, Weights]:
    out.mkdir(parents=True, exist_ok=True)
    return out, write_tiny_gguf(out / FILE, seed=seed, dtype=dtype)


def build(model_dir: pathlib.Path, seed: int = 0) -> AdapterModel:
    settings = ModelSettings(str(model_dir), task="causal-lm", gguf_file=FILE)
    return build_adapter_model(settings, LORA, seed=seed)


def base_state(am: AdapterModel) -> dict[str, torch.Tensor]:
    """The frozen base model's weights under their plain transformers names (LoRA tensors left out)."""
    state = am.model.get_base_model().state_dict()  # type: ignore[operator]
    return {name.replace(".base_layer.", "."): t for name, t in state.items() if ".lora_" not in name}


@pytest.fixture(scope="module")
def gguf_f32(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, Weights]:
    return make_gguf_dir(tmp_path_factory.mktemp("gguf-f32"))


@pytest.fixture(scope="module")
def gguf_am(gguf_f32: tuple[pathlib.Path, Weights]) -> AdapterModel:
    return build(gguf_f32[0])


def lm_texts(n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = int(rng.integers(0, 80))
        out.append(Example(" ".join(f"w{start + k}" for k in range(int(rng.integers(4, 10)))), None))
    return out


# ------------------------------------------------------------------- building


def test_build_on_gguf_gives_float32_lora_model(gguf_am: AdapterModel) -> None:
    am = gguf_am
    params = dict(am.model.named_parameters())
    assert params and {p.dtype for p in params.values()} == {torch.float32}
    assert {n for n, p in params.items() if p.requires_grad} == {
        n for n in params if ".lora_A." in n or ".lora_B." in n
    }

    config = am.model.get_base_model().config  # type: ignore[operator]
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", HIDDEN, LAYERS)
    assert (config.num_attention_heads, config.num_key_value_heads) == (HEADS, KV_HEADS)
    assert (config.vocab_size, config.intermediate_size, config.tie_word_embeddings) == (VOCAB, FFN, True)

    expected = {}
    for layer in range(LAYERS):
        prefix = f"base_model.model.model.layers.{layer}.self_attn."
        expected[prefix + "q_proj.lora_A.weight"] = (RANK, HIDDEN)
        expected[prefix + "q_proj.lora_B.weight"] = (HEADS * HEAD_DIM, RANK)
        expected[prefix + "v_proj.lora_A.weight"] = (RANK, HIDDEN)
        expected[prefix + "v_proj.lora_B.weight"] = (KV_HEADS * HEAD_DIM, RANK)
    assert {spec.name: spec.shape for spec in am.schema} == expected
    assert {spec.dtype for spec in am.schema} == {"float32"}
    assert [spec.name for spec in am.schema] == sorted(expected)
    assert len(am.fingerprint) == 32

    state = get_state(am)
    for name, value in state.items():
        assert value.dtype == np.float32 and value.shape == expected[name]
        if ".lora_B." in name:
            assert not value.any(), name  # B starts at zero: the adapter is a no-op until trained
        else:
            assert np.abs(value).max() > 0, name


def test_tokenizer_from_gguf_metadata(gguf_am: AdapterModel) -> None:
    tok = gguf_am.tokenizer
    assert tok.eos_token == EOS and tok.pad_token == EOS  # the file has no pad token: pad := eos
    assert gguf_am.model.get_base_model().config.pad_token_id == 0  # type: ignore[operator]
    ids = tok("w1 w2 w35")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["w", "1", "Ġw", "2", "Ġw", "3", "5"]  # the merges apply
    assert tok.decode(ids) == "w1 w2 w35"
    assert tok(EOS)["input_ids"] == [0]  # a control token stays whole


def test_same_seed_same_initial_adapter(
    gguf_f32: tuple[pathlib.Path, Weights], gguf_am: AdapterModel
) -> None:
    again = build(gguf_f32[0], seed=0)
    other = build(gguf_f32[0], seed=1)
    first, second, third = get_state(gguf_am), get_state(again), get_state(other)
    assert first.keys() == second.keys() == third.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    assert any(not np.array_equal(first[n], third[n]) for n in first if ".lora_A." in n)
    # Without lora.freeze_a the seed is not part of the fingerprint.
    assert again.fingerprint == gguf_am.fingerprint == other.fingerprint


def test_cast_to_float32_on_a_gguf_model_in_half_precision(gguf_f32: tuple[pathlib.Path, Weights]) -> None:
    """transformers counts a GGUF model as quantized and refuses ``.float()``; the per-tensor cast works."""
    model_dir, expected = gguf_f32
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=FILE, dtype=torch.float16)
    assert model.is_quantized and model.dtype == torch.float16
    with pytest.raises(ValueError, match="not supported for quantized model"):
        model.float()  # type: ignore[no-untyped-call]

    _cast_to_float32(model)
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == torch.float32 for t in tensors if t.is_floating_point())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    embed = expected["model.embed_tokens.weight"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), embed)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.float32


# ------------------------------------------------------------- loaded weights


def _reference_llama(weights: Weights) -> LlamaForCausalLM:
    """The same model built directly in transformers, without any GGUF involved."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(
        {name: torch.from_numpy(value) for name, value in weights.items()}, strict=False
    )
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    model.eval()  # type: ignore[no-untyped-call]
    return model


@pytest.mark.parametrize("dtype", ["F32", "F16", "Q8_0"])
def test_loaded_weights_equal_the_file(tmp_path: pathlib.Path, dtype: str) -> None:
    model_dir, expected = make_gguf_dir(tmp_path, seed=3, dtype=dtype)
    am = build(model_dir)
    loaded = base_state(am)

    # Every weight in the file arrives under its transformers name, q/k un-permuted, as float32.
    for name, value in expected.items():
        assert loaded[name].dtype == torch.float32, name
        np.testing.assert_allclose(loaded[name].numpy(), value, rtol=0, atol=1e-6, err_msg=name)
    # Tied head: the embedding matrix, not a random init (the file has no output.weight).
    np.testing.assert_array_equal(loaded["lm_head.weight"].numpy(), expected["model.embed_tokens.weight"])
    assert set(loaded) == {*expected, "lm_head.weight"}

    if dtype == "Q8_0":  # dequantised values, not the originals: the test really went through Q8_0
        original = write_tiny_gguf(tmp_path / "f32.gguf", seed=3)
        q = "model.layers.1.self_attn.q_proj.weight"
        error = np.abs(expected[q] - original[q]).max()
        assert 0 < error < 0.01, error

    # The whole model computes what a plain transformers Llama with these weights computes, so
    # the config read from the metadata (heads, rope, eps) is right too; B = 0 makes LoRA a no-op.
    reference = _reference_llama(expected)
    batch = dict(am.tokenizer(["w1 w2 w3 w4 w5", "w40 w41 w42 w43"], padding=True, return_tensors="pt"))
    am.model.eval()
    with torch.no_grad():
        got = am.model(**batch).logits
        want = reference(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ training


def test_trainer_runs_on_gguf_model(gguf_f32: tuple[pathlib.Path, Weights]) -> None:
    am = build(gguf_f32[0])
    embed_before = base_state(am)["model.embed_tokens.weight"].clone()
    before = get_state(am)
    settings = TrainSettings(batch_size=4, lr=3e-2, max_length=16, device="cpu", threads=1, precision="fp32")
    trainer = Trainer(am, lm_texts(16, seed=0), settings, seed=0)

    loss = trainer.train_steps(2)
    assert trainer.step == 2
    assert math.isfinite(loss) and loss > 0
    metrics = trainer.evaluate(lm_texts(8, seed=1))
    assert set(metrics) == {"loss", "perplexity"}
    assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] > 1.0
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))

    after = get_state(am)
    for name in before:
        assert not np.array_equal(before[name], after[name]), f"{name} did not change"
        assert np.isfinite(after[name]).all(), name
    # Only the adapter trains: the dequantised base weights stay as loaded.
    torch.testing.assert_close(base_state(am)["model.embed_tokens.weight"], embed_before, rtol=0, atol=0)


# --------------------------------------------------------------- fingerprint


def test_fingerprint_follows_the_gguf_bytes(
    tmp_path: pathlib.Path, gguf_f32: tuple[pathlib.Path, Weights], gguf_am: AdapterModel
) -> None:
    # The same bytes elsewhere (and another *.gguf beside them): the same identity.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copyfile(gguf_f32[0] / FILE, copy / FILE)
    (copy / "unrelated.gguf").write_bytes(b"not the model")
    assert build(copy).fingerprint == gguf_am.fingerprint

    # Same architecture and tokenizer, other weights: another base model.
    other_dir, _ = make_gguf_dir(tmp_path / "other", seed=1)
    other = build(other_dir)
    assert other.schema == gguf_am.schema
    assert other.fingerprint != gguf_am.fingerprint

    # The same weights stored as F16 are other bytes too.
    f16_dir, _ = make_gguf_dir(tmp_path / "f16", seed=0, dtype="F16")
    assert build(f16_dir).fingerprint not in {gguf_am.fingerprint, other.fingerprint}


def test_a_gguf_file_missing_a_tensor_is_refused(tmp_path: pathlib.Path) -> None:
    """transformers would fill the gap with random weights; the build refuses instead."""
    write_tiny_gguf(tmp_path / FILE, seed=0, drop=("model.layers.1.mlp.down_proj.weight",))
    with pytest.raises(ConfigError) as info:
        build(tmp_path)
    assert info.value.field == "model.path"
    assert "model.layers.1.mlp.down_proj.weight" in str(info.value) and "lacks 1 weight" in str(info.value)
