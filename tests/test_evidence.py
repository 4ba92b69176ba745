"""Equivocation proof files: written by the node that caught it, checked offline by anyone."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import pytest

from p2pfm.core import wire
from p2pfm.core.errors import UserInputError
from p2pfm.core.evidence import EVIDENCE_FORMAT, check_evidence_file, encode_evidence, evidence_file_name
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import EquivocationFound, GossipProtocol, ProtocolConfig

CHEAT, JUDGE = Identity(bytes([7]) * 32), Identity(bytes([8]) * 32)
CONFIG = ProtocolConfig(network="net", fingerprint=bytes(32), round_timeout_s=5.0)


def _caught() -> tuple[bytes, bytes]:
    """The two signed heads a receiver keeps when a neighbour signs two updates for round 3."""
    cheat, judge = (
        GossipProtocol(CHEAT, [JUDGE.peer_id], CONFIG),
        GossipProtocol(JUDGE, [CHEAT.peer_id], CONFIG),
    )
    for proto in (cheat, judge):
        proto.start_round(3, 0.0)
    first, second = (
        cheat.make_update({"x": np.full(4, value, np.float32)}, samples=1, wall_time_ms=0) for value in (1, 2)
    )
    judge.receive(first, 0.1)
    found = judge.receive(second, 0.2)
    assert isinstance(found, EquivocationFound)
    return found.evidence


def _file(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "proof.msgpack"
    path.write_bytes(data)
    return path


def test_a_proof_file_round_trips_and_names_the_cheat(tmp_path: Path) -> None:
    facts = check_evidence_file(_file(tmp_path, encode_evidence("net", _caught())))
    assert (facts.accused, facts.network, facts.round) == (CHEAT.peer_id, "net", 3)
    assert facts.fingerprints == (bytes(32), bytes(32))


def test_the_file_name_carries_the_accused_and_the_round() -> None:
    assert evidence_file_name(CHEAT.peer_id.hex, 3) == f"equivocation-{CHEAT.peer_id.hex[:16]}-round3.msgpack"
    assert evidence_file_name(CHEAT.peer_id.hex, 3) != evidence_file_name(JUDGE.peer_id.hex, 3)


def _flipped(head: bytes) -> bytes:
    return head[:-1] + bytes([head[-1] ^ 1])


def _documents() -> list[object]:
    first, second = _caught()
    good = {"format": EVIDENCE_FORMAT, "network": "net", "evidence": [first, second]}
    return [
        pytest.param(b"\xc1 not msgpack", "not a proof file", id="garbage"),
        pytest.param({**good, "format": "p2pfm-equivocation-v0"}, "not a proof file", id="other-format"),
        pytest.param({**good, "evidence": [first]}, "not a proof file", id="one-head"),
        pytest.param({**good, "evidence": [first, first]}, "the proof does not hold", id="same-head-twice"),
        pytest.param({**good, "evidence": [first, _flipped(second)]}, "does not hold", id="tampered"),
        pytest.param({**good, "network": "other"}, "network field differs", id="other-network"),
    ]


@pytest.mark.parametrize(("document", "problem"), _documents())
def test_a_file_that_proves_nothing_is_a_one_line_error_naming_it(
    tmp_path: Path, document: object, problem: str
) -> None:
    data = document if isinstance(document, bytes) else msgpack.packb(document, use_bin_type=True)
    path = _file(tmp_path, data)
    with pytest.raises(UserInputError, match=problem) as info:
        check_evidence_file(path)
    assert str(info.value).startswith(f"evidence file {path}: ") and "\n" not in str(info.value)


def test_a_missing_or_oversized_file_is_refused_before_parsing(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="cannot be read"):
        check_evidence_file(tmp_path / "missing.msgpack")
    too_big = 2 * wire.WireLimits().max_head_bytes + 4097
    with pytest.raises(UserInputError, match="larger than any proof can be"):
        check_evidence_file(_file(tmp_path, b"\x00" * too_big))
