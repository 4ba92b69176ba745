"""docs/protocol.md's test vector, rebuilt from the code and from the spec text alone."""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path
from typing import Any

import blake3
import msgpack
import nacl.exceptions
import nacl.signing
import numpy as np
import pytest

from p2pfm.core import codec, wire
from p2pfm.core.errors import RejectReason
from p2pfm.core.identity import Identity
from p2pfm.core.protocol import ProtocolConfig
from tests import codec_reference
from tests.conftest import doc_section

DOC = Path(__file__).resolve().parents[1] / "docs" / "protocol.md"
PARTS = ("prelude", "header_length", "header", "payload")
FIELDS = {
    "network": "p2pfm-testnet",
    "round": 5,
    "seq": 9,
    "ts_ms": 1764115200000,
    "fingerprint": b"\x11" * 32,
    "degree": 2,
    "samples": 128,
}


def _section(title: str) -> str:
    return doc_section(DOC, title)


def _vector() -> dict[str, bytes]:
    block = _section("## 9. Test vector")
    pairs = re.findall(r"^(\w+)\s+= ([0-9a-f]+)$", block, flags=re.MULTILINE)
    vector = {name: bytes.fromhex(value) for name, value in pairs}
    expected = {"seed", "public_key", *PARTS, "payload_digest", "head_digest", "signature"}
    assert set(vector) == expected and len(pairs) == len(expected)
    return vector


def _message(v: dict[str, bytes]) -> bytes:
    return b"".join(v[part] for part in PARTS)


def _table_column(section: str, header: str) -> list[str]:
    """First-column `code` cells of the table (in ``section``) whose header row starts with ``header``."""
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    cells = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells.append(line.split("|")[1].strip().strip("`"))
    return cells


# ----------------------------------------------------------------- from the code


def test_code_produces_the_documented_bytes() -> None:
    v = _vector()
    identity = Identity(v["seed"])
    assert identity.peer_id.key == v["public_key"]
    body = wire.encode_update(
        **FIELDS,
        tensors={
            "lora_A": np.array([[1.0, -2.0], [0.5, 0.25]], dtype=np.float32),
            "lora_B": np.array([1.0, -0.5], dtype=np.float32),
        },
        wire_dtypes={"lora_B": "bfloat16"},
    )
    message = wire.sign(body, identity)
    assert message == _message(v)
    assert body.header == v["header"] and b"".join(body.payload) == v["payload"]


def test_code_reads_the_documented_bytes() -> None:
    v = _vector()
    update = wire.open_update(_message(v), wire.WireLimits(), known_senders={Identity(v["seed"]).peer_id})
    assert (update.network, update.round, update.seq, update.ts_ms) == ("p2pfm-testnet", 5, 9, 1764115200000)
    assert (update.fingerprint, update.degree, update.samples) == (b"\x11" * 32, 2, 128)
    assert [(s.name, s.dtype, s.shape) for s in update.specs] == [
        ("lora_A", "float32", (2, 2)),
        ("lora_B", "bfloat16", (2,)),
    ]
    assert update.tensors["lora_A"].tolist() == [[1.0, -2.0], [0.5, 0.25]]
    assert update.tensors["lora_B"].tolist() == [1.0, -0.5]
    assert update.wire_bytes == len(_message(v)) == 340


# ----------------------------------------------------------------- from the spec alone


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    out = dict(pairs)
    assert len(out) == len(pairs), "a msgpack map repeats a key (section 4.1)"
    return out


def _bfloat16_bits(value: float) -> int:
    """Section 5: the upper 16 bits of the float32, rounded to nearest, ties to even."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def test_spec_alone_rebuilds_the_vector() -> None:
    """An independent reading of sections 1-5 with msgpack, BLAKE3 and Ed25519: no p2pfm code involved."""
    v = _vector()
    signing_key = nacl.signing.SigningKey(v["seed"])
    public_key = bytes(signing_key.verify_key)
    assert public_key == v["public_key"]
    payload = struct.pack("<4f", 1.0, -2.0, 0.5, 0.25) + struct.pack(
        "<2H", _bfloat16_bits(1.0), _bfloat16_bits(-0.5)
    )
    header = msgpack.packb(
        {
            "kind": "update",
            **FIELDS,
            "tensors": [["lora_A", "float32", [2, 2]], ["lora_B", "bfloat16", [2]]],
            "payload": blake3.blake3(payload).digest(),
        },
        use_bin_type=True,  # bin for bytes, str 8 available: msgpack's smallest encodings
    )
    signed_prelude = b"P2FM" + bytes([2]) + public_key
    header_length = struct.pack("<I", len(header))
    head_digest = blake3.blake3(signed_prelude + header_length + header).digest()
    signature = signing_key.sign(head_digest).signature  # Ed25519 over the 32 digest bytes
    prelude = signed_prelude + signature
    assert len(prelude) == 101 and len(head_digest) == 32 and len(signature) == 64
    assert payload == v["payload"]
    assert blake3.blake3(payload).digest() == v["payload_digest"]
    assert header == v["header"]
    assert header_length == v["header_length"]
    assert head_digest == v["head_digest"]
    assert signature == v["signature"]  # Ed25519 signing is deterministic
    assert prelude == v["prelude"]
    assert prelude + header_length + header + payload == _message(v)


def test_page_signature_verifies_with_nacl() -> None:
    v = _vector()
    message = _message(v)
    assert message[:4] == b"P2FM" and message[4] == 2 and message[5:37] == v["public_key"]
    (length,) = struct.unpack_from("<I", message, 101)
    head = message[: 105 + length]
    assert head[105:] == v["header"] and message[105 + length :] == v["payload"]
    digest = blake3.blake3(message[:37] + message[101 : 105 + length]).digest()
    assert digest == v["head_digest"]
    nacl.signing.VerifyKey(message[5:37]).verify(digest, message[37:101])  # raises if wrong
    with pytest.raises(nacl.exceptions.BadSignatureError):
        nacl.signing.VerifyKey(message[5:37]).verify(digest[::-1], message[37:101])
    header = msgpack.unpackb(head[105:], object_pairs_hook=_unique_map)
    assert header["payload"] == blake3.blake3(message[105 + length :]).digest() == v["payload_digest"]
    assert header["tensors"] == [["lora_A", "float32", [2, 2]], ["lora_B", "bfloat16", [2]]]
    assert struct.unpack("<4f", v["payload"][:16]) == (1.0, -2.0, 0.5, 0.25)
    widened = [
        struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack("<2H", v["payload"][16:])
    ]
    assert widened == [1.0, -0.5]


# ----------------------------------------------------------------- the page's tables


def test_header_tables_list_the_keys_the_code_writes() -> None:
    v = _vector()
    section = _section("## 4. Header")
    update_keys = _table_column(_section("### 4.2"), "key")
    # same keys, same order; base and resync optional
    assert update_keys == [*msgpack.unpackb(v["header"]), "base", "resync"]
    chained = wire.encode_update(
        network="n", round=2, seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=0, tensors={}, base=1,
        resync=[Identity(bytes(32)).peer_id],
    )  # fmt: skip
    assert list(msgpack.unpackb(chained.header)) == update_keys
    proof = wire.encode_proof(network="n", evidence=(b"a", b"b"))
    assert _table_column(_section("### 4.3"), "key") == list(msgpack.unpackb(proof.header))
    assert _table_column(_section("## 5. Payload"), "dtype") == list(wire.WIRE_DTYPES)
    assert "smallest encoding" in section


def test_limit_tables_match_the_code_defaults() -> None:
    section = _section("### 6.1 Limits")
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \|", section, flags=re.MULTILINE)
    wire_defaults = dataclasses.asdict(wire.WireLimits())
    protocol_defaults = {f.name: f.default for f in dataclasses.fields(ProtocolConfig)}
    seen = set()
    for name, value in rows:
        default = wire_defaults[name] if name in wire_defaults else protocol_defaults[name]
        assert default == int(value), name
        seen.add(name)
    assert {k for k, d in wire_defaults.items() if isinstance(d, int)} <= seen
    assert {"max_messages_per_s", "message_burst", "max_rounds_ahead", "max_clock_skew_s"} <= seen


def test_every_reject_reason_is_documented_in_section_6() -> None:
    section = _section("## 6. What a receiver checks")
    documented = set(re.findall(r"\| `([a-z_]+)` \|$", section, flags=re.MULTILINE))
    assert documented == {reason.value for reason in RejectReason}


# ----------------------------------------------------------------- section 5.1, lossy encodings


def _lossy_examples() -> list[dict[str, str]]:
    block = _section("### 5.1").split("```text", 1)[1].split("```", 1)[0]
    examples = []
    for chunk in block.strip().split("\n\n"):
        pairs = dict(re.findall(r"^(\w+)\s+= (.*)$", chunk, flags=re.MULTILINE))
        assert set(pairs) == {"encoding", "shape", "values", "payload", "decoded"}, chunk
        examples.append(pairs)
    return examples


def _floats(text: str) -> list[float]:
    return [float(np.float32(v)) for v in text.split()]


def test_lossy_examples_from_the_code() -> None:
    examples = _lossy_examples()
    assert {e["encoding"] for e in examples} >= {"q8", "topk8_d4"}
    for example in examples:
        shape = tuple(int(d) for d in re.findall(r"\d+", example["shape"]))
        values = np.array(_floats(example["values"]), dtype=np.float32).reshape(shape)
        payload = bytes.fromhex(example["payload"])
        assert bytes(codec.encode(example["encoding"], values)) == payload
        decoded = codec.decode(example["encoding"], shape, payload)
        assert decoded.reshape(-1).tolist() == _floats(example["decoded"])
        assert decoded.shape == shape and decoded.dtype == np.float32


def test_lossy_examples_from_the_spec_alone() -> None:
    """tests/codec_reference.py is a plain-Python reading of section 5.1: it must give the page's bytes."""
    for example in _lossy_examples():
        values = _floats(example["values"])
        payload = bytes.fromhex(example["payload"])
        assert codec_reference.encode(example["encoding"], values) == payload
        assert codec_reference.decode(example["encoding"], len(values), payload) == _floats(
            example["decoded"]
        )


def test_lossy_constants_on_the_page_are_the_codes() -> None:
    section = _section("### 5.1")
    assert f"`{codec.MAX_SCALE_BITS:#010x}`" in section
    assert f"`{codec.MAX_SCALE_BITS:#010x}`" == f"`{codec_reference.MAX_SCALE_BITS:#010x}`"
    assert "blocks of 256" in section and codec.BLOCK == 256
    densities = re.search(r"`N` in ([\d, ]+):", section)
    assert densities is not None
    assert tuple(int(n) for n in densities.group(1).split(", ")) == codec.TOPK_DENSITIES
    sizes = dict(
        (name, (per_element, ratio))
        for name, per_element, ratio in re.findall(r"`(\w+)`\s+([\d.]+)\s+\(([\d.]+)x", section)
    )
    assert set(sizes) == set(codec.ENCODINGS)
    for encoding, (per_element, ratio) in sizes.items():  # as quoted, to the digits quoted
        actual = codec.encoded_nbytes(encoding, (2**24,)) / 2**24
        assert abs(actual - float(per_element)) <= 0.5 * 10.0 ** -len(per_element.split(".")[1]), encoding
        assert abs(4 / actual - float(ratio)) <= 0.5 * 10.0 ** -len(ratio.split(".")[1]), encoding
