"""Attacks by one validly keyed member, on real node processes (tiny model, loopback, CurveZMQ).

Issue 9's network-level regression tests: a far-future round must not end
anyone's training, and an equivocating member is caught, banned everywhere
and its proof kept. Each test runs a scenario of 4 processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import pytest

from p2pfm import cli
from p2pfm.core import wire
from p2pfm.core.evidence import check_evidence_file, encode_evidence
from p2pfm.core.identity import PeerId
from p2pfm.lab.scenario import run_scenario
from p2pfm.lab.summary import Summary
from p2pfm.node.metrics import read_metrics
from tests.conftest import tiny_classifier_toml, topic_examples, write_jsonl

pytestmark = pytest.mark.slow
ROUNDS = 8


def _run(tmp_path: Path, model: Path, *, topology: str, attack: str, rounds: int = ROUNDS) -> Summary:
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(200, seed=5))
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(
        f"""
name = "hardening"
topology = "{topology}"
timeout_s = 300

{tiny_classifier_toml(model, data, "iid")}

[train]
local_steps = 2
batch_size = 8
max_length = 16
threads = 1

[gossip]
rounds = {rounds}
round_timeout_s = 4.0
eval_every = 100

[[faults.attack]]
node = 0
kind = "{attack}"
"""
    )
    return run_scenario(scenario, tmp_path / "run")


def _done(run: Path, node: str) -> dict[str, Any]:
    done = [r for r in read_metrics(run / "nodes" / node / "metrics.jsonl") if r.get("event") == "done"]
    assert done, f"{node} wrote no done event"
    return done[-1]


def test_far_future_rounds_from_one_neighbour_skip_no_training(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """Before the fix, one update claiming round 2^62 made node1 jump to the end (then node2, node3)."""
    line = tmp_path / "line4.edgelist"
    line.write_text("0 1\n1 2\n2 3\n")  # node0 (the attacker) - node1 - node2 - node3
    summary = _run(tmp_path, tiny_bert_dir, topology=str(line), attack="far-future")
    run = tmp_path / "run"
    for node in ("node1", "node2", "node3"):
        done = _done(run, node)
        assert done["rounds_completed"] == ROUNDS and not done["stopped"], (node, done)
        assert done["rounds_trained"] == ROUNDS, (node, done)  # every round trained, none skipped
    assert _done(run, "node1")["rejected"].get("future_round", 0) >= 1
    assert not [
        r for r in read_metrics(run / "nodes" / "node1" / "metrics.jsonl") if r["event"] == "caught_up"
    ]
    honest = {n.name: n for n in summary.nodes if n.name != "node0"}
    assert all(n.rounds_trained == ROUNDS and n.finished for n in honest.values()), honest


def test_an_equivocating_member_is_banned_everywhere_with_a_checkable_proof(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    summary = _run(tmp_path, tiny_bert_dir, topology="ring:4", attack="equivocate")
    run = tmp_path / "run"
    attacker = next(n.peer_id for n in summary.nodes if n.name == "node0")
    assert attacker is not None
    proofs = []
    for node in ("node1", "node2", "node3"):  # node1 and node3 are its neighbours; node2 only hears the proof
        done = _done(run, node)
        assert done["banned"] == ["node0"] or done["banned"] == [PeerId.from_hex(attacker).short], (
            node,
            done,
        )
        assert done["rounds_trained"] == ROUNDS and not done["stopped"]
        proofs += sorted((run / "nodes" / node / "evidence").glob("equivocation-*.msgpack"))
    assert proofs, "no proof file was written"
    for path in proofs:
        document = msgpack.unpackb(path.read_bytes(), raw=False)
        assert document["format"] == "p2pfm-equivocation-v1"
        facts = wire.check_evidence(*document["evidence"], wire.WireLimits())
        assert facts.accused.hex == attacker
        assert check_evidence_file(path).accused.hex == attacker
    assert cli.main(["evidence", "check", str(proofs[0])]) == 0
    tampered = tmp_path / "tampered.msgpack"
    first, second = document["evidence"]
    tampered.write_bytes(encode_evidence(document["network"], (first, second[:-1] + bytes([second[-1] ^ 1]))))
    assert cli.main(["evidence", "check", str(tampered)]) == 1  # one line, no traceback
    seen_directly = sum(_done(run, n)["rejected"].get("equivocation", 0) for n in ("node1", "node3"))
    assert seen_directly >= 1
