"""Roster files and `p2pfm roster`, and how node configs use them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w

from p2pfm.config.node_config import load_node_config
from p2pfm.config.roster import load_roster
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import Identity, write_key_file


def _p2pfm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "p2pfm", *args], check=False, capture_output=True, text=True, timeout=60
    )


@pytest.mark.slow  # starts a process
def test_roster_commands_round_trip(tmp_path: Path) -> None:
    roster = tmp_path / "roster.toml"
    alice, bob = Identity.generate(), Identity.generate()
    write_key_file(alice, tmp_path / "alice.key")
    assert _p2pfm("roster", "init", str(roster), "--network", "net").returncode == 0
    assert (
        _p2pfm(
            "roster", "add", str(roster), "--name", "alice", "--key", str(tmp_path / "alice.key")
        ).returncode
        == 0
    )
    added = _p2pfm(
        "roster",
        "add",
        str(roster),
        "--name",
        "bob",
        "--id",
        bob.peer_id.hex,
        "--address",
        "tcp://10.0.0.2:5550",
    )
    assert added.returncode == 0
    loaded = load_roster(roster)
    assert loaded.network == "net" and loaded.ids == {alice.peer_id, bob.peer_id}
    assert [m.address for m in loaded.members] == [None, "tcp://10.0.0.2:5550"]
    shown = _p2pfm("roster", "check", str(roster))
    assert shown.returncode == 0 and alice.peer_id.hex in shown.stdout and "bob" in shown.stdout
    again = _p2pfm("roster", "add", str(roster), "--name", "bob2", "--id", bob.peer_id.hex)
    assert again.returncode == 1 and "listed twice" in again.stderr and "Traceback" not in again.stderr
    assert _p2pfm("roster", "remove", str(roster), "bob").returncode == 0
    assert load_roster(roster).ids == {alice.peer_id}
    gone = _p2pfm("roster", "remove", str(roster), "carol")
    assert gone.returncode == 1 and "no member named 'carol'" in gone.stderr
    assert _p2pfm("roster", "init", str(roster), "--network", "x").returncode == 1  # no silent overwrite


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('[[members]]\nname = "a"\nid = "' + Identity(b"\1" * 32).peer_id.hex + '"', "roster.network"),
        ('network = "n"\n[[members]]\nname = "a"\nid = "zz"', "roster.members[0].id"),
        ('network = "n"\n[[members]]\nname = "a"', "roster.members[0].id"),
        (
            'network = "n"\n[[members]]\nname = "a"\nid = "'
            + Identity(b"\1" * 32).peer_id.hex
            + '"\naddress = "nope"',
            "roster.members[0].address",
        ),
        ('network = "n"\nextra = 1', "roster.extra"),
        (
            'network = "n"\n[[members]]\nname = "a"\nid = "' + "00" * 32 + '"',
            "roster.members[0].id",
        ),  # small order
    ],
)
def test_bad_rosters_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_roster(path)
    assert info.value.field == field


def test_node_config_checks_network_and_peers_against_the_roster(tmp_path: Path) -> None:
    me, peer, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    roster = tmp_path / "roster.toml"
    roster.write_text(
        tomli_w.dumps(
            {
                "network": "net",
                "members": [{"name": "me", "id": me.peer_id.hex}, {"name": "p", "id": peer.peer_id.hex}],
            }
        )
    )

    def config(network: str, neighbour: Identity) -> Path:
        doc = {
            "node": {
                "key": "k",
                "listen": "tcp://127.0.0.1:5550",
                "network": network,
                "out": "o",
                "roster": "roster.toml",
            },
            "peers": [{"id": neighbour.peer_id.hex, "address": "tcp://127.0.0.1:5551", "name": "p"}],
            "model": {"path": "minilm", "num_labels": 5},
        }
        path = tmp_path / "node.toml"
        path.write_text(tomli_w.dumps(doc))
        return path

    loaded = load_node_config(config("net", peer))
    assert loaded.roster is not None and loaded.roster.ids == {me.peer_id, peer.peer_id}
    with pytest.raises(ConfigError) as info:
        load_node_config(config("other", peer))
    assert info.value.field == "node.network"
    with pytest.raises(ConfigError) as info:
        load_node_config(config("net", stranger))
    assert info.value.field == "peers[0].id"
