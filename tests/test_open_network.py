"""An open network of real `p2pfm node` processes on loopback (tiny model): join, leave, crash, report."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfm.lab.scenario import run_scenario
from p2pfm.node.metrics import read_metrics
from tests.conftest import tiny_classifier_toml, topic_examples, write_jsonl

pytestmark = pytest.mark.slow  # starts node processes (each imports torch)

ROUNDS = 14


def test_members_join_leave_and_crash_without_restarts(tmp_path: Path, tiny_bert_dir: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(300, seed=3))
    scenario = tmp_path / "open.toml"
    scenario.write_text(
        f"""
name = "open-small"
topology = "open:6"
timeout_s = 300
{tiny_classifier_toml(tiny_bert_dir, data)}
[train]
batch_size = 8
max_length = 16
threads = 1
local_steps = 40

[gossip]
rounds = {ROUNDS}
round_timeout_s = 10.0

[membership]
degree = 3

[[faults.join]]
node = 4
round = 1

[[faults.join]]
node = 5
round = 1

[[faults.leave]]
node = 2
round = 4

[[faults.crash]]
node = 3
round = 4
restart = false
"""
    )
    summary = run_scenario(scenario, tmp_path / "run", log=lambda _: None)
    assert summary.ok  # the leaver exited 130, the crashed node stayed down, everyone else exited 0
    by_name = {n.name: n for n in summary.nodes}
    for name in ("node0", "node1", "node4", "node5"):  # everyone left in the network finishes every round
        assert by_name[name].finished and by_name[name].rounds_completed == ROUNDS, name
    assert by_name["node2"].rounds_completed < ROUNDS and not by_name["node2"].finished
    nodes = tmp_path / "run" / "nodes"
    for joiner in ("node4", "node5"):  # started with only node0's address, took the network's state
        joined = [r for r in read_metrics(nodes / joiner / "metrics.jsonl") if r["event"] == "joined"]
        assert joined and joined[0]["round"] >= 1 and joined[0]["sources"] >= 1
        assert (nodes / joiner / "node.toml").read_text().count("tcp://") == 2  # listen and one bootstrap
    changes: dict[str, int] = {}
    for name in ("node0", "node1"):
        last = [r for r in read_metrics(nodes / name / "metrics.jsonl") if r["event"] == "done"][-1]
        for reason, count in last["view_changes"].items():
            changes[reason] = changes.get(reason, 0) + count
        assert last["control_rejected"] == {} and last["rejected"].get("bad_signature", 0) == 0
    assert changes.get("left", 0) >= 1  # node2's graceful leave reached its neighbours
    membership = {m.round: m for m in summary.membership}
    assert membership[1].members == 4 and membership[1].min_degree == 3
    assert membership[ROUNDS].members == 4 and membership[ROUNDS].components == 1
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Membership" in report and "node3 after round 4, no restart" in report
