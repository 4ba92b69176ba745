"""Wycheproof Ed25519 / X25519 vectors, run through the primitives p2pfm relies on.

The vectors and their provenance are in tests/data/wycheproof/ (see its README.md,
which also lists the pinned outcomes this file asserts):

* Ed25519: ``nacl.signing.VerifyKey(pk).verify(msg, sig)``, the call behind
  ``p2pfm.core.wire.verify`` (``_verify_key``), refusals being exactly the exceptions
  wire.py turns into ``BadSignature``.
* X25519: ``nacl.bindings.crypto_scalarmult``, libsodium's key agreement as used by
  CurveZMQ, with its refusal of an all-zero shared secret.
* Ed25519 -> X25519: ``Identity.curve_keypair`` / ``curve_public_key``, the
  transport-key derivation, on every public key the Ed25519 file contains.
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing
import pytest

from p2pfm.core.identity import Identity, PeerId, curve_public_key

DATA = Path(__file__).parent / "data" / "wycheproof"

# What p2pfm.core.wire.verify catches and turns into BadSignature; anything else would escape it.
P2PFM_REFUSALS = (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError)


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / name).read_text(encoding="utf-8"))
    return doc


def _case_id(case: dict[str, Any]) -> str:
    return f"tc{case['tcId']}-{case['result']}-{'+'.join(case['flags']) or 'noflags'}"


ED25519 = _load("ed25519_test.json")
X25519 = _load("x25519_test.json")

ED25519_CASES = [(bytes.fromhex(g["publicKey"]["pk"]), t) for g in ED25519["testGroups"] for t in g["tests"]]
X25519_CASES = [t for g in X25519["testGroups"] for t in g["tests"]]

# ---------------------------------------------------------------------------
# Pinned outcomes (mirrored in tests/data/wycheproof/README.md).

# Ed25519 'acceptable' cases, tcId -> accepted?  The shipped file (0.9rc5) has none.
ED25519_ACCEPTABLE: dict[int, bool] = {}

# X25519 'acceptable' cases per flag: (cases, accepted with the expected secret, refused).
# libsodium refuses exactly the cases whose shared secret is all-zero (they all carry
# ZeroSharedSecret and LowOrderPublic); every other acceptable case gives the expected value.
X25519_ACCEPTABLE_BY_FLAG: dict[str, tuple[int, int, int]] = {
    "EdgeCaseMultiplication": (175, 170, 5),
    "EdgeCaseShared": (8, 8, 0),
    "Ktv": (1, 1, 0),
    "LowOrderPublic": (31, 0, 31),
    "NonCanonicalPublic": (19, 13, 6),
    "SmallPublicKey": (8, 0, 8),
    "SpecialPublicKey": (50, 38, 12),
    "Twist": (221, 216, 5),
    "ZeroSharedSecret": (31, 0, 31),
}
X25519_REFUSED_FLAG = "ZeroSharedSecret"

# RFC 8032 section 7.1 secret keys for the Wycheproof Ktv groups (tcId 80-83,
# "draft-josefsson-eddsa-ed25519-02: Test 1/2/3/1024"): the JSON gives only public
# keys, and the tests below check each secret against the group's key and signature.
RFC8032_SECRETS = {
    80: "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
    81: "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
    82: "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
    83: "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
}

X25519_BASEPOINT = (9).to_bytes(32, "little")
ZERO32 = bytes(32)


# ---------------------------------------------------------------------------
# File shape: every case is loaded, and only the results the tests handle occur.


def test_every_vector_is_loaded() -> None:
    assert len(ED25519_CASES) == ED25519["numberOfTests"] == 151
    assert len(X25519_CASES) == X25519["numberOfTests"] == 518
    assert Counter(t["result"] for _, t in ED25519_CASES) == {"valid": 88, "invalid": 63}
    assert Counter(t["result"] for t in X25519_CASES) == {"valid": 264, "acceptable": 254}
    acceptable = {t["tcId"] for _, t in ED25519_CASES if t["result"] == "acceptable"}
    assert acceptable == set(ED25519_ACCEPTABLE)


# ---------------------------------------------------------------------------
# Ed25519 verification, as p2pfm.core.wire.verify does it.


def _ed25519_accepts(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except P2PFM_REFUSALS:  # anything else escapes: wire.verify would not catch it either
        return False
    return True


@pytest.mark.parametrize(("public", "case"), ED25519_CASES, ids=[_case_id(t) for _, t in ED25519_CASES])
def test_ed25519_verify(public: bytes, case: dict[str, Any]) -> None:
    accepted = _ed25519_accepts(public, bytes.fromhex(case["msg"]), bytes.fromhex(case["sig"]))
    if case["result"] == "valid":
        assert accepted, "a valid signature was refused"
    elif case["result"] == "invalid":
        assert not accepted, "an invalid signature was accepted"
    else:
        assert accepted is ED25519_ACCEPTABLE[case["tcId"]]


# ---------------------------------------------------------------------------
# X25519 key agreement (libsodium crypto_scalarmult, as CurveZMQ uses it).


def _x25519(private: bytes, public: bytes) -> bytes | None:
    """The shared secret, or None where libsodium refuses (all-zero result)."""
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.CryptoError:
        return None


@pytest.mark.parametrize("case", X25519_CASES, ids=[_case_id(t) for t in X25519_CASES])
def test_x25519(case: dict[str, Any]) -> None:
    shared = _x25519(bytes.fromhex(case["private"]), bytes.fromhex(case["public"]))
    expected = bytes.fromhex(case["shared"])
    # The documented rule hinges on this: the zero-secret flag marks exactly the all-zero results.
    assert (X25519_REFUSED_FLAG in case["flags"]) == (expected == ZERO32)
    if case["result"] == "valid":
        assert shared == expected
    elif case["result"] == "invalid":
        assert shared is None, "libsodium accepted an invalid X25519 case"
    elif X25519_REFUSED_FLAG in case["flags"]:
        assert shared is None, "libsodium no longer refuses an all-zero shared secret"
    else:
        assert shared == expected


def test_x25519_acceptable_outcomes_by_flag() -> None:
    tally: dict[str, list[int]] = {}
    for case in X25519_CASES:
        if case["result"] != "acceptable":
            continue
        refused = _x25519(bytes.fromhex(case["private"]), bytes.fromhex(case["public"])) is None
        for flag in case["flags"]:
            row = tally.setdefault(flag, [0, 0, 0])
            row[0] += 1
            row[2 if refused else 1] += 1
    assert {flag: tuple(row) for flag, row in tally.items()} == X25519_ACCEPTABLE_BY_FLAG


def test_readme_documents_the_pinned_outcomes() -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| (\d+) \| (\d+) \|", readme, flags=re.MULTILINE)
    assert {flag: (int(n), int(a), int(r)) for flag, n, a, r in rows} == X25519_ACCEPTABLE_BY_FLAG
    if not ED25519_ACCEPTABLE:
        assert "no `acceptable` cases" in readme


# ---------------------------------------------------------------------------
# Ed25519 -> X25519 conversion (p2pfm.core.identity), with an independent reference.

P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def _decode_point(encoded: bytes) -> tuple[int, int] | None:
    """RFC 8032 section 5.1.3 point decoding (strict: y must be canonical)."""
    value = int.from_bytes(encoded, "little")
    y, sign = value & ((1 << 255) - 1), value >> 255
    if y >= P:
        return None
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P or (x == 0 and sign):
        return None
    return (P - x if x & 1 != sign else x), y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    (x1, y1), (x2, y2) = a, b
    t = D * x1 * x2 * y1 * y2 % P
    return ((x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P)


def _has_small_order(point: tuple[int, int]) -> bool:
    for _ in range(3):
        point = _add(point, point)
    return point == (0, 1)


def _montgomery_u(ed25519_public: bytes) -> bytes:
    """The birational map u = (1 + y) / (1 - y) (RFC 7748 section 4.1)."""
    y = int.from_bytes(ed25519_public, "little") & ((1 << 255) - 1)
    return ((1 + y) * pow(1 - y, -1, P) % P).to_bytes(32, "little")


ED25519_GROUP_KEYS = sorted({public for public, _ in ED25519_CASES})
ED25519_KEYS_WITH_VALID_SIGNATURE = {public for public, t in ED25519_CASES if t["result"] == "valid"}


def test_every_ed25519_group_key_is_a_valid_key() -> None:
    # So there is no invalid or small-order public key among the vectors to feed the conversion;
    # test_conversion_refuses_small_order_and_off_curve_keys pins that path on hand-made keys.
    assert len(ED25519_GROUP_KEYS) == 52
    assert set(ED25519_GROUP_KEYS) == ED25519_KEYS_WITH_VALID_SIGNATURE
    for public in ED25519_GROUP_KEYS:
        point = _decode_point(public)
        assert point is not None
        assert not _has_small_order(point)


@pytest.mark.parametrize("public", ED25519_GROUP_KEYS, ids=[k.hex()[:16] for k in ED25519_GROUP_KEYS])
def test_curve_public_key_matches_birational_map(public: bytes) -> None:
    converted = curve_public_key(PeerId(public))
    assert converted == bytes(nacl.signing.VerifyKey(public).to_curve25519_public_key())
    assert converted == _montgomery_u(public)


def _rfc8032_identities() -> dict[int, tuple[Identity, bytes, dict[str, Any]]]:
    out = {}
    for public, case in ED25519_CASES:
        if case["tcId"] in RFC8032_SECRETS:
            out[case["tcId"]] = (Identity(bytes.fromhex(RFC8032_SECRETS[case["tcId"]])), public, case)
    return out


RFC8032_IDENTITIES = _rfc8032_identities()


@pytest.mark.parametrize("tc_id", sorted(RFC8032_SECRETS), ids=[f"tc{i}" for i in sorted(RFC8032_SECRETS)])
def test_identity_curve_keypair_agrees_with_peer_id(tc_id: int) -> None:
    identity, public, case = RFC8032_IDENTITIES[tc_id]
    assert identity.peer_id.key == public  # the secret really belongs to this vector group
    assert identity.sign(bytes.fromhex(case["msg"])).hex() == case["sig"]
    curve_public, curve_secret = identity.curve_keypair()
    assert curve_public == curve_public_key(identity.peer_id) == _montgomery_u(public)
    assert nacl.bindings.crypto_scalarmult(curve_secret, X25519_BASEPOINT) == curve_public
    assert nacl.bindings.crypto_scalarmult_base(curve_secret) == curve_public


@pytest.mark.parametrize(
    ("a", "b"),
    list(itertools.combinations(sorted(RFC8032_SECRETS), 2)),
    ids=[f"tc{a}-tc{b}" for a, b in itertools.combinations(sorted(RFC8032_SECRETS), 2)],
)
def test_converted_keys_agree_on_shared_secret(a: int, b: int) -> None:
    first, second = RFC8032_IDENTITIES[a][0], RFC8032_IDENTITIES[b][0]
    _, first_secret = first.curve_keypair()
    _, second_secret = second.curve_keypair()
    forward = nacl.bindings.crypto_scalarmult(first_secret, curve_public_key(second.peer_id))
    backward = nacl.bindings.crypto_scalarmult(second_secret, curve_public_key(first.peer_id))
    assert forward == backward != ZERO32


# Not from Wycheproof (its Ed25519 file has no bad public keys): the small-order encodings
# (identity, order 2, the two of order 4, two of order 8) and a y with no point on the curve.
BAD_ED25519_KEYS = {
    "identity": (1).to_bytes(32, "little"),
    "order2": (P - 1).to_bytes(32, "little"),
    "order4": bytes(32),
    "order4-neg": bytes(31) + b"\x80",
    "order8": bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    "order8-neg": bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    "not-on-curve-y2": (2).to_bytes(32, "little"),
}


@pytest.mark.parametrize("public", list(BAD_ED25519_KEYS.values()), ids=list(BAD_ED25519_KEYS))
def test_conversion_refuses_small_order_and_off_curve_keys(public: bytes) -> None:
    point = _decode_point(public)
    assert point is None or _has_small_order(point)
    # Pinned: PeerId and VerifyKey take any 32 bytes; libsodium's conversion raises.
    peer = PeerId(public)
    with pytest.raises(nacl.exceptions.RuntimeError):
        curve_public_key(peer)
    assert not _ed25519_accepts(public, b"", bytes(64))
