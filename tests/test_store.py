"""A node's store: what outlives a round, kept through its own I/O failing (DiskStore) or in memory."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from p2pfm.core.errors import ConfigError
from p2pfm.core.evidence import evidence_file_name
from p2pfm.learn.checkpoint import Checkpoint
from p2pfm.learn.learner import QuadraticLearner
from p2pfm.node import store as store_module
from p2pfm.node.metrics import read_metrics
from p2pfm.node.store import SENT_FILE, DiskStore, MemoryStore, NodeStore

ACCUSED = "ab" * 32


def _checkpoint(round_: int) -> Checkpoint:
    learner = QuadraticLearner(np.ones(4), np.zeros(4), noise=0.1, seed=round_)
    learner.train_steps(2)  # a generator state that differs from a fresh one
    return Checkpoint(
        round_, 2 * round_ + 1, learner.get_state(), learner.state_dict(), rounds_trained=round_
    )


def _disk(out: Path) -> DiskStore:
    return DiskStore(out, name="n0", common={"node": "n0", "peer": "cafe"})


class _Collect(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        assert getattr(record, "node", None) == "n0"  # every record names its node
        self.lines.append(record.getMessage())


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """What the store logs (through logging, p2pfm/core/logs.py)."""
    lines: list[str] = []
    handler, logger = _Collect(lines), logging.getLogger("p2pfm.node.store")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _full_disk(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def test_sent_record_and_checkpoint_survive_a_restart(tmp_path: Path) -> None:
    store: NodeStore = _disk(tmp_path / "out")
    assert store.load() == (None, None)
    assert store.record_sent(3, 7)
    store.save_round(_checkpoint(3), snapshot=False)
    store.close()
    checkpoint, sent = _disk(tmp_path / "out").load()  # a new process on the same folder
    expected = _checkpoint(3)
    assert sent == (3, 7) and checkpoint is not None
    assert (checkpoint.round, checkpoint.seq, checkpoint.rounds_trained) == (3, 7, 3)
    np.testing.assert_array_equal(checkpoint.adapter["x"], expected.adapter["x"])
    assert checkpoint.trainer == expected.trainer  # the generator state, 128-bit integers included
    assert not (tmp_path / "out" / "snapshots").exists()


def test_an_unreadable_sent_record_names_the_out_folder(tmp_path: Path) -> None:
    store = _disk(tmp_path / "out")
    (tmp_path / "out" / SENT_FILE).write_text('{"round": 3}')
    with pytest.raises(ConfigError, match="remove it to start over") as info:
        store.load()
    assert info.value.field == "node.out" and SENT_FILE in str(info.value)


def test_a_failed_write_is_counted_by_what_logged_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[str]
) -> None:
    store = _disk(tmp_path / "out")
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "write_private_file", _full_disk)
        patch.setattr(store_module, "save_checkpoint", _full_disk)
        assert not store.record_sent(1, 1)  # the node then stays silent this round
        store.save_round(_checkpoint(1), snapshot=True)  # never raises: training goes on
        store.save_evidence(ACCUSED, 1, b"proof")
    assert store.io_errors == {"sent_record": 1, "checkpoint": 1, "snapshot": 1, "evidence": 1}
    assert len(logs) == 4 and all("No space left" in line and "training goes on" in line for line in logs)
    assert store.load() == (None, None)
    assert store.record_sent(2, 3)  # the disk takes it again: the next write succeeds
    store.save_round(_checkpoint(2), snapshot=True)
    checkpoint, sent = store.load()
    assert sent == (2, 3) and checkpoint is not None and checkpoint.round == 2
    assert (tmp_path / "out" / "snapshots" / "round_00002.safetensors").is_file()
    assert store.io_errors["sent_record"] == 1  # successes are not counted


def test_metrics_records_the_disk_refused_are_written_later_in_order_and_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[str]
) -> None:
    store = _disk(tmp_path / "out")
    real_write = store.metrics.write
    disk = {"full": True}

    def write(event: str, **fields: Any) -> dict[str, Any]:
        if disk["full"]:
            _full_disk()
        return real_write(event, **fields)

    monkeypatch.setattr(store.metrics, "write", write)
    for round_ in range(1005):
        store.write("round", round=round_)
    assert store.io_errors["metrics"] == 1005
    assert len(logs) == 4  # the 1st, 10th, 100th and 1000th failure: no log flood
    assert [line.split("; ")[1].split(" so far")[0] for line in logs] == ["1", "10", "100", "1000"]
    disk["full"] = False
    recovered_s = time.time()
    store.write("done", rounds_completed=1005)
    store.close()
    records = list(read_metrics(tmp_path / "out" / "metrics.jsonl"))
    assert [r.get("round") for r in records[:-1]] == list(range(5, 1005))  # the newest 1000, in order
    assert records[-1]["event"] == "done" and all(r["node"] == "n0" for r in records)
    assert all(r["time_s"] < recovered_s for r in records[:-1])  # when it was made, not when written


def test_the_final_adapter_gets_three_tries_a_second_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: list[str]
) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(time, "sleep", sleeps.append)  # the pause between tries
    store = _disk(tmp_path / "out")
    learner = QuadraticLearner(np.ones(4), np.zeros(4))
    failures = {"left": 2}
    real_save = learner.save

    def flaky_save(folder: Path) -> None:
        if failures["left"]:
            failures["left"] -= 1
            _full_disk()
        real_save(folder)

    monkeypatch.setattr(learner, "save", flaky_save)
    assert store.save_final(learner)
    assert sleeps == [1.0, 1.0] and store.io_errors["adapter"] == 2
    assert (tmp_path / "out" / "adapter" / "state.safetensors").is_file()
    sleeps.clear()
    monkeypatch.setattr(learner, "save", _full_disk)
    assert not store.save_final(learner)
    assert sleeps == [1.0, 1.0]  # no pause after the last try
    assert store.io_errors["adapter"] == 5
    assert "could not write the final adapter" in logs[-1] and str(store.checkpoint_dir) in logs[-1]


def test_every_folder_is_0700_and_every_file_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = _disk(tmp_path / "out")
        store.record_sent(4, 9)
        store.save_round(_checkpoint(4), snapshot=True)
        where = store.save_evidence(ACCUSED, 4, b"two heads")
        store.write("round", round=4)
        store.close()
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert where == str(out / "evidence" / evidence_file_name(ACCUSED, 4))
    assert Path(where).read_bytes() == b"two heads"
    snapshot = safetensors.numpy.load_file(str(out / "snapshots" / "round_00004.safetensors"))
    np.testing.assert_array_equal(snapshot["x"], _checkpoint(4).adapter["x"])
    assert json.loads((out / SENT_FILE).read_text()) == {"round": 4, "seq": 9}
    folders = [out, out / "checkpoint", out / "snapshots", out / "evidence"]
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {p.name for p in files} >= {SENT_FILE, "metrics.jsonl", "meta.json", "round_00004.safetensors"}
    assert all(_mode(folder) == 0o700 for folder in folders), [oct(_mode(f)) for f in folders]
    assert all(_mode(path) == 0o600 for path in files), [(p.name, oct(_mode(p))) for p in files]


def test_memory_store_keeps_the_newest_checkpoint_and_every_record() -> None:
    store: NodeStore = MemoryStore(node="n1")
    assert store.load() == (None, None) and not store.io_errors
    assert store.record_sent(1, 1) and store.record_sent(2, 4)
    store.save_round(_checkpoint(1), snapshot=False)
    store.save_round(_checkpoint(2), snapshot=True)
    checkpoint, sent = store.load()
    assert sent == (2, 4) and checkpoint is not None and checkpoint.round == 2
    store.write("start", dim=4)
    store.write("round", round=1, node="overridden")
    assert isinstance(store, MemoryStore)
    assert store.records == [
        {"event": "start", "node": "n1", "dim": 4},
        {"event": "round", "node": "overridden", "round": 1},  # a record's own field wins, as on disk
    ]
    assert store.save_evidence(ACCUSED, 2, b"proof") == f"memory:{evidence_file_name(ACCUSED, 2)}"
    assert store.evidence == {evidence_file_name(ACCUSED, 2): b"proof"}
    learner = QuadraticLearner(np.ones(4), np.zeros(4))
    assert store.save_final(learner)
    assert store.final is not None
    np.testing.assert_array_equal(store.final["x"], learner.get_state()["x"])
