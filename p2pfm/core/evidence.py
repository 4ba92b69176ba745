"""Equivocation proof files: what a node keeps when a peer signs two updates for one round.

A proof file is self-verifying: it holds the two signed update heads
(docs/protocol.md section 6.4) and nothing that needs trusting the node
that wrote it. ``p2pfm evidence check FILE`` verifies one offline::

    {"format": "p2pfm-equivocation-v1", "network": "<id>", "evidence": [<head>, <head>]}

msgpack-encoded, heads as bin.
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from p2pfm.core import wire
from p2pfm.core.errors import RemoteProtocolError, UserInputError

EVIDENCE_FORMAT = "p2pfm-equivocation-v1"
_MAX_FILE_BYTES = 2 * wire.WireLimits().max_head_bytes + 4096


def encode_evidence(network: str, evidence: tuple[bytes, bytes]) -> bytes:
    document = {"format": EVIDENCE_FORMAT, "network": network, "evidence": list(evidence)}
    return bytes(msgpack.packb(document, use_bin_type=True))


def evidence_file_name(accused_hex: str, round_: int) -> str:
    return f"equivocation-{accused_hex[:16]}-round{round_}.msgpack"


def check_evidence_file(path: Path) -> wire.Evidence:
    """Read and verify a proof file; UserInputError naming the file when it proves nothing."""
    try:
        data = path.read_bytes()[: _MAX_FILE_BYTES + 1]
    except OSError as exc:
        raise UserInputError(f"evidence file {path}: cannot be read ({exc.strerror})") from None
    if len(data) > _MAX_FILE_BYTES:
        raise UserInputError(f"evidence file {path}: larger than any proof can be")
    try:
        document = msgpack.unpackb(data, raw=False, max_ext_len=0)
        if not isinstance(document, dict) or document.get("format") != EVIDENCE_FORMAT:
            raise ValueError(f"not a {EVIDENCE_FORMAT} document")
        first, second = document["evidence"]
        facts = wire.check_evidence(first, second, wire.WireLimits())
    except RemoteProtocolError as exc:
        raise UserInputError(f"evidence file {path}: the proof does not hold ({exc})") from None
    except Exception as exc:  # noqa: BLE001  any parse failure of a foreign file: one line, no traceback
        raise UserInputError(
            f"evidence file {path}: not a proof file ({type(exc).__name__}: {exc})"
        ) from None
    if document.get("network") != facts.network:
        raise UserInputError(f"evidence file {path}: its network field differs from the signed heads'")
    return facts
