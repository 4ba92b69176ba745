"""`p2pfm simulate` with faults and attacks: as flags, from a scenario file, and refused when wrong.

Two runs go through a real ``p2pfm`` process, as a user starts it (each
takes well under 2 s: no model, no torch); the flag checks call the
command's entry point in-process, which is what the process runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pfm import cli

FAULTS_SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "faults.toml"


def _p2pfm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfm", *args], check=False, capture_output=True, text=True, timeout=120
    )


def _simulate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["simulate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    code, out, err = _simulate(capsys, *args, "--json")
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out)
    return doc


def _nodes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in doc["node_results"]}


@pytest.mark.slow  # starts a process
def test_an_attacker_given_as_a_flag_is_in_the_json() -> None:
    result = _p2pfm("simulate", "ring:8", "--rounds", "6", "--attack", "3:scale", "--rule", "clip", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    nodes = _nodes(doc)
    assert nodes["node3"]["attack"] == "scale"
    assert [name for name, n in nodes.items() if n["attack"]] == ["node3"]
    assert all(n["rounds_completed"] == 6 and n["crashes"] == 0 for n in nodes.values())
    assert [r["round"] for r in doc["rounds"]] == list(range(7)) and doc["rejected"] == 0


@pytest.mark.slow  # starts a process
def test_the_faults_scenario_runs_its_crash_slow_node_and_lossy_link() -> None:
    result = _p2pfm("simulate", "--scenario", str(FAULTS_SCENARIO), "--rounds", "4", "--dim", "8", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["topology"], doc["nodes"]) == ("ring:4", 4)
    nodes = _nodes(doc)
    assert nodes["node1"]["crashes"] == 1 and nodes["node1"]["rounds_trained"] < 4  # crashed after round 2
    assert all(nodes[n]["crashes"] == 0 for n in ("node0", "node2", "node3"))
    assert all(n["rounds_completed"] == 4 for n in nodes.values())
    assert [r["nodes"] for r in doc["rounds"]] == [4, 4, 4, 3, 4]  # node1 was down for round 3
    # The 0-3 link loses messages before the wire: counted as sent, no bytes.
    rounds = doc["rounds"][1:]
    message_bytes = max(r["bytes"] / r["messages"] for r in rounds)
    assert any(r["bytes"] < r["messages"] * message_bytes for r in rounds)


def test_flags_add_to_the_scenarios_faults_and_a_spec_replaces_its_topology(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = _json(capsys, "--scenario", str(FAULTS_SCENARIO), "--dim", "4", "--attack", "0:signflip")
    assert [r["round"] for r in doc["rounds"]] == list(range(7))  # the scenario's gossip.rounds
    nodes = _nodes(doc)
    assert nodes["node0"]["attack"] == "signflip" and nodes["node1"]["crashes"] == 1
    other = _json(capsys, "complete:6", "--scenario", str(FAULTS_SCENARIO), "--rounds", "3", "--dim", "4")
    assert (other["topology"], other["nodes"]) == ("complete:6", 6)  # its faults' nodes and link exist


def test_the_table_lists_the_nodes_when_some_misbehave(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _simulate(capsys, "ring:4", "--rounds", "3", "--dim", "4", "--crash", "1:1:2")
    assert code == 0, err
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if "node1" in line]
    assert len(rows) == 1 and rows[0][:2] == ["node1", "-"] and rows[0][4] == "1"  # 1 crash
    assert "honest nodes: distance to the optimum" in out


@pytest.mark.slow  # starts a process
def test_a_bad_flag_value_is_a_one_line_error_from_the_process() -> None:
    result = _p2pfm("simulate", "ring:8", "--rounds", "2", "--attack", "x:scale")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pfm: error: ") and "'--attack'" in lines[0]


_REFUSED = [
    (["--attack", "x:scale"], "invalid literal"),
    (["--attack", "3"], "expected 2 or 3 fields"),
    (["--slow", "2"], "expected 2 fields"),
    (["--slow", "2:fast"], "could not convert"),
    (["--crash", "1:2:3:4"], "expected 2 or 3 fields"),
    (["--drop-link", "0:1"], "expected 3 fields"),
    (["--drop", "2"], "must be in [0, 1]"),  # from SimConfig, which names its field: the flag is named
    (["--steps", "-1"], "must be >= 0"),
    (["--lr", "3", "--steps", "1"], "must be in (0, 1]"),
]
_NOT_NAMING_THE_FLAG = [  # refused by simulate()'s checks, which name "faults.<kind>[i].<field>"
    ["--slow", "2:0.5"],
    ["--slow", "2:inf"],
    ["--crash", "1:-1"],
    ["--crash", "1:1:-5"],
    ["--drop-link", "0:5:0.3"],  # not an edge of ring:8
    ["--drop-link", "0:1:2"],
    ["--attack", "3:scale:nan"],
    ["--attack", "3:bogus"],  # "unknown attack 'bogus'", from SimConfig
]


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        *(pytest.param(flags, fragment, id=" ".join(flags)) for flags, fragment in _REFUSED),
        *(pytest.param(flags, "", id=" ".join(flags)) for flags in _NOT_NAMING_THE_FLAG),
    ],
)
def test_bad_fault_flags_are_one_line_errors_naming_the_flag(
    capsys: pytest.CaptureFixture[str], flags: list[str], fragment: str
) -> None:
    code, _, err = _simulate(capsys, "ring:8", "--rounds", "2", "--dim", "4", "--json", *flags)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pfm: error: "), err
    assert f"'{flags[0]}'" in lines[0] and fragment in lines[0]
