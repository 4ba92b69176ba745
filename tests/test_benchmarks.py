"""The benchmark scripts still run (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.conftest import topic_examples, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _run_json(script: str, *args: str) -> Any:
    """Run benchmarks/SCRIPT with ``args``; its JSON report (the run must succeed)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow  # starts a process
def test_wire_benchmark_runs_and_reports_its_ratio() -> None:
    report = _run_json("wire.py", "--mib", "2", "--repeats", "1", "--small-messages", "20", "--json")
    assert report["update"]["payload_bytes"] == 2 * 2**20
    assert report["ratio"] > 0 and isinstance(report["pass"], bool)
    assert report["pass"] == (report["ratio"] >= report["target"])
    assert report["pipeline"]["gbps"] > 0 and report["zmq"]["gbps"] > 0
    assert report["update"]["frames"] == 1 and report["update"]["wire_version"] == 2
    # The CurveZMQ comparison (issue 13): the same loopback with CURVE on.
    assert report["curve"]["gbps"] > 0 and report["ratio_curve"] > 0
    assert report["pass_curve"] == (report["ratio_curve"] >= report["target"])
    assert report["context"]["join_copy_gbps"] > 0  # the single-frame copy, measured
    assert report["simulator"]["messages"] > 0


@pytest.mark.slow  # starts a process
def test_codec_benchmark_runs_and_reports_sizes() -> None:
    rows = _run_json("codec.py", "--mib", "0.25", "--repeats", "1", "--json")
    encodings = ["float32", "q8", "topk8_d4", "topk8_d8", "topk8_d16", "topk8_d32", "topk8_d64", "sign1"]
    assert [r["encoding"] for r in rows] == encodings
    assert all(r["elements"] == 2**16 and r["wire_ms"] > 0 for r in rows)
    sizes = {r["encoding"]: r["bytes"] for r in rows}
    assert sizes["float32"] == 2**18 and sizes["q8"] == 2**16 + 4 * 2**8
    assert sizes["q8"] > sizes["topk8_d4"] > sizes["topk8_d16"] > sizes["topk8_d64"] > sizes["sign1"]
    assert all(r["encode_ms"] > 0 and r["decode_ms"] > 0 for r in rows[1:])


@pytest.mark.slow
def test_consensus_benchmark_runs_on_a_tiny_model(tiny_bert_dir: Path) -> None:
    args = ["--topology", "ring:4", "--rounds", "12", "--model", str(tiny_bert_dir), "--num-labels", "5"]
    args.append("--json")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "consensus.py"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["nodes"] == 4 and len(report["network_distances"]) == 12
    # ring:4: lambda2^2 = 1/9 exactly; the real network must follow it.
    assert abs(report["lambda2_squared"] - 1 / 9) < 1e-9
    assert abs(report["network_decay_per_round"] / report["lambda2_squared"] - 1) < 0.1


@pytest.mark.slow
def test_simulator_benchmark_runs_quick() -> None:
    report = _run_json("simulator.py", "--quick", "--json")
    gossip, training = report["gossip"], report["training"]
    assert gossip["identical_results"] is True and gossip["rejected"] == 0
    assert gossip["messages"] == 6 * 64 * 11  # exp:64 has degree 11: every node sends every round
    assert gossip["one_worker_s"] > 0 and gossip["many_workers_s"] > 0
    assert training["nodes"] == 16 and training["mean_distance"] < 1.0


@pytest.mark.slow  # starts a process
def test_the_degree_table_in_membership_md_is_what_the_benchmark_computes() -> None:
    rows = _run_json("membership_degree.py", "--quick", "--json")
    doc = (ROOT / "docs" / "membership.md").read_text(encoding="utf-8")
    for n in (16, 64):
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"| {n} |"))
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        ours = [r for r in rows if r["nodes"] == n]
        assert cells == [f"{r['lambda2']:.3f} ({r['rounds_to_1e-3']})" for r in ours], (n, cells)


@pytest.mark.slow  # starts 8 node processes
def test_averaging_benchmark_runs_and_every_peer_holds_the_exact_mean() -> None:
    report = _run_json("averaging.py", "--mib", "1", "--repeats", "1", "--stages", "--json")
    assert report["peers"] == 4 and report["topology"] == "complete:4" and report["mib"] == 1
    for mode in ("curve", "plaintext"):  # encryption on (the default) and off, side by side
        result = report[mode]
        assert result["every_peer_heard_all"] and result["exact"], result
        assert 0.0 <= result["max_abs_error"] <= report["float32_bound"] < 1e-6
        assert len(result["s_runs"]) == 1 and result["median_s"] > 0
        assert result["profile"]["threads"]["libzmq I/O thread"]["cpu_s"] > 0
        assert result["profile"]["stages_cpu_s"]["mix"] > 0
    assert report["exact"] is True
    assert report["pass"] == (report["ratio_to_target"] <= 1.0)


@pytest.mark.slow  # node processes in network namespaces
def test_overlap_benchmark_runs_in_network_namespaces(tmp_path: Path) -> None:
    """The timed runs (the demo's job that --accuracy adds is the scenario runner's, tested elsewhere)."""
    args = [
        "--dim", "4096", "--step-s", "0.1", "--rounds", "4", "--local-steps", "2", "--transfer-steps", "1",
        "--out", str(tmp_path / "runs"), "--json",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overlap.py"), *args],
        check=False, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode == 2 and "cannot emulate hosts" in result.stderr:
        pytest.skip(result.stderr.strip())
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    for mode in ("synchronous", "overlap"):
        figures = report["modes"][mode]
        assert figures["message_bytes"] > 4 * 4096 and figures["wait_s_per_round"] >= 0
        assert 0 < figures["steady_fraction"] <= 1 and 0 < figures["whole_fraction"] <= 1
    assert "demo" not in report
    assert report["tc"][0].startswith("eth0 htb, per destination:") and report["transfer_steps"] > 0
    # Every node of the overlapped run recorded which round each mix came from.
    node0 = tmp_path / "runs" / "timed-overlap-0" / "run" / "nodes" / "node0"
    records = (node0 / "metrics.jsonl").read_text().splitlines()
    mixed = [json.loads(line).get("mixed_round") for line in records if '"event": "round"' in line]
    assert mixed == [None, 1, 2, 4], mixed


@pytest.mark.slow  # node processes
def test_bytes_to_accuracy_benchmark_runs_on_a_tiny_model(tmp_path: Path, tiny_bert_dir: Path) -> None:
    # baselines are dropped by the benchmark: it runs the gossip job only
    path = _tiny_scenario(tmp_path, tiny_bert_dir, "bytes-smoke", rounds=3, baselines=["local"])
    report = _run_json("bytes_to_accuracy.py", "--scenario", str(path), "q8", "--json")
    none, q8 = report["variants"]["none"], report["variants"]["q8"]
    assert [p["round"] for p in none["curve"]] == [0, 1, 2, 3] == [p["round"] for p in q8["curve"]]
    assert none["curve"][0]["mb_sent"] == 0 and none["bytes_to_threshold"] is not None
    # q8 sends a quarter of float32's payload; on this tiny adapter the headers (signed, in every
    # message) are about as large as the payload, so the whole is about half.
    assert 0 < q8["curve"][-1]["mb_sent"] < 0.6 * none["curve"][-1]["mb_sent"]
    assert report["threshold"] == pytest.approx(none["final_mean_accuracy"] - 0.005)


def _tiny_scenario(folder: Path, model_dir: Path, name: str, *, rounds: int, **header: Any) -> Path:
    """A ring of 4 tiny-BERT nodes on generated topics: a scenario file for the benchmarks' smoke tests."""
    data = write_jsonl(folder / "data.jsonl", topic_examples(240, seed=1))
    scenario = {
        "name": name,
        "topology": "ring:4",
        **header,
        "model": {"path": str(model_dir), "task": "classification", "num_labels": 2},
        "lora": {"rank": 2, "target_modules": ["query", "value"]},
        "data": {"source": str(data), "partition": "iid"},
        "train": {"local_steps": 2, "batch_size": 4, "max_length": 16},
        "gossip": {"rounds": rounds, "round_timeout_s": 20.0},
    }
    path = folder / "scenario.toml"
    path.write_text(tomli_w.dumps(scenario))
    return path
