"""``p2pfm roster sign | show | publish`` (p2pfm/cli_roster.py)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from p2pfm.cli import main
from p2pfm.core.errors import UnknownSender
from p2pfm.core.identity import Identity, write_key_file
from p2pfm.core.records import newer_roster, open_roster_document


def _roster(tmp_path: Path) -> tuple[Path, Path, list[Identity]]:
    admin, members = Identity.generate(), [Identity.generate() for _ in range(3)]
    write_key_file(admin, tmp_path / "admin.key")
    roster = tmp_path / "roster.toml"
    assert main(["roster", "init", str(roster), "--network", "net"]) == 0
    for i, member in enumerate(members):
        assert main(["roster", "add", str(roster), "--name", f"m{i}", "--id", member.peer_id.hex]) == 0
    return roster, tmp_path / "admin.key", members


def test_sign_then_show_a_roster_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    roster, key, members = _roster(tmp_path)
    assert main(["roster", "sign", str(roster), "--key", str(key), "--version", "2"]) == 0
    signed = roster.with_suffix(".signed")
    document = open_roster_document(signed.read_bytes(), "net")
    assert document.version == 2 and document.members == {m.peer_id for m in members}
    assert document.admins == {document.signer}
    capsys.readouterr()
    assert main(["roster", "show", str(signed), "--network", "net"]) == 0
    shown = capsys.readouterr().out
    assert "version 2" in shown and all(m.peer_id.hex in shown for m in members)
    # A member signing version 3 is not an admin of version 2: members would refuse it.
    write_key_file(members[0], tmp_path / "m0.key")
    assert main(["roster", "sign", str(roster), "--key", str(tmp_path / "m0.key"), "--version", "3",
                 "--out", str(tmp_path / "forged.signed")]) == 0  # fmt: skip
    forged = open_roster_document((tmp_path / "forged.signed").read_bytes(), "net")
    with pytest.raises(UnknownSender, match="not an admin"):
        newer_roster(document, forged)


def test_bad_input_names_what_to_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    roster, key, _ = _roster(tmp_path)
    assert main(["roster", "sign", str(roster), "--key", str(key), "--version", "0"]) == 1
    assert "--version" in capsys.readouterr().err
    assert main(["roster", "show", str(roster), "--network", "net"]) == 1  # a TOML file, not a signed one
    assert "not a valid signed roster" in capsys.readouterr().err
    main(["roster", "sign", str(roster), "--key", str(key), "--version", "2"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["roster", "publish", str(roster.with_suffix(".signed")), "--to", f"tcp://127.0.0.1:{port}"]
    assert main([*args, "--key", str(key), "--timeout", "0.3"]) == 1
    assert "--to" in capsys.readouterr().err
