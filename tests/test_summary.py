"""summary.json: the typed Summary, its round trip, and malformed files refused by key."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from p2pfm.core.errors import ConfigError, SummaryError, UserInputError
from p2pfm.lab.summary import (
    SUMMARY_FORMAT,
    Baselines,
    ConsensusPoint,
    NodeSummary,
    Summary,
    metric_for_task,
    read_summary,
    write_summary,
)


def _node(name: str, final: float | None, **fields: Any) -> NodeSummary:
    curve = ((0, 0.25), (3, None), (6, final))
    return NodeSummary(name, f"{name}-peer", final, curve, rounds_completed=6, rounds_trained=6, **fields)


def _summary(task: str = "classification") -> Summary:
    return Summary(
        scenario="unit",
        topology="ring:3",
        model="minilm",
        task=task,
        ok=True,
        wall_s=12.5,
        nodes=(
            _node(
                "node0",
                0.8,
                bytes_sent=1_500_000,
                rejected={"replay": 2},
                banned=("node2",),
                aggregation_error=((3, 0.5), (6, None)),
            ),
            _node("node1", 0.6, dropped={"fault_injected": 3}, io_errors={"snapshot": 1}, restarts=1),
            _node("node2", 0.1, attack="scale", finished=True),
        ),
        consensus=(ConsensusPoint(3, 0.125, 2), ConsensusPoint(6, 1e-4, 2)),
        baselines=Baselines({"node0": 0.5, "node1": None, "node2": 0.3}, pooled=0.9),
        faults=("node2 attacks: scale x10",),
        algorithm={"algorithm": "diloco", "outer_lr": 0.7, "freeze_a": True},
    )


def test_a_summary_survives_json_unchanged(tmp_path: Path) -> None:
    summary = _summary()
    assert Summary.from_json(json.loads(json.dumps(summary.to_json()))) == summary
    path = tmp_path / "summary.json"
    write_summary(path, summary)
    assert read_summary(path) == summary
    perplexity = _summary("causal-lm")
    assert Summary.from_json(json.loads(json.dumps(perplexity.to_json()))) == perplexity
    bare = Summary("s", "ring:2", "m", "classification", ok=False, wall_s=0.0, nodes=())
    assert Summary.from_json(bare.to_json()) == bare and "baselines" not in bare.to_json()


def test_derived_keys_are_written_for_readers_of_the_json() -> None:
    doc = _summary().to_json()
    assert doc["format"] == SUMMARY_FORMAT and doc["metric"] == "accuracy"
    assert doc["mean_final_accuracy"] == pytest.approx(0.7)  # honest nodes only: node2 attacks
    assert doc["attackers"] == ["node2"]
    assert doc["baselines"] == {
        "local": pytest.approx(0.4),  # node1's local run never evaluated
        "local_per_node": {"node0": 0.5, "node1": None, "node2": 0.3},
        "pooled": 0.9,
    }
    node0 = doc["nodes"][0]
    assert node0["id"] == "node0-peer" and node0["final_accuracy"] == 0.8
    assert node0["curve"] == [[0, 0.25], [3, None], [6, 0.8]]
    assert node0["rejected"] == {"replay": 2} and node0["banned"] == ["node2"]
    assert doc["consensus_distance"][0] == {"round": 3, "consensus_distance": 0.125, "nodes": 2}
    lm = _summary("causal-lm").to_json()
    assert lm["metric"] == "perplexity" and lm["mean_final_perplexity"] == pytest.approx(0.7)
    assert "final_perplexity" in lm["nodes"][0] and "final_accuracy" not in lm["nodes"][0]


def test_a_baseline_not_asked_for_is_left_out() -> None:
    only_pooled = Summary("s", "ring:2", "m", "causal-lm", True, 1.0, (), baselines=Baselines(pooled=11.0))
    assert only_pooled.to_json()["baselines"] == {"pooled": 11.0}
    assert Summary.from_json(only_pooled.to_json()).baselines == Baselines(None, 11.0)
    assert Baselines({}).local is None and Baselines().local is None


def test_metric_for_task() -> None:
    assert metric_for_task("classification") == "accuracy"
    assert metric_for_task("causal-lm") == "perplexity"
    with pytest.raises(ConfigError) as info:
        metric_for_task("regression")
    assert info.value.field == "model.task" and "causal-lm" in str(info.value)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set (or with ``...``, delete) the item at ``path`` ("nodes.1.bytes_sent") in a summary document."""

    def edit(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        key: Any = int(last) if isinstance(target, list) else last
        if value is ...:
            del target[key]
        else:
            target[key] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "key", "fragment"),
    [
        (_set("format", ...), "format", "is missing"),
        (_set("format", "p2pfm-summary-v0"), "format", "'p2pfm-summary-v0'"),
        (_set("nodes.1.bytes_sent", ...), "nodes[1].bytes_sent", "is missing"),
        (_set("scenario", ...), "scenario", "is missing"),
        (_set("wall_s", "fast"), "wall_s", "must be a number, not a string"),
        (_set("ok", 1), "ok", "must be true or false, not an integer"),
        (_set("nodes", {}), "nodes", "must be a list, not an object"),
        (_set("nodes.0", []), "nodes[0]", "must be an object, not a list"),
        (_set("nodes.0.rejected.replay", 1.5), "nodes[0].rejected.replay", "must be an integer"),
        (_set("nodes.2.finished", None), "nodes[2].finished", "not null"),
        (_set("nodes.0.banned", [3]), "nodes[0].banned[0]", "must be a string"),
        (_set("nodes.0.curve.1", [2]), "nodes[0].curve[1]", "[round, value] pair"),
        (_set("nodes.0.curve.2.0", "six"), "nodes[0].curve[2][0]", "must be an integer"),
        (_set("nodes.0.final_accuracy", ...), "nodes[0].final_accuracy", "is missing"),
        (_set("consensus_distance.0.round", True), "consensus_distance[0].round", "not a boolean"),
        (_set("baselines.local_per_node.node1", "n/a"), "baselines.local_per_node.node1", "a number"),
        (_set("baselines", []), "baselines", "must be an object"),
        (_set("task", "regression"), "task", "'regression'"),
        (_set("metric", "perplexity"), "metric", "'accuracy' for task 'classification'"),
    ],
)
def test_a_malformed_summary_is_refused_naming_the_key(
    edit: Callable[[dict[str, Any]], None], key: str, fragment: str
) -> None:
    doc = _summary().to_json()
    edit(doc)
    with pytest.raises(SummaryError) as info:
        Summary.from_json(json.loads(json.dumps(doc)), "run/summary.json")
    assert isinstance(info.value, UserInputError)
    assert info.value.key == key, str(info.value)
    assert str(info.value).startswith(f"run/summary.json: key {key!r} ") and fragment in str(info.value)


def test_not_an_object_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SummaryError, match="must be an object, not a list") as info:
        Summary.from_json([1, 2])
    assert info.value.key is None
    missing = tmp_path / "run" / "summary.json"
    with pytest.raises(SummaryError, match="does not exist") as info:
        read_summary(missing)
    assert str(missing) in str(info.value)
    torn = tmp_path / "summary.json"
    torn.write_text(json.dumps(_summary().to_json())[:-40])
    with pytest.raises(SummaryError, match="is not JSON"):
        read_summary(torn)
