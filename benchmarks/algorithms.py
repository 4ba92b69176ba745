"""Gossip learning algorithms side by side on the real model and data, in one process.

Each variant runs N LoRA learners (the packaged MiniLM on BBC News,
Dirichlet label skew) through synchronous gossip rounds: every node trains
``--steps`` local steps, the updates are mixed with the topology's
Metropolis-Hastings matrix (exactly what the nodes' ``mean`` rule computes
when everyone is heard), and the node's algorithm (p2pfm/learn/algorithm.py)
turns the mix into its next state. A pooled model trains on the union of the
shards with the same steps and settings in the same run.

Settings are chosen on a **validation split carved from the training data**
(``--split val``, the default): the test split is never looked at while
choosing. ``--split test`` evaluates the chosen settings on the test split.

A variant is ``key=value`` pairs joined by commas (a bare algorithm name
means ``algorithm=NAME``): ``algorithm`` (dpsgd | diloco | scaffold |
fedadam), ``lr``/``mu`` (gossip.outer_lr / outer_momentum), ``beta``
(gossip.drift_beta), ``la`` (train.logit_adjustment), ``opt``/``inner_lr``
(train.optimizer / train.lr), ``freeze_a`` (0/1, FFA-LoRA), ``cr`` (consensus
rounds at the end: mixing only), ``rounds``/``steps`` (instead of
``--rounds``/``--steps``), ``moments`` (an experiment p2pfm does not ship:
"v" or "mv" also mixes the AdamW moments), ``comp``/``gamma``
(gossip.compression / compression_step: the nodes mix their public
estimates, p2pfm/core/compression.py, chains starting from the shared
initial adapter as real nodes' do; ``bytes`` in the output is the payload
each node sends per neighbour over the run).

``--pooled VARIANT`` takes pooled's train settings from a variant (default
AdamW at 2e-3); ``--balanced-pooled`` trains it on the shards upsampled to
equal size (each node counting equally, as in gossip).

    python benchmarks/algorithms.py --topology ring:4 --alpha 0.3 \\
        dpsgd algorithm=scaffold,beta=0.5 la=1 freeze_a=1,la=1

It prints one line per variant: per-node accuracies, mean, worst, the gap to
pooled and the consensus distance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from p2pfm.config.settings import (
    MINILM,
    DataConfig,
    GossipSettings,
    LoraSettings,
    ModelSettings,
    TrainSettings,
)
from p2pfm.core.compression import COMPRESSIONS, OwnEstimate
from p2pfm.core.consensus import consensus_distance
from p2pfm.core.topology import mixing_matrix, parse_topology
from p2pfm.core.wire import TensorSpec
from p2pfm.learn.adapter import build_adapter_model, get_state, set_state
from p2pfm.learn.algorithm import ALGORITHMS, RoundAlgorithm
from p2pfm.learn.data import Dataset, load_dataset, partition, split_test
from p2pfm.learn.train import Trainer

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Variant:
    text: str
    algorithm: GossipSettings
    logit_adjustment: float = 0.0
    freeze_a: bool = False
    consensus_rounds: int = 0
    mix_moments: str = ""  # "v": also mix AdamW's second moments; "mv": both moments (experiment)
    optimizer: str = "adamw"
    lr: float | None = None  # the local lr (None: the default 2e-3)
    rounds: int | None = None  # None: --rounds
    steps: int | None = None  # None: --steps (rounds x steps should stay the budget)
    compression: str = "none"  # gossip.compression
    gamma: float = 1.0  # gossip.compression_step


def parse_variant(text: str) -> Variant:
    values: dict[str, str] = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if not value and key in ALGORITHMS:
            key, value = "algorithm", key
        values[key] = value or "1"
    algorithm = GossipSettings(
        algorithm=values.pop("algorithm", "dpsgd"),  # type: ignore[arg-type]
        outer_lr=float(values.pop("lr", 1.0)),
        outer_momentum=float(values.pop("mu", 0.0)),
        drift_beta=float(values.pop("beta", 1.0)),
    )
    rounds, steps = values.pop("rounds", None), values.pop("steps", None)
    variant = Variant(
        text,
        algorithm,
        logit_adjustment=float(values.pop("la", 0.0)),
        freeze_a=values.pop("freeze_a", "0") == "1",
        consensus_rounds=int(values.pop("cr", 0)),
        mix_moments=values.pop("moments", ""),
        optimizer=values.pop("opt", "adamw"),
        lr=float(values.pop("inner_lr")) if "inner_lr" in values else None,
        rounds=None if rounds is None else int(rounds),
        steps=None if steps is None else int(steps),
        compression=values.pop("comp", "none"),
        gamma=float(values.pop("gamma", 1.0)),
    )
    if variant.compression not in COMPRESSIONS:
        raise SystemExit(f"unknown compression {variant.compression!r}; one of {', '.join(COMPRESSIONS)}")
    if values:
        raise SystemExit(f"unknown variant keys {sorted(values)} in {text!r}")
    return variant


@dataclass(frozen=True)
class Split:
    evaluation: Dataset
    shards: list[Dataset]

    @property
    def union(self) -> Dataset:
        examples = [example for shard in self.shards for example in shard.examples]
        return Dataset(tuple(examples), self.shards[0].label_names, "union of the shards")

    @property
    def balanced_union(self) -> Dataset:
        """Every shard upsampled (cyclically) to the largest: each node counts equally, as in gossip."""
        size = max(len(shard) for shard in self.shards)
        examples = [shard.examples[i % len(shard)] for shard in self.shards for i in range(size)]
        return Dataset(tuple(examples), self.shards[0].label_names, "balanced union of the shards")


def make_split(n_nodes: int, alpha: float, seed: int, split: str) -> Split:
    """Test split as the scenarios make it; ``val`` carves 15% of the training data off first."""
    dataset = load_dataset("bbc-news", "classification")
    config = DataConfig(alpha=alpha, seed=seed)
    train, test = split_test(dataset, config.test_fraction, config.seed)
    if split == "val":
        train, test = split_test(train, 0.15, config.seed + 1)
    parts = partition(train, n_nodes, "dirichlet", config.seed, alpha=alpha)
    return Split(test, [train.subset(part) for part in parts])


def settings(args: argparse.Namespace, variant: Variant) -> tuple[ModelSettings, LoraSettings, TrainSettings]:
    model = ModelSettings(path=MINILM, task="classification", num_labels=5)
    lora = LoraSettings(freeze_a=variant.freeze_a)
    train = TrainSettings(
        local_steps=args.steps,
        batch_size=args.batch,
        max_length=64,
        threads=args.threads,
        logit_adjustment=variant.logit_adjustment,
        optimizer=variant.optimizer,
        lr=variant.lr or 2e-3,
    )
    return model, lora, train


def run_variant(args: argparse.Namespace, variant: Variant, split: Split) -> dict[str, Any]:
    model_settings, lora, train = settings(args, variant)
    weights = mixing_matrix(parse_topology(args.topology))
    n = weights.shape[0]
    trainers, algorithms = [], []
    for i in range(n):
        am = build_adapter_model(model_settings, lora, seed=args.seed)
        trainers.append(Trainer(am, split.shards[i].examples, train, seed=args.seed * 100_003 + i))
        algorithms.append(RoundAlgorithm(variant.algorithm))
    everyone = frozenset(range(n))
    estimates = [
        OwnEstimate(variant.compression, keyframe_every=10**6, start=get_state(t.am), audience=everyone)  # type: ignore[arg-type]
        for t in trainers
    ]
    sent_bytes = 0  # payload per neighbour, node 0
    started = time.perf_counter()
    curve: list[float] = []
    rounds = variant.rounds or args.rounds
    total_rounds = rounds + variant.consensus_rounds
    for round_ in range(1, total_rounds + 1):
        steps = (variant.steps or args.steps) if round_ <= rounds else 0
        local = []
        for trainer, algorithm in zip(trainers, algorithms, strict=True):
            algorithm.begin(get_state(trainer.am))
            if steps:
                trainer.train_steps(steps, algorithm.correction())
            local.append(get_state(trainer.am))
        if variant.compression != "none":  # everyone receives everything: their estimates are the senders'
            outgoing = [e.outgoing(local[i], round_, everyone) for i, e in enumerate(estimates)]
            sent_bytes += sum(
                TensorSpec(name, outgoing[0].wire_dtypes[name], tuple(v.shape)).nbytes
                for name, v in outgoing[0].tensors.items()
            )
            public = [e.estimate for e in estimates]
        else:
            sent_bytes += sum(4 * v.size for v in local[0].values())
        for i, (trainer, algorithm) in enumerate(zip(trainers, algorithms, strict=True)):
            source = local if variant.compression == "none" else public
            mixed = {
                name: sum(np.float32(weights[i, j]) * source[j][name] for j in range(n) if weights[i, j])  # type: ignore[index]
                for name in local[i]
            }
            if variant.compression != "none":  # x_i + gamma * (mix of the estimates - own estimate)
                own = public[i]
                mixed = {k: local[i][k] + np.float32(variant.gamma) * (mixed[k] - own[k]) for k in mixed}  # type: ignore[index]
            set_state(trainer.am, algorithm.finish(local[i], mixed, steps))
        if variant.mix_moments and steps:
            _mix_moments(trainers, weights, variant.mix_moments)
        if round_ == total_rounds:
            accuracies = [t.evaluate(split.evaluation.examples)["accuracy"] for t in trainers]
            curve.append(float(np.mean(accuracies)))
    states = [get_state(t.am) for t in trainers]
    return {
        "variant": variant.text,
        "accuracies": [round(a, 4) for a in accuracies],
        "mean": round(float(np.mean(accuracies)), 4),
        "worst": round(float(np.min(accuracies)), 4),
        "curve": [round(c, 4) for c in curve],
        "consensus_distance": consensus_distance(states),
        "bytes": sent_bytes,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _mix_moments(trainers: list[Trainer], weights: Array, which: str) -> None:
    """Average the AdamW moments over the topology (an experiment: the optimizer state is local)."""
    keys = [k for k, flag in (("exp_avg", "m"), ("exp_avg_sq", "v")) if flag in which]
    n = len(trainers)
    for key in keys:
        per_node = [[t.optimizer.state[p][key].clone() for p in t.params] for t in trainers]
        for i, trainer in enumerate(trainers):
            for k, param in enumerate(trainer.params):
                mixed = sum(float(weights[i, j]) * per_node[j][k] for j in range(n) if weights[i, j])
                trainer.optimizer.state[param][key].copy_(mixed)


def run_pooled(args: argparse.Namespace, variant: Variant, split: Split, *, balanced: bool = False) -> float:
    model_settings, lora, train = settings(args, variant)
    am = build_adapter_model(model_settings, lora, seed=args.seed)
    union = split.balanced_union if balanced else split.union
    trainer = Trainer(am, union.examples, train, seed=args.seed * 100_003)
    trainer.train_steps(args.rounds * args.steps)
    return float(trainer.evaluate(split.evaluation.examples)["accuracy"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("variants", nargs="*")
    parser.add_argument("--topology", default="ring:4")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--no-pooled", action="store_true")
    parser.add_argument(
        "--pooled", default="dpsgd", help="the variant whose train settings pooled uses (default: AdamW 2e-3)"
    )
    parser.add_argument(
        "--balanced-pooled", action="store_true", help="pooled on shards upsampled to equal size"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(text) for text in args.variants]
    n = mixing_matrix(parse_topology(args.topology)).shape[0]
    split = make_split(n, args.alpha, args.seed, args.split)
    print(
        f"# {args.topology} alpha {args.alpha} seed {args.seed} {args.rounds}x{args.steps} steps "
        f"batch {args.batch}, evaluated on {args.split} ({len(split.evaluation)} examples), "
        f"shards {[len(s) for s in split.shards]}",
        flush=True,
    )
    pooled = (
        None
        if args.no_pooled
        else run_pooled(args, parse_variant(args.pooled), split, balanced=args.balanced_pooled)
    )
    if pooled is not None:
        print(f"pooled {pooled:.4f}", flush=True)
    for variant in variants:
        result = run_variant(args, variant, split)
        result["pooled"] = pooled
        if args.json:
            print(json.dumps(result), flush=True)
        else:
            gap = "" if pooled is None else f" worst-pooled {result['worst'] - pooled:+.4f}"
            print(
                f"{variant.text:40s} mean {result['mean']:.4f} worst {result['worst']:.4f}{gap} "
                f"nodes {result['accuracies']} cd {result['consensus_distance']:.2e} "
                f"bytes {result['bytes']} curve {result['curve']} {result['seconds']} s",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
