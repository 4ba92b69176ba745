from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from p2pfm import cli
from p2pfm.core.errors import KeyFileError
from p2pfm.core.identity import Identity, PeerId, load_key_file, write_key_file


def test_write_then_load_round_trips_with_mode_0600(tmp_path: Path) -> None:
    identity = Identity.generate()
    path = tmp_path / "node.key"
    write_key_file(identity, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path).peer_id == identity.peer_id


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    first, second = Identity.generate(), Identity.generate()
    write_key_file(first, path)
    with pytest.raises(KeyFileError, match="already exists; pass --force"):
        write_key_file(second, path)
    assert load_key_file(path).peer_id == first.peer_id
    path.chmod(0o644)
    write_key_file(second, path, force=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # --force also fixes the mode
    assert load_key_file(path).peer_id == second.peer_id


def _symlink_to_victim(tmp_path: Path) -> tuple[Path, Path]:
    """A key path that is a symlink to someone else's file (here: one we can write)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours to overwrite\n")
    victim.chmod(0o644)
    path = tmp_path / "node.key"
    path.symlink_to(victim)
    return path, victim


def _assert_replaced_link_only(path: Path, victim: Path) -> Identity:
    assert victim.read_text() == "not yours to overwrite\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert not path.is_symlink() and path.is_file()
    assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    return load_key_file(path)


def test_force_replaces_a_symlink_never_its_target(tmp_path: Path) -> None:
    path, victim = _symlink_to_victim(tmp_path)
    identity = Identity.generate()
    write_key_file(identity, path, force=True)
    assert _assert_replaced_link_only(path, victim).peer_id == identity.peer_id
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.key", "victim.txt"]  # no temporary file


def test_keygen_force_through_the_cli_replaces_a_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, victim = _symlink_to_victim(tmp_path)
    assert cli.main(["keygen", "--out", str(path), "--force"]) == 0
    printed = capsys.readouterr().out.strip()
    assert _assert_replaced_link_only(path, victim).peer_id.hex == printed


@pytest.mark.parametrize("dangling", [False, True])
def test_without_force_a_symlink_counts_as_existing(tmp_path: Path, dangling: bool) -> None:
    path, victim = _symlink_to_victim(tmp_path)
    if dangling:
        victim.unlink()
    with pytest.raises(KeyFileError, match="already exists; pass --force to overwrite it"):
        write_key_file(Identity.generate(), path)
    assert path.is_symlink()
    assert dangling or victim.read_text() == "not yours to overwrite\n"
    assert not dangling or not victim.exists()  # nothing created through the dangling link


def test_force_onto_a_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "node.key").mkdir()
    with pytest.raises(KeyFileError, match="cannot create it"):
        write_key_file(Identity.generate(), tmp_path / "node.key", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["node.key"]


def _written(tmp_path: Path) -> Path:
    path = tmp_path / "node.key"
    write_key_file(Identity(bytes(range(32))), path)
    return path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist") as info:
        load_key_file(tmp_path / "absent.key")
    assert "absent.key" in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o640])
def test_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _written(tmp_path)
    path.chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key_file(path)


@pytest.mark.parametrize("keep", [0, 1, 20, 60, 120])
def test_truncated_file(tmp_path: Path, keep: int) -> None:
    path = _written(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(KeyFileError, match="truncated"):
        load_key_file(path)


def test_seed_not_matching_public_key_is_corrupt(tmp_path: Path) -> None:
    path = _written(tmp_path)
    doc = json.loads(path.read_text())
    doc["seed"] = "00" * 32
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="does not match"):
        load_key_file(path)


@pytest.mark.parametrize(
    "text",
    [
        '{"format": "something-else", "seed": "", "public": ""}',
        '{"format": "p2pfm-ed25519-v1", "seed": "zz", "public": "00"}',
        '{"format": "p2pfm-ed25519-v1", "seed": "0011", "public": "0011"}',
        '{"format": "p2pfm-ed25519-v1", "seed": 5, "public": null}',
        "[1, 2, 3]",
        "not json at all, but long enough to not look truncated }",
    ],
)
def test_corrupt_contents(tmp_path: Path, text: str) -> None:
    path = _written(tmp_path)
    path.write_text(text)
    with pytest.raises(KeyFileError) as info:
        load_key_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_directory_is_not_a_key_file(tmp_path: Path) -> None:
    folder = tmp_path / "dir"
    folder.mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key_file(folder)


def test_peer_id_hex_round_trip_and_errors() -> None:
    peer = Identity(bytes(32)).peer_id
    assert PeerId.from_hex(peer.hex) == peer
    assert len(peer.hex) == 64 and peer.hex.startswith(peer.short)
    with pytest.raises(ValueError, match="hexadecimal"):
        PeerId.from_hex("xyz")
    with pytest.raises(ValueError, match="64 hex digits"):
        PeerId.from_hex("abcd")


def test_signature_is_deterministic_ed25519() -> None:
    # RFC 8032 test 1: secret key 9d61b1..., empty message.
    seed = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    identity = Identity(seed)
    assert identity.peer_id.hex == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert identity.sign(b"").hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )
    assert "9d61" not in repr(identity)


@pytest.mark.parametrize(
    "hex_key",
    [
        "01" + "00" * 31,  # the identity point (order 1)
        "ec" + "ff" * 30 + "7f",  # order 2
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    ],
)
def test_small_order_peer_ids_are_refused_with_the_reason(hex_key: str) -> None:
    """Such a key has no CurveZMQ key: the transport would fail with an untyped library error."""
    with pytest.raises(ValueError, match="not a usable Ed25519 public key"):
        PeerId.from_hex(hex_key)
