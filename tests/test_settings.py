"""The config sections' schema: ranges, enumerations and cross-field checks, by field name; read_toml."""

from __future__ import annotations

import math
from pathlib import Path

import msgspec
import pytest

from p2pfm.config.schema import decode
from p2pfm.config.settings import (
    DataConfig,
    FaultSettings,
    GossipSettings,
    LoraSettings,
    ModelSettings,
    TrainSettings,
    TransportSettings,
)
from p2pfm.config.toml import read_toml
from p2pfm.core.errors import ConfigError
from p2pfm.learn.data import node_shards

# --------------------------------------------------------------------------- #
# [gossip]
# --------------------------------------------------------------------------- #


def test_gossip_settings_from_a_table() -> None:
    gossip = decode(
        GossipSettings, {"rounds": 4, "round_timeout_s": 5, "rule": "clip", "mix": False}, "gossip"
    )
    assert (gossip.rounds, gossip.round_timeout_s, gossip.rule, gossip.mix) == (4, 5.0, "clip", False)
    assert type(gossip.round_timeout_s) is float
    assert gossip.max_rounds_ahead == GossipSettings().max_rounds_ahead


@pytest.mark.parametrize(
    ("table", "name", "problem"),
    [
        ({"max_rounds_ahead": 0}, "gossip.max_rounds_ahead", "must be >= 1"),
        ({"max_rounds_ahead": 1.5}, "gossip.max_rounds_ahead", "must be an integer, got float 1.5"),
        ({"rounds": 0}, "gossip.rounds", "must be >= 1"),
        ({"rounds": True}, "gossip.rounds", "must be an integer, got bool True"),
        ({"mix": 1}, "gossip.mix", "must be true or false, got int 1"),
        ({"round_timeout_s": 0}, "gossip.round_timeout_s", "must be > 0, got 0"),
        ({"round_timeout_s": math.nan}, "gossip.round_timeout_s", "must be a finite number, got nan"),
        ({"round_timeout_s": math.inf}, "gossip.round_timeout_s", "must be a finite number, got inf"),
        ({"byzantine_weight": 1.0}, "gossip.byzantine_weight", "must be in [0, 1)"),
        ({"byzantine_weight": math.nan}, "gossip.byzantine_weight", "must be a finite number, got nan"),
        (
            {"rule": "avg"},
            "gossip.rule",
            "must be one of 'mean', 'trimmed-mean', 'median', 'clip', got 'avg'",
        ),
        ({"wire_dtype": "float16"}, "gossip.wire_dtype", "must be one of 'float32', 'bfloat16'"),
        ({"eval_every": 0}, "gossip.eval_every", "must be >= 1"),
        ({"snapshot_every": -1}, "gossip.snapshot_every", "must be >= 0"),
        ({"trim": -1}, "gossip.trim", "must be >= 0"),
    ],
)
def test_gossip_settings_errors_name_the_real_field(
    table: dict[str, object], name: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        decode(GossipSettings, table, "gossip")
    assert info.value.field == name
    assert info.value.problem.startswith(problem)
    assert str(info.value).startswith(f"config field '{name}': {problem}")


def test_gossip_settings_unknown_field_lists_the_real_fields() -> None:
    with pytest.raises(ConfigError) as info:
        decode(GossipSettings, {"max_round_ahead": 2}, "gossip")
    assert info.value.field == "gossip.max_round_ahead"
    listed = info.value.problem.removeprefix("unknown field; valid fields are: ").split(", ")
    assert listed == sorted(f.name for f in msgspec.structs.fields(GossipSettings))
    assert "max_rounds_ahead" in listed and "round_timeout_s" in listed


# --------------------------------------------------------------------------- #
# [model] [lora] [data] [train] [faults] [transport]
# --------------------------------------------------------------------------- #


def _field(cls: type[msgspec.Struct], table: dict[str, object], section: str) -> str:
    with pytest.raises(ConfigError) as info:
        decode(cls, table, section)
    assert str(info.value).startswith(f"config field {info.value.field!r}: ")
    return info.value.field


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"path": "x"}, "model.num_labels"),
        ({"path": "x", "num_labels": 1}, "model.num_labels"),
        ({"path": "x", "task": "causal-lm", "num_labels": 3}, "model.num_labels"),
        ({"path": "x", "task": "regression", "num_labels": 3}, "model.task"),
        ({"path": "", "num_labels": 3}, "model.path"),
        ({"path": "x", "num_labels": 3, "gguf_file": "model.bin"}, "model.gguf_file"),
        ({"num_labels": 3}, "model.path"),
    ],
)
def test_model_settings_validation(table: dict[str, object], field: str) -> None:
    assert _field(ModelSettings, table, "model") == field


def test_model_settings_cross_checks_also_run_when_built_in_code() -> None:
    with pytest.raises(ConfigError) as info:
        ModelSettings("x")  # classification without num_labels
    assert info.value.field == "model.num_labels"
    assert ModelSettings("x", task="causal-lm").num_labels is None


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"rank": 0}, "lora.rank"),
        ({"rank": 2.0}, "lora.rank"),
        ({"alpha": -1.0}, "lora.alpha"),
        ({"alpha": math.inf}, "lora.alpha"),
        ({"dropout": 1.0}, "lora.dropout"),
        ({"target_modules": []}, "lora.target_modules"),
        ({"target_modules": "query"}, "lora.target_modules"),
        ({"target_modules": ["query", "query"]}, "lora.target_modules"),
        ({"target_modules": ["query", ""]}, "lora.target_modules[1]"),
    ],
)
def test_lora_settings_validation(table: dict[str, object], field: str) -> None:
    assert _field(LoraSettings, table, "lora") == field


def test_lora_settings_from_a_table() -> None:
    lora = decode(LoraSettings, {"target_modules": ["q_proj", "v_proj"], "alpha": 8}, "lora")
    assert lora.target_modules == ("q_proj", "v_proj") and lora.alpha == 8.0 and type(lora.alpha) is float


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"lr": 0.0}, "train.lr"),
        ({"lr": math.nan}, "train.lr"),
        ({"weight_decay": -0.1}, "train.weight_decay"),
        ({"batch_size": 0}, "train.batch_size"),
        ({"local_steps": 1.5}, "train.local_steps"),
        ({"max_length": 1}, "train.max_length"),
        ({"threads": -1}, "train.threads"),
        ({"eval_batch_size": 0}, "train.eval_batch_size"),
        ({"device": "tpu"}, "train.device"),
        ({"device": "cuda:x"}, "train.device"),
        ({"precision": "fp16"}, "train.precision"),
    ],
)
def test_train_settings_validation(table: dict[str, object], field: str) -> None:
    assert _field(TrainSettings, table, "train") == field


def test_train_settings_from_a_table() -> None:
    train = decode(TrainSettings, {"lr": 1, "device": "cuda:1"}, "train")
    assert train.lr == 1.0 and type(train.lr) is float and train.device == "cuda:1"
    with pytest.raises(ConfigError) as info:
        decode(TrainSettings, {"device": "tpu"}, "train")
    assert info.value.problem == "must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"source": ""}, "data.source"),
        ({"task": "translate"}, "data.task"),
        ({"test_fraction": 1.0}, "data.test_fraction"),
        ({"partition": "random"}, "data.partition"),
        ({"alpha": 0.0}, "data.alpha"),
        ({"labels": "sports"}, "data.labels"),
        ({"labels": ["sports"]}, "data.labels[0]"),
        ({"partition": "labels"}, "data.labels"),
        ({"seed": -3}, "data.seed"),
        ({"max_train_examples": 0}, "data.max_train_examples"),
        ({"max_test_examples": 2.5}, "data.max_test_examples"),
    ],
)
def test_data_config_validates_each_field(table: dict[str, object], field: str) -> None:
    assert _field(DataConfig, table, "data") == field


def test_labels_from_a_table_split_the_corpus() -> None:
    config = decode(DataConfig, {"partition": "labels", "labels": [["sports"], ["tech", "politics"]]}, "data")
    assert config.labels == (("sports",), ("tech", "politics"))
    _, shards = node_shards(config, 2)
    assert [s.label_counts() for s in shards] == [[0, 0, 0, 404, 0], [0, 0, 322, 0, 278]]


def test_faults_name_the_neighbour_and_the_attack() -> None:
    faults = decode(FaultSettings, {"drop": {"node1": 0.1}, "attack": "scale", "attack_factor": 3}, "faults")
    assert faults.drop == {"node1": 0.1} and faults.attack == "scale" and faults.attack_factor == 3.0
    assert decode(FaultSettings, {}, "faults").attack == ""  # honest
    with pytest.raises(ConfigError) as info:
        decode(FaultSettings, {"drop": {"node1": 0.1, "node3": 1.5}}, "faults")
    assert (info.value.field, info.value.problem) == ("faults.drop.node3", "must be in [0, 1], got 1.5")
    with pytest.raises(ConfigError) as info:
        decode(FaultSettings, {"attack": "krum"}, "faults")
    assert info.value.field == "faults.attack" and "'scale', 'noise'" in info.value.problem
    assert _field(FaultSettings, {"slow_factor": 0.5}, "faults") == "faults.slow_factor"


def test_transport_settings() -> None:
    assert decode(TransportSettings, {"insecure": True}, "transport").insecure
    for name in ("send_queue_messages", "handshake_timeout_ms"):
        assert _field(TransportSettings, {name: 0}, "transport") == f"transport.{name}"
    assert _field(TransportSettings, {"insecure": "no"}, "transport") == "transport.insecure"


# --------------------------------------------------------------------------- #
# read_toml
# --------------------------------------------------------------------------- #


def test_read_toml_parses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('name = "n"\n\n[gossip]\nrounds = 3\nround_timeout_s = 2.5\n\n[[peers]]\nid = "ab"\n')
    assert read_toml(path, "config") == {
        "name": "n",
        "gossip": {"rounds": 3, "round_timeout_s": 2.5},
        "peers": [{"id": "ab"}],
    }
    assert read_toml(tmp_path / "node.toml", "config")["gossip"]["rounds"] == 3


def test_read_toml_on_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        read_toml(path, "scenario")
    assert info.value.field == "scenario"
    assert info.value.problem == f"file {path} does not exist"


def test_read_toml_on_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_toml(tmp_path, "config")
    assert info.value.field == "config"
    assert info.value.problem.startswith(f"cannot read {tmp_path} (")


def test_read_toml_on_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[gossip]\nrounds = 3\nrule = "mean\n')
    with pytest.raises(ConfigError) as info:
        read_toml(path, "config")
    assert info.value.field == "config"
    assert info.value.problem.startswith(f"{path} is not valid TOML (")
    assert "line 3" in info.value.problem


def test_a_non_table_at_the_top_level_or_as_a_section_is_refused(tmp_path: Path) -> None:
    # A TOML document is always a table: a bare array is a syntax error ...
    top = tmp_path / "array.toml"
    top.write_text("[1, 2, 3]\n")
    with pytest.raises(ConfigError) as info:
        read_toml(top, "config")
    assert "is not valid TOML" in info.value.problem
    # ... and a section given as a value is refused by the schema, with the section's name.
    section = tmp_path / "section.toml"
    section.write_text("gossip = 3\n")
    doc = read_toml(section, "config")
    with pytest.raises(ConfigError) as info:
        decode(GossipSettings, doc["gossip"], "gossip")
    assert (info.value.field, info.value.problem) == ("gossip", "must be a table, got int 3")


def test_read_toml_on_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'a = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_toml(path, "config")
