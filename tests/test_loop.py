"""The node loop in-process: its own I/O failing is survived, a resume never re-signs a sent round."""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from p2pfm.config.node_config import load_node_config
from p2pfm.core.identity import Identity, write_key_file
from p2pfm.learn.checkpoint import load_checkpoint
from p2pfm.node import store as store_module
from p2pfm.node.factory import build_node
from p2pfm.node.metrics import read_metrics
from p2pfm.node.store import SENT_FILE
from tests.conftest import topic_examples, write_jsonl


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, model_dir: Path, rounds: int) -> Path:
    """A node whose one neighbour never answers: each round ends at a short deadline."""
    if not (tmp_path / "node.key").exists():
        write_key_file(Identity.generate(), tmp_path / "node.key")
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(40, seed=0))
    doc = {
        "node": {
            "key": "node.key",
            "listen": f"tcp://127.0.0.1:{_free_port()}",
            "network": "n",
            "out": "out",
        },
        "peers": [{"id": Identity(b"\x07" * 32).peer_id.hex, "address": f"tcp://127.0.0.1:{_free_port()}"}],
        "model": {"path": str(model_dir), "task": "classification", "num_labels": 2},
        "lora": {"rank": 2, "target_modules": ["query", "value"]},
        "data": {"source": str(data), "partition": "iid"},
        "train": {"local_steps": 1, "batch_size": 4, "max_length": 16, "threads": 1},
        "gossip": {"rounds": rounds, "round_timeout_s": 0.3, "eval_every": 100},
        "transport": {"linger_ms": 0},
    }
    path = tmp_path / "node.toml"
    path.write_text(tomli_w.dumps(doc))
    return path


def _rounds(tmp_path: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["event"] == "round"]


def test_failing_checkpoint_and_metrics_writes_do_not_stop_training(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 9 item 3: 'Too many open files' in save_checkpoint made the node exit 1."""
    real_save = store_module.save_checkpoint
    calls = {"n": 0}

    def flaky_save(folder: Path, checkpoint: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= 2:  # rounds 1 and 2: no descriptors, then no space
            raise OSError(errno.EMFILE if calls["n"] == 1 else errno.ENOSPC, "simulated")
        real_save(folder, checkpoint)

    monkeypatch.setattr(store_module, "save_checkpoint", flaky_save)
    node = build_node(load_node_config(_config(tmp_path, tiny_bert_dir, rounds=4)))
    metrics = node.store.metrics  # type: ignore[attr-defined]  (a DiskStore)
    real_write = metrics.write
    failures = {"n": 0}

    def flaky_write(event: str, **fields: Any) -> dict[str, Any]:
        if event == "round" and fields.get("round") == 3 and not failures["n"]:
            failures["n"] += 1
            raise OSError(errno.ENOSPC, "simulated")
        return real_write(event, **fields)

    monkeypatch.setattr(metrics, "write", flaky_write)
    result = node.run()
    assert result.rounds_completed == 4 and result.rounds_trained == 4 and not result.stopped
    checkpoint = load_checkpoint(tmp_path / "out" / "checkpoint")
    assert checkpoint is not None and checkpoint.round == 4  # retried every round, written in the end
    done = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["event"] == "done"][-1]
    assert done["io_errors"] == {"checkpoint": 2, "metrics": 1}
    assert [r["round"] for r in _rounds(tmp_path)] == [1, 2, 3, 4]  # round 3's line was retried, in order
    assert (tmp_path / "out" / "adapter").is_dir()


def test_a_final_adapter_that_cannot_be_written_is_an_error_not_a_crash(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "simulated")

    node = build_node(load_node_config(_config(tmp_path, tiny_bert_dir, rounds=1)))
    monkeypatch.setattr(node.learner, "save", full_disk)
    result = node.run()
    assert not result.adapter_saved and not result.stopped and result.rounds_trained == 1
    done = [r for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if r["event"] == "done"][-1]
    assert done["adapter_saved"] is False and done["io_errors"]["adapter"] == 3
    assert load_checkpoint(tmp_path / "out" / "checkpoint") is not None  # the adapter is still there


def test_resume_after_a_crash_between_sending_and_checkpointing_starts_a_fresh_round(
    tmp_path: Path, tiny_bert_dir: Path
) -> None:
    node = build_node(load_node_config(_config(tmp_path, tiny_bert_dir, rounds=2)))
    assert node.run().rounds_trained == 2
    sent = json.loads((tmp_path / "out" / SENT_FILE).read_text())
    assert sent["round"] == 2  # recorded before round 2's update went out
    # Simulate: round 3 was sent (seq 7), then the process died before its checkpoint.
    (tmp_path / "out" / SENT_FILE).write_text(json.dumps({"round": 3, "seq": 7}))
    resumed = build_node(load_node_config(_config(tmp_path, tiny_bert_dir, rounds=5)), resume=True)
    result = resumed.run()
    rounds = [r["round"] for r in _rounds(tmp_path) if r["round"] > 2]
    assert rounds == [4, 5]  # round 3 is spoken for: never signed a second time
    assert resumed.protocol.seq > 7 and result.rounds_trained == 2 + 2
    assert json.loads((tmp_path / "out" / SENT_FILE).read_text()) == {"round": 5, "seq": resumed.protocol.seq}


def test_out_folder_is_private(tmp_path: Path, tiny_bert_dir: Path) -> None:
    node = build_node(load_node_config(_config(tmp_path, tiny_bert_dir, rounds=1)))
    node.run()
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o700
    assert (out / "adapter").stat().st_mode & 0o777 == 0o700
    files = [
        out / SENT_FILE,
        out / "metrics.jsonl",
        *(out / "checkpoint").iterdir(),
        *(out / "adapter").iterdir(),
    ]
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path
