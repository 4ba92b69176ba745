"""The scenario report, built from hand-written node output folders (no model, no processes).

Every node folder here holds what a node writes (docs/node.md): ``metrics.jsonl``
with ``start`` / ``round`` / ``resume`` / ``caught_up`` / ``done`` events and,
where a test needs consensus, ``snapshots/round_NNNNN.safetensors``. The last
tests render report.md from a Summary written by hand.
"""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

import p2pfm.lab.report
import p2pfm.lab.summary
from p2pfm.core.consensus import consensus_distance
from p2pfm.lab.report import Setup, consensus_per_round, node_summary, report_run, write_report
from p2pfm.lab.summary import Baselines, ConsensusPoint, NodeSummary, Summary, read_summary
from p2pfm.node.metrics import MetricsWriter

PNG = b"\x89PNG\r\n\x1a\n"


def _counters(
    sent: int = 0,
    received: int = 0,
    *,
    messages: int = 0,
    dropped: dict[str, int] | None = None,
    rejected: dict[str, int] | None = None,
    banned: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "bytes_sent": sent,
        "bytes_received": received,
        "messages_sent": messages,
        "messages_received": messages,
        "dropped": dropped or {},
        "rejected": rejected or {},
        "banned": banned or [],
    }


def _write_metrics(folder: Path, name: str, events: list[tuple[str, dict[str, Any]]]) -> Path:
    writer = MetricsWriter(folder / "metrics.jsonl", node=name, peer=f"{name}-peer-id")
    for event, fields in events:
        writer.write(event, **fields)
    writer.close()
    return folder / "metrics.jsonl"


def _plain_run(
    rounds: int = 6, accuracy: float = 0.5, *, attack: str = "", step: int = 100
) -> list[tuple[str, dict[str, Any]]]:
    """start, round 0..rounds (each evaluated), done: accuracy rises by 0.01 a round to ``accuracy``."""
    events: list[tuple[str, dict[str, Any]]] = [("start", {"attack": attack, "neighbours": ["a", "b"]})]
    for r in range(rounds + 1):
        fields: dict[str, Any] = {
            "round": r,
            "eval": {"accuracy": accuracy - 0.01 * (rounds - r), "loss": 1.0},
            "timed_out": False,
            **_counters(step * r, step * r),
        }
        if r:
            fields["rounds_trained"] = r
        events.append(("round", fields))
    events.append(
        (
            "done",
            {
                "rounds_completed": rounds,
                "rounds_trained": rounds,
                "stopped": False,
                **_counters(step * rounds, step * rounds),
            },
        )
    )
    return events


def _snapshot(folder: Path, round_: int, state: dict[str, np.ndarray]) -> None:
    (folder / "snapshots").mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(state, str(folder / "snapshots" / f"round_{round_:05d}.safetensors"))


def _state(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.lora_A": (scale * rng.normal(size=(4, 3))).astype(np.float32),
        "layer.lora_B": (scale * rng.normal(size=(3, 4))).astype(np.float32),
    }


def _setup(
    *, task: str = "classification", baselines: tuple[str, ...] = (), faults: tuple[str, ...] = ()
) -> Setup:
    return Setup("unit", "ring:4", "minilm", task, faults=faults, baselines=baselines)


# --------------------------------------------------------------------------- #
# One node's summary
# --------------------------------------------------------------------------- #


def test_final_metric_is_the_last_evaluated_round_and_counters_the_last_record(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = [("start", {"attack": ""})]
    for r in range(6):  # rounds 0..5; evaluated every 2 rounds, round 5 not evaluated
        fields: dict[str, Any] = {
            "round": r,
            "eval": {"accuracy": 0.1 * r, "loss": 2.0 - 0.1 * r} if r % 2 == 0 else {},
            "timed_out": r in (1, 3),
            **_counters(1000 * r, 900 * r, messages=r),
        }
        if r:
            fields["rounds_trained"] = r
        events.append(("round", fields))
    done = _counters(5500, 4950, messages=7, dropped={"send_queue_full": 2}, rejected={"replay": 1})
    done.update(io_errors={"snapshot": 1}, internal_errors=2, refused_connections=3)
    events.append(("done", {"rounds_completed": 5, "rounds_trained": 5, "stopped": True, **done}))
    _write_metrics(tmp_path / "node0", "node0", events)

    summary = node_summary(tmp_path / "node0", "accuracy")

    assert summary.name == "node0" and summary.peer_id == "node0-peer-id"
    assert summary.final == pytest.approx(0.4)  # round 4, not the unevaluated round 5
    assert summary.curve == ((0, 0.0), (2, pytest.approx(0.2)), (4, pytest.approx(0.4)))
    # Counters come from the last record (done), not the last round.
    assert (summary.bytes_sent, summary.bytes_received) == (5500, 4950)
    assert (summary.messages_sent, summary.messages_received) == (7, 7)
    assert summary.dropped == {"send_queue_full": 2} and summary.rejected == {"replay": 1}
    assert summary.timed_out_rounds == 2
    assert summary.rounds_completed == 5 and summary.rounds_trained == 5
    assert summary.finished is False  # done with stopped=True
    assert summary.restarts == 0 and summary.caught_up == 0
    assert summary.attack == "" and summary.banned == () and not summary.is_attacker
    assert summary.io_errors == {"snapshot": 1}
    assert (summary.internal_errors, summary.refused_connections) == (2, 3)


def test_restarts_and_catch_ups_are_counted_and_skipped_rounds_are_not_trained(tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = [
        ("start", {"attack": ""}),
        ("round", {"round": 0, "eval": {"accuracy": 0.2}, **_counters()}),
        ("round", {"round": 1, "rounds_trained": 1, "eval": {"accuracy": 0.3}, **_counters(10, 10)}),
        ("resume", {"round": 1, "attack": ""}),
        ("caught_up", {"from_round": 2, "to_round": 4, "skipped": 2}),
        ("round", {"round": 4, "rounds_trained": 2, "eval": {"accuracy": 0.5}, **_counters(20, 20)}),
        ("resume", {"round": 4, "attack": ""}),
        ("round", {"round": 5, "rounds_trained": 3, "eval": {"accuracy": 0.6}, **_counters(30, 30)}),
        ("caught_up", {"from_round": 6, "to_round": 7, "skipped": 1}),
        ("round", {"round": 7, "rounds_trained": 4, "eval": {"accuracy": 0.7}, **_counters(40, 40)}),
        ("done", {"rounds_completed": 7, "rounds_trained": 4, "stopped": False, **_counters(45, 44)}),
    ]
    _write_metrics(tmp_path / "node1", "node1", events)

    summary = node_summary(tmp_path / "node1", "accuracy")

    assert summary.restarts == 2
    assert summary.caught_up == 2
    assert summary.rounds_completed == 7  # the last round reached ...
    assert summary.rounds_trained == 4  # ... of which 4 were really run
    assert summary.finished is True
    assert summary.final == pytest.approx(0.7)
    assert [r for r, _ in summary.curve] == [0, 1, 4, 5, 7]
    assert (summary.bytes_sent, summary.bytes_received) == (45, 44)


def test_banned_and_attack_label_are_read_from_the_records(tmp_path: Path) -> None:
    events = _plain_run(3, attack="equivocate")
    events[-1][1]["banned"] = ["node2", "ab12cd34"]
    _write_metrics(tmp_path / "node3", "node3", events)

    summary = node_summary(tmp_path / "node3", "accuracy")

    assert summary.banned == ("node2", "ab12cd34")
    assert summary.attack == "equivocate"


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = _write_metrics(tmp_path / "node0", "node0", _plain_run(4, accuracy=0.8)[:-1])  # no done
    intact = node_summary(tmp_path / "node0", "accuracy")
    with path.open("a", encoding="utf-8") as handle:  # a writer killed mid-line
        handle.write('{"event": "round", "round": 5, "rounds_trained": 5, "eval": {"accur')

    summary = node_summary(tmp_path / "node0", "accuracy")

    assert summary == intact
    assert summary.rounds_completed == 4 and summary.final == pytest.approx(0.8)
    assert summary.finished is False  # no done event
    assert summary.bytes_sent == 400  # the last intact record, round 4


def test_a_folder_without_metrics_gives_an_empty_summary(tmp_path: Path) -> None:
    (tmp_path / "node9").mkdir()

    summary = node_summary(tmp_path / "node9", "perplexity")

    assert summary.name == "node9" and summary.peer_id is None
    assert summary.final is None
    assert summary.bytes_sent == 0 and summary.rounds_completed == 0 and summary.rounds_trained == 0
    assert summary.restarts == 0 and summary.finished is False and summary.curve == ()


# --------------------------------------------------------------------------- #
# Consensus per round
# --------------------------------------------------------------------------- #


def test_consensus_per_round_matches_consensus_distance_over_the_nodes_with_a_snapshot(
    tmp_path: Path,
) -> None:
    folders = [tmp_path / f"node{i}" for i in range(3)]
    states = {(i, r): _state(10 * i + r) for i in range(3) for r in (2, 4, 6)}
    for i, folder in enumerate(folders):
        for r in (2, 4, 6):
            if (i, r) in ((2, 4), (1, 6), (2, 6)):  # round 4: two nodes; round 6: node0 alone
                continue
            _snapshot(folder, r, states[i, r])
    (folders[0] / "snapshots" / "notes.txt").write_text("ignored")

    rows = consensus_per_round(folders)

    assert [(row.round, row.nodes) for row in rows] == [(2, 3), (4, 2)]  # round 6 has one node
    expected_2 = consensus_distance([states[i, 2] for i in range(3)])
    expected_4 = consensus_distance([states[0, 4], states[1, 4]])
    assert rows[0].consensus_distance == pytest.approx(expected_2, rel=1e-12)
    assert rows[1].consensus_distance == pytest.approx(expected_4, rel=1e-12)
    assert expected_4 > 0.0 and expected_2 != pytest.approx(expected_4)


def test_consensus_is_zero_when_nodes_agree_and_empty_without_snapshots(tmp_path: Path) -> None:
    same = _state(1)
    for name in ("a", "b"):
        _snapshot(tmp_path / name, 3, same)
    (tmp_path / "c").mkdir()

    assert consensus_per_round([tmp_path / "a", tmp_path / "b", tmp_path / "c"]) == (
        ConsensusPoint(round=3, consensus_distance=0.0, nodes=2),
    )
    assert consensus_per_round([tmp_path / "c"]) == ()
    assert consensus_per_round([]) == ()


# --------------------------------------------------------------------------- #
# summary.json, report.md and plots
# --------------------------------------------------------------------------- #


def test_report_with_baselines_and_an_attacker(tmp_path: Path) -> None:
    out = tmp_path / "run"
    nodes = out / "nodes"
    finals = {"node0": 0.80, "node1": 0.70, "node2": 0.90, "node3": 0.20}
    for name, final in finals.items():
        events = _plain_run(6, accuracy=final, attack="scale" if name == "node3" else "")
        if name == "node1":  # crashed after round 2, skipped rounds 3-4 after the restart, timed out twice
            events = [
                *events[:4],
                ("resume", {"round": 2, "attack": ""}),
                ("caught_up", {"from_round": 3, "to_round": 5, "skipped": 2}),
                ("round", {"round": 5, "rounds_trained": 3, "eval": {"accuracy": 0.69}, "timed_out": True}),
                ("round", {"round": 6, "rounds_trained": 4, "eval": {"accuracy": 0.70}, "timed_out": True}),
                (
                    "done",
                    {
                        "rounds_completed": 6,
                        "rounds_trained": 4,
                        "stopped": False,
                        **_counters(
                            600,
                            600,
                            dropped={"send_queue_full": 1, "fault_injected": 3},
                            rejected={"replay": 2, "bad_signature": 0},
                            banned=["node3"],
                        ),
                    },
                ),
            ]
        if name == "node0":
            events[-1][1].update(bytes_sent=1_500_000, bytes_received=1_400_000)
        _write_metrics(nodes / name, name, events)
        scale = 1000.0 if name == "node3" else 1.0
        for r in (3, 6):
            _snapshot(nodes / name, r, _state(int(name[-1]) + 10 * r, scale))
    (nodes / "node4").mkdir()  # a folder without metrics is not a node of the report
    # node3's local baseline makes the local mean 0.55 with or without the attacker's shard.
    local = {"node0": 0.60, "node1": 0.50, "node2": 0.55, "node3": 0.55}
    for name, final in local.items():
        _write_metrics(out / "baselines" / "local" / name, name, _plain_run(6, accuracy=final))
    _write_metrics(out / "baselines" / "pooled" / "pooled", "pooled", _plain_run(6, accuracy=0.95))
    faults = ("crash node1 after round 2, restart after 2.5 s", "node3 attacks: scale x10")

    summary = report_run(out, _setup(baselines=("local", "pooled"), faults=faults), wall_s=123.4, ok=True)

    assert read_summary(out / "summary.json") == summary
    written = json.loads((out / "summary.json").read_text())
    assert written == summary.to_json() and written["mean_final_accuracy"] == summary.mean_final
    assert summary.metric == "accuracy" and summary.ok is True and summary.wall_s == 123.4
    assert [n.name for n in summary.nodes] == ["node0", "node1", "node2", "node3"]
    # The curves go into summary.json: report.md and the plots are drawn from it alone.
    assert [r for r, _ in summary.nodes[0].curve] == list(range(7))
    assert written["nodes"][0]["curve"][-1] == [6, pytest.approx(0.80)]
    assert summary.attackers == ("node3",) and written["attackers"] == ["node3"]
    assert summary.mean_final == pytest.approx((0.80 + 0.70 + 0.90) / 3)  # honest nodes only
    node1 = summary.nodes[1]
    assert (node1.restarts, node1.caught_up, node1.rounds_trained, node1.rounds_completed) == (1, 1, 4, 6)
    assert node1.timed_out_rounds == 2 and node1.banned == ("node3",)
    # Consensus is over the honest nodes: the attacker's huge snapshots are left out.
    honest = ["node0", "node1", "node2"]
    assert [(c.round, c.nodes) for c in summary.consensus] == [(3, 3), (6, 3)]
    for row in summary.consensus:
        states = [_state(int(name[-1]) + 10 * row.round) for name in honest]
        assert row.consensus_distance == pytest.approx(consensus_distance(states), rel=1e-12)
    assert summary.baselines is not None
    assert summary.baselines.local == pytest.approx(0.55)
    assert summary.baselines.local_per_node == pytest.approx(local)
    assert summary.baselines.pooled == pytest.approx(0.95)
    assert written["baselines"] == {
        "local": pytest.approx(0.55),
        "local_per_node": pytest.approx(local),
        "pooled": pytest.approx(0.95),
    }

    report = (out / "report.md").read_text()
    assert report.startswith("# Scenario report: unit\n")
    assert "- topology: `ring:4` (4 nodes)" in report
    assert "- wall time of the gossip run: 123 s" in report
    assert "| node | gossip accuracy | local-only accuracy | bytes sent | bytes received |" in report
    assert "| node0 | 0.800 | 0.600 | 1.50 MB | 1.40 MB |" in report
    assert "| node3 (attacker: scale) | 0.200 | 0.550 | 0.00 MB | 0.00 MB |" in report
    assert "- mean gossip accuracy (honest nodes; attackers: node3): **0.800**" in report
    assert "- mean local-only accuracy: 0.550 (gossip is 25.0 points above)" in report
    assert "- pooled (one model on all shards, same steps per node): 0.950 (gossip is 15.0 points below)" in (
        report
    )
    row = next(line for line in report.splitlines() if line.startswith("| 3 |"))  # the per-round table
    assert f"| {summary.consensus[0].consensus_distance:.3e} |" in row
    assert (
        "| round | node0 | node1 | node2 | node3 | mean accuracy | MB sent per node | consensus distance |"
        in report
    )
    assert "| node0 | 6 / 6 | 0 | 0 | 0 | 0 | - |" in report
    assert "| node1 | 4 / 6 | 1 | 2 | fault_injected 3, send_queue_full 1 | replay 2 | node3 |" in report
    assert "| node3 (attacker: scale) | 6 / 6 | 0 | 0 | 0 | 0 | - |" in report
    assert (
        "Faults injected: crash node1 after round 2, restart after 2.5 s; node3 attacks: scale x10" in report
    )
    assert "- model: `minilm`, task classification, metric accuracy" in report
    assert "node4" not in report
    for png in ("accuracy.png", "consensus.png", "bytes.png"):
        assert (out / png).read_bytes().startswith(PNG)
        assert f"]({png})" in report


def test_causal_lm_report_uses_perplexity_and_says_which_way_is_better(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for name, final in (("node0", 12.0), ("node1", 13.0)):
        events: list[tuple[str, dict[str, Any]]] = [("start", {"attack": ""})]
        events += [
            ("round", {"round": r, "rounds_trained": r, "eval": {"loss": 2.5, "perplexity": final + 6 - r}})
            for r in range(1, 7)
        ]
        events.append(("done", {"rounds_completed": 6, "rounds_trained": 6, "stopped": False}))
        _write_metrics(out / "nodes" / name, name, events)
    pooled = [("round", {"round": 6, "rounds_trained": 6, "eval": {"perplexity": 11.0}})]
    _write_metrics(out / "baselines" / "pooled" / "pooled", "pooled", pooled)

    summary = report_run(out, _setup(task="causal-lm", baselines=("pooled",)), wall_s=9.6, ok=False)

    assert summary.metric == "perplexity"
    assert summary.mean_final == pytest.approx(12.5)
    assert summary.baselines == Baselines(None, pytest.approx(11.0))  # no local baseline asked for
    written = json.loads((out / "summary.json").read_text())
    assert written["mean_final_perplexity"] == pytest.approx(12.5)
    assert written["baselines"] == {"pooled": pytest.approx(11.0)}
    assert summary.consensus == () and summary.attackers == ()
    report = (out / "report.md").read_text()
    assert "task causal-lm, metric perplexity" in report
    assert "- every node finished cleanly: False" in report
    assert "| node0 | 12.000 | n/a | 0.00 MB | 0.00 MB |" in report
    assert "- mean gossip perplexity: **12.500**" in report
    assert "(gossip is 1.50 higher (worse))" in report
    assert "| round | consensus distance | nodes |" not in report  # no snapshots, no table
    assert "| node1 | 6 / 6 | 0 | 0 | 0 | 0 | - |" in report
    assert "Faults injected: none" in report
    assert (out / "perplexity.png").read_bytes().startswith(PNG)


def test_report_without_baselines_sorts_nodes_naturally(tmp_path: Path) -> None:
    out = tmp_path / "run"
    for name, final in (("node10", 0.9), ("node2", 0.6), ("node1", 0.3)):
        _write_metrics(out / "nodes" / name, name, _plain_run(2, accuracy=final))

    summary = report_run(out, _setup(), wall_s=1.0, ok=True)

    assert [n.name for n in summary.nodes] == ["node1", "node2", "node10"]
    assert summary.baselines is None and "baselines" not in json.loads((out / "summary.json").read_text())
    assert summary.mean_final == pytest.approx(0.6)
    report = (out / "report.md").read_text()
    assert "| node | final accuracy | bytes sent | bytes received |" in report
    assert "| node10 | 0.900 | 0.00 MB | 0.00 MB |" in report
    assert "- mean final accuracy: **0.600**" in report
    rows = [line for line in report.splitlines() if line.startswith("| node") and "/ 2 |" in line]
    assert rows == [
        "| node1 | 2 / 2 | 0 | 0 | 0 | 0 | - |",
        "| node2 | 2 / 2 | 0 | 0 | 0 | 0 | - |",
        "| node10 | 2 / 2 | 0 | 0 | 0 | 0 | - |",
    ]


@pytest.mark.filterwarnings("ignore:No artists with labels found:UserWarning")
def test_report_on_a_run_without_nodes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()

    summary = report_run(out, _setup(baselines=("local",)), wall_s=0.0, ok=False)

    assert summary.nodes == () and summary.mean_final is None
    assert summary.baselines == Baselines(local_per_node={})
    assert json.loads((out / "summary.json").read_text())["baselines"] == {
        "local": None,
        "local_per_node": {},
    }
    assert "- mean gossip accuracy: **n/a**" in (out / "report.md").read_text()


def test_counters_survive_a_last_record_without_them(tmp_path: Path) -> None:
    """A node killed right after a caught_up (or resume) record keeps its counters in the summary."""
    folder = tmp_path / "node0"
    writer = MetricsWriter(folder / "metrics.jsonl", node="node0", peer="ab" * 32)
    writer.write("start")
    writer.write("round", round=1, eval={}, bytes_sent=5000, banned=["node2"], rounds_trained=1)
    writer.write("caught_up", from_round=2, to_round=4, skipped=2)
    writer.close()
    summary = node_summary(folder, "accuracy")
    assert summary.bytes_sent == 5000 and summary.banned == ("node2",)


# --------------------------------------------------------------------------- #
# report.md from a Summary alone (what `p2pfm report RUN` redraws)
# --------------------------------------------------------------------------- #


def _hand_made_summary(task: str = "classification") -> Summary:
    curve = ((0, 0.31), (5, None), (10, 0.875))
    return Summary(
        scenario="by-hand",
        topology="complete:3",
        model="models/tiny",
        task=task,
        ok=False,
        wall_s=61.7,
        nodes=(
            NodeSummary(
                "alpha",
                "aa" * 32,
                0.875,
                curve,
                rounds_completed=10,
                rounds_trained=9,
                timed_out_rounds=1,
                restarts=1,
                caught_up=1,
                finished=True,
                bytes_sent=2_340_000,
                bytes_received=1_230_000,
                aggregation_error=((5, 0.25), (10, 0.125)),
                bytes_curve=((0, 0.0), (5, 1_000_000.0), (10, 2_340_000.0)),
            ),
            NodeSummary(
                "beta",
                "bb" * 32,
                0.625,
                rounds_completed=10,
                rounds_trained=10,
                rejected={"replay": 4},
                aggregation_error=((5, 0.75),),
                bytes_curve=((5, 2_000_000.0),),
            ),
            NodeSummary("gamma", None, 0.125, attack="noise", dropped={"fault_injected": 7}, banned=("x1",)),
        ),
        consensus=(ConsensusPoint(5, 0.0625, 2), ConsensusPoint(10, 3.5e-5, 2)),
        baselines=Baselines({"alpha": 0.5, "beta": 0.25, "gamma": 0.75}, pooled=0.9375),
        faults=("node1 trains 2x slower",),
        algorithm={"algorithm": "scaffold", "drift_beta": 0.5, "freeze_a": False},
    )


def test_report_md_is_rendered_from_a_summary_alone(tmp_path: Path) -> None:
    write_report(tmp_path, _hand_made_summary())

    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Scenario report: by-hand\n")
    assert "- topology: `complete:3` (3 nodes)" in report
    assert "- model: `models/tiny`, task classification, metric accuracy" in report
    assert (
        "- wall time of the gossip run: 62 s" in report and "- every node finished cleanly: False" in report
    )
    assert "| alpha | 0.875 | 0.500 | 2.34 MB | 1.23 MB |" in report
    assert "| gamma (attacker: noise) | 0.125 | 0.750 | 0.00 MB | 0.00 MB |" in report
    assert "- mean gossip accuracy (honest nodes; attackers: gamma): **0.750**" in report
    assert "- mean local-only accuracy: 0.500 (gossip is 25.0 points above)" in report
    assert "0.938 (gossip is 18.8 points below)" in report
    # Per round: each node's metric, their mean, the mean MB sent so far, the consensus distance, the
    # mean aggregation error.
    header = (
        "| round | alpha | beta | gamma | mean accuracy | MB sent per node | consensus distance "
        "| LoRA aggregation error |"
    )
    assert header in report
    assert "| 5 | n/a | n/a | n/a | n/a | 1.50 | 6.250e-02 | 5.000e-01 |" in report
    assert "| 10 | 0.875 | n/a | n/a | 0.875 | 2.34 | 3.500e-05 | 1.250e-01 |" in report
    assert "| 0 | 0.310 | n/a | n/a | 0.310 | 0.00 | - | - |" in report
    assert "- algorithm: `scaffold` (drift_beta 0.5, freeze_a False)" in report
    assert "| alpha | 9 / 10 | 1 | 1 | 0 | 0 | - |" in report
    assert "| beta | 10 / 10 | 0 | 0 | 0 | replay 4 | - |" in report
    assert "| gamma (attacker: noise) | 0 / 0 | 0 | 0 | fault_injected 7 | 0 | x1 |" in report
    assert "Faults injected: node1 trains 2x slower\n" in report
    for png in ("accuracy.png", "consensus.png", "bytes.png", "accuracy_bytes.png"):
        assert (tmp_path / png).read_bytes().startswith(PNG)
    assert "![accuracy against bytes](accuracy_bytes.png)" in report
    assert not (tmp_path / "summary.json").exists()  # the report never rewrites its source


def test_report_md_of_a_perplexity_summary_without_baselines(tmp_path: Path) -> None:
    summary = _hand_made_summary("causal-lm")
    write_report(tmp_path, dataclasses.replace(summary, baselines=None, faults=()))

    report = (tmp_path / "report.md").read_text()
    assert "| node | final perplexity | bytes sent | bytes received |" in report
    assert "| beta | 0.625 | 0.00 MB | 0.00 MB |" in report
    assert "- mean final perplexity (honest nodes; attackers: gamma): **0.750**" in report
    assert "local-only" not in report and "Faults injected: none" in report
    assert (tmp_path / "perplexity.png").read_bytes().startswith(PNG)


def test_the_report_does_not_import_the_scenario_runner() -> None:
    """scenario imports report; the other way round would be a cycle (not even under TYPE_CHECKING)."""
    for module in (p2pfm.lab.report, p2pfm.lab.summary):
        assert module.__file__ is not None
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert imported, module
        assert not [name for name in imported if name.startswith("p2pfm.lab.scenario")], module
