"""docs/protocol.md's test vector, rebuilt from the spec text and from the code."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import blake3
import msgpack
import nacl.signing
import numpy as np

from p2pfm import wire
from p2pfm.identity import Identity

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"


def _vector() -> dict[str, bytes]:
    text = DOC.read_text()
    block = text[text.index("## 9. Test vector") :]
    pairs = re.findall(r"^(\w+)\s+= ([0-9a-f]+)$", block, flags=re.MULTILINE)
    return {name: bytes.fromhex(value) for name, value in pairs}


def test_code_produces_the_documented_bytes() -> None:
    v = _vector()
    identity = Identity(v["seed"])
    assert identity.peer_id.key == v["public_key"]
    body = wire.encode_update(
        network="p2pfm-testnet", round=5, seq=9, ts_ms=1764115200000, fingerprint=b"\x11" * 32,
        degree=2, samples=128,
        tensors={
            "lora_A": np.array([[1.0, -2.0], [0.5, 0.25]], dtype=np.float32),
            "lora_B": np.array([1.0, -0.5], dtype=np.float32),
        },
        wire_dtypes={"lora_B": "bfloat16"},
    )  # fmt: skip
    frames = [bytes(f) for f in wire.sign(body, identity)]
    assert frames == [v["frame0"], v["frame1"], v["frame2"], v["frame3"]]


def test_vector_verifies_following_only_the_spec() -> None:
    """An independent reading of sections 2-5: no p2pfm code involved."""
    v = _vector()
    frames = [v["frame0"], v["frame1"], v["frame2"], v["frame3"]]
    prelude = frames[0]
    assert len(prelude) == 101 and prelude[:4] == b"P2FM" and prelude[4] == 1
    assert prelude[5:37] == v["public_key"] and prelude[37:] == v["signature"]
    hasher = blake3.blake3(prelude[:37] + struct.pack("<I", len(frames) - 1))
    for frame in frames[1:]:
        hasher.update(struct.pack("<Q", len(frame)) + frame)
    assert hasher.digest() == v["digest"]
    nacl.signing.VerifyKey(prelude[5:37]).verify(v["digest"], v["signature"])  # raises if wrong
    header = msgpack.unpackb(frames[1])
    keys = ["kind", "network", "round", "seq", "ts_ms", "fingerprint", "degree", "samples", "tensors"]
    assert list(header) == keys
    assert header["tensors"] == [["lora_A", "float32", [2, 2]], ["lora_B", "bfloat16", [2]]]
    assert struct.unpack("<4f", frames[2]) == (1.0, -2.0, 0.5, 0.25)
    widened = [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack("<2H", frames[3])]
    assert widened == [1.0, -0.5]
    update = wire.open_update(frames, wire.WireLimits())
    assert update.tensors["lora_B"].tolist() == [1.0, -0.5]
