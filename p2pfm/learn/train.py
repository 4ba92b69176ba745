"""Local training and evaluation of a node's LoRA adapter on its own data shard.

One gossip round runs ``train_steps(K)`` (K AdamW steps on the shard), then
the node publishes ``adapter.get_state``, mixes, and ``adapter.set_state``
writes the mixed tensors back *in place*, so the optimizer keeps its
references (and its moments, which are local and never gossiped).

Shapes: a batch is ``input_ids``/``attention_mask`` of ``(B, T)`` with
``T <= max_length`` (padded to the longest text of the batch). Classification
logits are ``(B, num_labels)``; causal-LM logits are ``(B, T, vocab)`` and
position t predicts token t+1.

This module never imports peft: the model is whatever ``adapter.build_adapter_model`` built.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from p2pfm.config.settings import TrainSettings
from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.learn.adapter import AdapterModel, params_by_name

_STATE_VERSION = 1


class ExampleLike(Protocol):
    """What training reads from an example (``p2pfm.learn.data.Example`` satisfies it)."""

    @property
    def text(self) -> str: ...

    @property
    def label(self) -> int | None: ...


def pick_device(setting: str) -> torch.device:
    """Resolve ``TrainSettings.device`` (its form is checked by the schema).

    "auto" prefers CUDA; asking for CUDA without it is an error.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device", "CUDA was requested but torch.cuda.is_available() is False")
    device = torch.device(setting)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            "train.device", f"{setting} does not exist: {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs that do bf16 matmuls in hardware (Linux /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def pick_precision(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``TrainSettings.precision`` on ``device`` (None = plain fp32).

    On CPUs without native bf16, autocast emulates it and runs slower than fp32,
    so "auto" only picks bf16 where the hardware has it.
    """
    if setting == "fp32":
        return None
    if setting == "bf16" or device.type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def threads_for(setting: int, nodes_on_machine: int) -> int:
    """Torch intra-op threads for one node process.

    Several node processes often share a machine (local scenarios). Each
    torch process defaults to one thread per core, so N processes would run
    N x cores threads that preempt each other mid-GEMM and everyone slows
    down; giving each node ``cores // N`` keeps the total at the core count.
    """
    if type(nodes_on_machine) is not int or nodes_on_machine < 1:
        raise LocalProtocolError(f"nodes_on_machine must be an integer >= 1, got {nodes_on_machine!r}")
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))  # honours taskset / container CPU sets
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // nodes_on_machine)


def _to_cpu(obj: Any) -> Any:
    """Deep copy of a (nested) optimizer state with every tensor cloned onto the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {key: _to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(value) for value in obj)
    return obj


class Trainer:
    """AdamW on the adapter's trainable tensors, over shuffled epochs of a node's shard."""

    def __init__(
        self,
        am: AdapterModel,
        train: Sequence[ExampleLike],
        settings: TrainSettings,
        *,
        seed: int,
        nodes_on_machine: int = 1,
    ) -> None:
        if len(train) == 0:
            raise LocalProtocolError("the training shard is empty")
        self.am = am
        self.train = train
        self.settings = settings
        self.task = am.settings.task
        self.num_labels = am.settings.num_labels
        if self.task == "classification":
            for example in train:
                self._check_label(example)
        torch.set_num_threads(threads_for(settings.threads, nodes_on_machine))
        self.device = pick_device(settings.device)
        self.autocast_dtype = pick_precision(settings.precision, self.device)
        am.model.to(self.device)  # moves parameters in place: Parameter objects keep their identity
        am.model.train()
        self.params = [p for p in am.model.parameters() if p.requires_grad]
        self._prior_logits = self._label_prior_logits(settings.logit_adjustment)
        self.optimizer: torch.optim.Optimizer = (
            torch.optim.AdamW(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
            if settings.optimizer == "adamw"
            else torch.optim.SGD(self.params, lr=settings.lr, weight_decay=settings.weight_decay)
        )
        # Dropout draws from torch's global RNG; seeding it makes a node's run reproducible and
        # state_dict() saves it, so a resumed run draws the same masks.
        torch.manual_seed(seed)
        self._rng = np.random.default_rng(seed)  # batch sampling only
        self._order = self._rng.permutation(len(train))
        self._pos = 0
        self.step = 0

    def _label_prior_logits(self, tau: float) -> torch.Tensor | None:
        """``tau * log(prior)`` of the shard's labels (add-one smoothed), or None without adjustment.

        Training on ``logits + tau * log(prior)`` makes the model learn the
        labels' likelihoods instead of this shard's label frequencies, so a
        node that holds few examples of a topic does not learn to avoid it;
        evaluation uses the plain logits (logit adjustment, Menon et al. 2021).
        """
        if tau == 0.0 or self.task != "classification" or self.num_labels is None:
            return None
        counts = np.bincount([self._check_label(ex) for ex in self.train], minlength=self.num_labels)
        prior = (counts + 1.0) / (counts.sum() + self.num_labels)
        return torch.tensor(tau * np.log(prior), dtype=torch.float32, device=self.device)

    # ----------------------------------------------------------------- batches

    def _check_label(self, example: ExampleLike) -> int:
        label = example.label
        if type(label) is not int or self.num_labels is None or not 0 <= label < self.num_labels:
            raise LocalProtocolError(
                f"classification label must be an int in [0, {self.num_labels}), got {label!r}"
            )
        return label

    def _next_indices(self) -> list[int]:
        """The next ``batch_size`` shard indices; a new permutation starts when an epoch ends."""
        out: list[int] = []
        while len(out) < self.settings.batch_size:
            if self._pos == len(self._order):
                self._order = self._rng.permutation(len(self.train))
                self._pos = 0
            take = min(self.settings.batch_size - len(out), len(self._order) - self._pos)
            out.extend(int(i) for i in self._order[self._pos : self._pos + take])
            self._pos += take
        return out

    def _encode(self, batch: Sequence[ExampleLike]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both (B, T) int64 on the training device."""
        enc = self.am.tokenizer(
            [ex.text for ex in batch],
            truncation=True,
            max_length=self.settings.max_length,
            padding="longest",
            return_tensors="pt",
        )
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        return input_ids, attention_mask

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 matmuls when ``autocast_dtype`` is set; the fp32 adapter and optimizer state are unchanged."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss_sum(
        self, batch: Sequence[ExampleLike], *, training: bool = False
    ) -> tuple[torch.Tensor, int, torch.Tensor | None]:
        """Summed cross-entropy, the number of terms in it, and (classification) the logits (B, C)."""
        input_ids, attention_mask = self._encode(batch)
        with self._autocast():
            logits = self.am.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.task == "classification":
            labels = torch.tensor([self._check_label(ex) for ex in batch], device=self.device)
            adjusted = logits.float()
            if training and self._prior_logits is not None:  # logit adjustment: training only
                adjusted = adjusted + self._prior_logits
            loss = F.cross_entropy(adjusted, labels, reduction="sum")
            return loss, len(batch), logits
        # causal-lm: labels = input_ids with padding set to -100; position t predicts t+1.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        shifted = logits[:, :-1, :].float()  # (B, T-1, V)
        targets = labels[:, 1:]  # (B, T-1)
        loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="sum")
        return loss, int((targets != -100).sum().item()), None

    # ---------------------------------------------------------------- training

    def train_steps(self, steps: int, correction: Mapping[str, np.ndarray[Any, Any]] | None = None) -> float:
        """Run ``steps`` optimizer steps; returns the mean of their (per-token / per-example) losses.

        ``correction`` (adapter state names -> arrays of their shapes) is
        added to the parameters after every step: the drift correction of
        p2pfm/learn/algorithm.py.
        """
        if type(steps) is not int or steps < 1:
            raise LocalProtocolError(f"steps must be an integer >= 1, got {steps!r}")
        nudges = self._nudges(correction)
        self.am.model.train()
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            batch = [self.train[i] for i in self._next_indices()]
            loss_sum, count = self._loss_sum(batch, training=True)[:2]
            loss = loss_sum / max(count, 1)  # a batch of one-token texts has nothing to predict
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            if nudges:
                with torch.no_grad():
                    for param, nudge in nudges:
                        param.add_(nudge)
            total += loss.detach()
            self.step += 1
        return float(total.item()) / steps

    def _nudges(
        self, correction: Mapping[str, np.ndarray[Any, Any]] | None
    ) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """The correction as (parameter, tensor on its device) pairs, checked against the schema."""
        if not correction:
            return []
        params = params_by_name(self.am.model, frozen_a=self.am.lora.freeze_a)
        out = []
        for name, value in correction.items():
            param = params.get(name)
            if param is None or tuple(value.shape) != tuple(param.shape):
                raise LocalProtocolError(f"correction tensor {name!r} does not match the adapter")
            out.append((param, torch.from_numpy(np.ascontiguousarray(value, np.float32)).to(param.device)))
        return out

    @torch.no_grad()
    def evaluate(self, test: Sequence[ExampleLike]) -> dict[str, float]:
        """Classification: {"accuracy", "loss"} (mean per example).

        Causal LM: {"loss", "perplexity"}, loss being the token-weighted mean
        over predicted non-pad tokens and perplexity its exp.
        """
        if len(test) == 0:
            raise LocalProtocolError("the evaluation set is empty")
        was_training = self.am.model.training
        self.am.model.eval()
        # inference_mode: no autograd graph, so no activations kept for a backward pass.
        try:
            with torch.inference_mode():
                loss_sum, count, correct = 0.0, 0, 0
                size = self.settings.eval_batch_size
                for start in range(0, len(test), size):
                    batch = test[start : start + size]
                    loss, n, logits = self._loss_sum(batch)
                    loss_sum += float(loss.item())
                    count += n
                    if logits is not None:
                        labels = torch.tensor([ex.label for ex in batch], device=logits.device)
                        correct += int((logits.argmax(dim=-1) == labels).sum().item())
        finally:
            self.am.model.train(was_training)
        if count == 0:
            raise LocalProtocolError("the evaluation set has no token to predict")
        mean = loss_sum / count
        if self.task == "classification":
            return {"accuracy": correct / count, "loss": mean}
        return {"loss": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf}

    # ------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything but the adapter needed to resume exactly (a local file, never network bytes)."""
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "train_size": len(self.train),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "sampler": {"order": [int(i) for i in self._order], "pos": self._pos},
            "numpy_rng": self._rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_random": random.getstate(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; the next batches and moments match an uninterrupted run.

        The adapter itself is restored separately (``adapter.set_state``).
        """
        if state.get("version") != _STATE_VERSION:
            raise LocalProtocolError(f"unsupported trainer state version {state.get('version')!r}")
        if state["train_size"] != len(self.train):
            raise LocalProtocolError(
                f"trainer state is for a shard of {state['train_size']} examples, "
                f"this one has {len(self.train)}"
            )
        self.optimizer.load_state_dict(state["optimizer"])  # moves moments to the params' device
        self.step = int(state["step"])
        self._order = np.asarray(state["sampler"]["order"], dtype=np.int64)
        self._pos = int(state["sampler"]["pos"])
        self._rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        cuda_rng = state["cuda_rng"]
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(state["python_random"])
