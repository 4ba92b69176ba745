"""The p2pfm command as a user runs it: real subprocesses, exit codes, output."""

from __future__ import annotations

import itertools
import json
import math
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfm.lab.summary import Baselines, NodeSummary, Summary, write_summary


def _p2pfm(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfm", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("p2pfm: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow  # starts a process
def test_keygen_and_peer_id(tmp_path: Path) -> None:
    key = tmp_path / "a.key"
    made = _p2pfm("keygen", "--out", str(key))
    assert made.returncode == 0
    peer = made.stdout.strip()
    assert len(peer) == 64 and int(peer, 16) >= 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    shown = _p2pfm("peer-id", str(key))
    assert shown.returncode == 0 and shown.stdout.strip() == peer
    _assert_one_line_error(_p2pfm("keygen", "--out", str(key)), str(key), "--force")
    again = _p2pfm("keygen", "--out", str(key), "--force")
    assert again.returncode == 0 and again.stdout.strip() != peer


@pytest.mark.parametrize(
    ("content", "mode", "fragment"),
    [
        (None, 0o600, "does not exist"),
        ('{"format": "p2pfm-ed25519-v1", "se', 0o600, "truncated"),
        ('{"format": "p2pfm-ed25519-v1", "seed": "00", "public": "00"}', 0o600, "corrupt"),
        ("{}", 0o644, "chmod 600"),
    ],
)
@pytest.mark.slow  # starts a process
def test_bad_key_files_give_one_line_errors(
    tmp_path: Path, content: str | None, mode: int, fragment: str
) -> None:
    key = tmp_path / "bad.key"
    if content is not None:
        key.write_text(content)
        key.chmod(mode)
    _assert_one_line_error(_p2pfm("peer-id", str(key)), str(key), fragment)


@pytest.mark.slow  # starts a process
def test_topology_show_json(tmp_path: Path) -> None:
    png = tmp_path / "ring.png"
    result = _p2pfm("topology", "show", "ring:16", "--json", "--png", str(png))
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert set(stats) == {
        "nodes", "edges", "min_degree", "max_degree", "lambda2", "spectral_gap", "rounds_to_1e-3",
    }  # fmt: skip
    assert (stats["nodes"], stats["edges"], stats["min_degree"], stats["max_degree"]) == (16, 16, 2, 2)
    lam = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / 16)
    assert stats["lambda2"] == pytest.approx(lam)
    assert stats["spectral_gap"] == pytest.approx(1 - lam)
    assert stats["rounds_to_1e-3"] == math.ceil(math.log(1000) / -math.log(lam))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = _p2pfm("topology", "show", "torus:4x4")
    assert table.returncode == 0 and "spectral_gap" in table.stdout and "0.4000" in table.stdout


@pytest.mark.slow  # starts a process
def test_topology_errors_are_one_line() -> None:
    _assert_one_line_error(_p2pfm("topology", "show", "bogus:4"), "bogus")
    _assert_one_line_error(_p2pfm("topology", "show", "erdos:12:0.05:1"), "disconnected")
    _assert_one_line_error(_p2pfm("topology", "show", "/nonexistent/graph.graphml"), "graph.graphml")


@pytest.mark.slow  # starts a process
def test_simulate_json() -> None:
    result = _p2pfm("simulate", "torus:4x4", "--rounds", "5", "--dim", "50", "--seed", "3", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["topology"] == "torus:4x4" and doc["nodes"] == 16
    assert doc["lambda2"] == pytest.approx(0.6)
    assert [r["round"] for r in doc["rounds"]] == list(range(6))
    distances = [r["consensus_distance"] for r in doc["rounds"]]
    assert all(b < a for a, b in itertools.pairwise(distances))
    assert all(r["messages"] == 64 and r["bytes"] > 64 * 200 for r in doc["rounds"][1:])


@pytest.mark.slow  # starts a process
def test_simulate_table_and_bad_numbers() -> None:
    table = _p2pfm("simulate", "exp:8", "--rounds", "12", "--dim", "20")
    assert table.returncode == 0 and "predicted decay" in table.stdout and "measured decay" in table.stdout
    _assert_one_line_error(_p2pfm("simulate", "ring:4", "--rounds", "2", "--drop", "2"), "drop")
    usage = _p2pfm("simulate", "ring:4")
    assert usage.returncode == 2 and "--rounds" in usage.stderr


@pytest.mark.slow  # starts a process
def test_report_prints_a_run_and_redraws_it_from_summary_json(tmp_path: Path) -> None:
    summary = Summary(
        scenario="finished",
        topology="ring:3",
        model="minilm",
        task="classification",
        ok=True,
        wall_s=30.0,
        nodes=tuple(
            NodeSummary(f"node{i}", None, final, ((0, 0.1), (4, final)), rounds_completed=4)
            for i, final in enumerate((0.8125, 0.6875, 0.75))
        ),
        baselines=Baselines({"node0": 0.5, "node1": 0.375, "node2": None}, pooled=0.875),
    )
    write_summary(tmp_path / "summary.json", summary)

    result = _p2pfm("report", str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert "scenario finished: final accuracy" in result.stdout
    lines = result.stdout.splitlines()
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    assert rows == [["node0", "0.812", "0.500"], ["node1", "0.688", "0.375"], ["node2", "0.750", "n/a"]]
    assert "mean gossip accuracy: 0.750" in result.stdout
    assert "local baseline: 0.438" in result.stdout and "pooled baseline: 0.875" in result.stdout
    assert "| node1 | 0.688 | 0.375 | 0.00 MB | 0.00 MB |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # starts a process
def test_report_on_a_bad_or_missing_summary_is_a_one_line_error(tmp_path: Path) -> None:
    _assert_one_line_error(_p2pfm("report", str(tmp_path / "nowhere")), "summary.json", "does not exist")
    doc = json.loads(json.dumps(Summary("s", "ring:2", "m", "classification", True, 1.0, ()).to_json()))
    del doc["wall_s"]
    (tmp_path / "summary.json").write_text(json.dumps(doc))
    _assert_one_line_error(
        _p2pfm("report", str(tmp_path)), str(tmp_path / "summary.json"), "'wall_s' is missing"
    )
    assert not (tmp_path / "report.md").exists()
