"""p2pfm.core.private_files: 0700 folders, 0600 files, never through a symlink."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfm.core.errors import UnsafePathError
from p2pfm.core.private_files import make_private_dir, write_private_file
from tests.conftest import file_mode, umask


def test_make_private_dir_creates_every_missing_parent_0700(tmp_path: Path) -> None:
    with umask(0o022):
        leaf = make_private_dir(tmp_path / "a" / "b" / "c")
    assert leaf == tmp_path / "a" / "b" / "c" and leaf.is_dir()
    assert [file_mode(p) for p in (tmp_path / "a", tmp_path / "a" / "b", leaf)] == [0o700] * 3


def test_make_private_dir_tightens_an_existing_leaf_only(tmp_path: Path) -> None:
    parent, leaf = tmp_path / "parent", tmp_path / "parent" / "out"
    leaf.mkdir(parents=True)
    parent.chmod(0o755)
    leaf.chmod(0o755)
    make_private_dir(leaf)
    assert file_mode(leaf) == 0o700 and file_mode(parent) == 0o755


@pytest.mark.parametrize("dangling", [False, True])
def test_make_private_dir_refuses_a_symlink(tmp_path: Path, dangling: bool) -> None:
    target = tmp_path / "elsewhere"
    if not dangling:
        target.mkdir(mode=0o755)
        target.chmod(0o755)
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(UnsafePathError, match="symbolic link; remove it") as info:
        make_private_dir(tmp_path / "out")
    assert str(tmp_path / "out") in str(info.value)
    assert not dangling or not target.exists()
    assert dangling or file_mode(target) == 0o755  # the link's target is never chmod'ed


def test_make_private_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(UnsafePathError, match="not a folder"):
        make_private_dir(tmp_path / "out")


def test_write_private_file_replaces_a_symlink_not_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "file"
    link.symlink_to(victim)
    with umask(0o000):
        write_private_file(link, b"new")
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"new" and file_mode(link) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "victim"]  # no temporary file left


def test_write_private_file_failure_leaves_no_temporary_file(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    with pytest.raises(IsADirectoryError):
        write_private_file(tmp_path / "folder", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]
