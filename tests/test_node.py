"""`p2pfm node` start-up checks, as an operator meets them (one-line errors)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w

from p2pfm.core.identity import Identity, write_key_file
from p2pfm.node.metrics import read_metrics
from tests.conftest import topic_examples, write_jsonl

pytestmark = pytest.mark.slow  # starts node processes (each imports torch)


def _config(tmp_path: Path, model_dir: Path, **model: object) -> Path:
    write_key_file(Identity.generate(), tmp_path / "node.key")
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(40, seed=0))
    doc = {
        "node": {"key": "node.key", "listen": "tcp://127.0.0.1:45999", "network": "n", "out": "out"},
        "peers": [{"id": Identity.generate().peer_id.hex, "address": "tcp://127.0.0.1:45998"}],
        "model": {"path": str(model_dir), "task": "classification", "num_labels": 2, **model},
        "data": {"source": str(data), "partition": "iid"},
        "gossip": {"rounds": 1},
    }
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def _node(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "node.py"), "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_label_count_mismatch_names_the_field(tmp_path: Path, tiny_bert_dir: Path) -> None:
    result = _node(_config(tmp_path, tiny_bert_dir, num_labels=3))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "config field 'model.num_labels'" in result.stderr and "set num_labels = 2" in result.stderr


def test_missing_key_file_is_one_line(tmp_path: Path, tiny_bert_dir: Path) -> None:
    config = _config(tmp_path, tiny_bert_dir)
    (tmp_path / "node.key").unlink()
    result = _node(config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("(create one with `p2pfm keygen --out PATH`)")


def test_sigterm_stops_a_waiting_node_cleanly(tmp_path: Path, tiny_bert_dir: Path) -> None:
    config = _config(tmp_path, tiny_bert_dir)
    text = config.read_text().replace("rounds = 1", "rounds = 50\nround_timeout_s = 600.0")
    config.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pfm", "node", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 90
        # Round 0 is evaluated before training; after it the node trains and then
        # waits (up to 600 s) for a neighbour that does not exist.
        while time.monotonic() < deadline and not any(r.get("round") == 0 for r in read_metrics(metrics)):
            time.sleep(0.2)
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert time.monotonic() - started < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
    assert code == 130
    done = [r for r in read_metrics(metrics) if r["event"] == "done"]
    assert done and done[-1]["stopped"] is True
    assert (tmp_path / "out" / "checkpoint" / "meta.json").exists()
