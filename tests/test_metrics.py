"""MetricsWriter: a private folder and file, appended and flushed per record, never through a symlink."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from p2pfm.core.errors import UnsafePathError
from p2pfm.node.metrics import MetricsWriter, read_metrics


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_folder_and_file_are_private_and_records_flushed(tmp_path: Path) -> None:
    path = tmp_path / "out" / "metrics.jsonl"
    old = os.umask(0o022)
    try:
        writer = MetricsWriter(path, node="n0")
    finally:
        os.umask(old)
    try:
        assert _mode(tmp_path / "out") == 0o700 and _mode(path) == 0o600
        writer.write("start", x=1)
        assert [r["event"] for r in read_metrics(path)] == ["start"]  # readable before close
    finally:
        writer.close()


def test_existing_file_is_appended_to_and_made_private(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    first = MetricsWriter(path, node="n0")
    first.write("start")
    first.close()
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    second = MetricsWriter(path, node="n0")
    second.write("resume")
    second.close()
    assert [r["event"] for r in read_metrics(path)] == ["start", "resume"]
    assert _mode(path) == 0o600 and _mode(tmp_path) == 0o700


def test_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o644)
    (tmp_path / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="symbolic link; remove it") as info:
        MetricsWriter(tmp_path / "metrics.jsonl")
    assert str(tmp_path / "metrics.jsonl") in str(info.value)
    assert victim.read_text() == "precious" and _mode(victim) == 0o644
