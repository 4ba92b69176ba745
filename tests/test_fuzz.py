"""The message fuzzer (fuzz/fuzz_messages.py), small: no crash, no forgery, deep paths reached.

The deep-path assertions are there so that this test fails if the fuzzer
silently stops exercising the signature check or the header/semantic gates
(for example because every mutation is refused by the framing checks).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from p2pfm.core import wire

FUZZER = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_messages.py"
MESSAGES = 3000


def _load() -> ModuleType:
    """Import the script by path, so that fuzz/ need not be a package."""
    spec = importlib.util.spec_from_file_location("fuzz_messages", FUZZER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _load()


@pytest.fixture(scope="module")
def report() -> Any:
    return fuzz.run(messages=MESSAGES, seed=0)


def test_no_crash_and_no_accepted_forgery(report: Any) -> None:
    assert report.crashes == 0, report.reproducers
    assert report.forgeries == 0, report.reproducers
    assert report.messages == MESSAGES


def test_every_generator_produced_messages(report: Any) -> None:
    assert set(report.by_generator) == set(fuzz.GENERATORS)
    assert all(report.by_generator[g] >= MESSAGES // 20 for g in fuzz.GENERATORS)


def test_mutations_reach_the_signature_check(report: Any) -> None:
    mutated = report.reasons_by_generator["mutated"]
    assert mutated["bad_signature"] >= report.by_generator["mutated"] // 4
    assert mutated["malformed"] > 0 and mutated["unsupported_version"] > 0 and mutated["too_large"] > 0
    assert mutated["unknown_sender"] > 0  # a forged sender key
    assert report.reasons_by_generator["random"]["bad_signature"] > 0
    assert report.decoder_reasons["bad_signature"] > 0


def test_insider_messages_reach_the_header_and_semantic_checks(report: Any) -> None:
    insider = report.reasons_by_generator["insider"]
    assert insider["malformed"] > 0 and insider["too_large"] > 0
    assert insider["schema_mismatch"] > 0 and insider["fingerprint_mismatch"] > 0
    assert insider["wrong_network"] > 0 and insider["stale_round"] > 0 and insider["future_round"] > 0
    assert insider["bad_signature"] > 0  # a validly signed head whose payload digest is wrong
    assert insider["unknown_sender"] > 0  # the receivers that do not know the insider
    assert report.accepted["insider"] > 0  # well-formed ones, when the insider is a neighbour
    assert report.accepted["genuine"] > 0
    assert report.decoder_opened["insider"] > report.accepted["insider"]


@pytest.mark.parametrize("reason", ["non_finite", "clock_skew", "sender_mismatch"])
def test_content_and_link_gates_are_reached(report: Any, reason: str) -> None:
    assert report.reasons_by_generator["insider"][reason] > 0


def test_sessions_reach_the_stateful_gates(report: Any) -> None:
    session = report.reasons_by_generator["session"]
    for reason in ("replay", "rate_limited", "banned", "future_round", "stale_round", "sender_mismatch"):
        assert session[reason] > 0, reason
    assert report.accepted["session"] > 0


def test_equivocation_and_proof_paths_are_reached(report: Any) -> None:
    found = report.found_by_generator["session"]
    assert found["seen"] > 0  # a second, different update for a round: EquivocationFound, no crash
    assert found["proof new"] > 0 and found["proof known"] > 0  # relayed proofs, first and again
    # Hostile evidence (garbage, truncated, identical heads, other senders or rounds, oversized):
    # refused as malformed (or too_large when the proof exceeds the bounds), never a crash.
    session = report.reasons_by_generator["session"]
    assert session["malformed"] > 0 and session["too_large"] > 0
    assert report.decoder_opened["proof"] > 0  # check_evidence passed in the wire layer alone
    assert report.found_by_generator["insider"].total() > 0  # proofs on the shared receivers too


def test_timing_and_summary_are_reported(report: Any) -> None:
    assert 0 < report.slowest_ms < 5000 and report.slowest.startswith("#")
    summary = report.summary()
    assert f"crashes {report.crashes} ({len(report.crash_kinds)} distinct)" in summary
    assert f"accepted forgeries {report.forgeries}" in summary
    assert "equivocation found" in summary
    assert summary.endswith("PASS" if report.crashes == report.forgeries == 0 else "FAIL")
    assert report.to_json()["messages_per_s"] > 0


def test_messages_are_reproducible_from_seed_and_index() -> None:
    pool_a, pool_b = fuzz.genuine_pool(7), fuzz.genuine_pool(7)
    assert [fuzz.message_digest(m) for m in pool_a.messages] == [
        fuzz.message_digest(m) for m in pool_b.messages
    ]
    for index in (0, 1, 2, 3, 123, 2999):
        a, b = fuzz.make_case(7, index, pool_a), fuzz.make_case(7, index, pool_b)
        assert (a.generator, a.desc, a.link) == (b.generator, b.desc, b.link)
        assert fuzz.message_digest(a.message) == fuzz.message_digest(b.message)  # Ed25519 is deterministic
        assert a.setup == b.setup
    assert fuzz.replay(7, 123).startswith("#123 ")


def test_the_oracle_sees_forgeries(monkeypatch: pytest.MonkeyPatch) -> None:
    """With signature checking switched off, mutated messages must show up as forgeries,
    and so must proofs whose evidence heads the accused did not sign (a flipped bit)."""
    monkeypatch.setattr(wire, "_verify_key", lambda key: SimpleNamespace(verify=lambda digest, sig: None))
    report = fuzz.run(messages=2000, seed=1)
    assert report.forgery_kinds["update"] > 0 and report.forgery_kinds["evidence"] > 0


def test_the_oracle_sees_unchecked_payloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the payload digest check switched off, payloads other than the signed digest says must
    show up as forgeries: the head's signature alone does not authenticate the payload."""
    real = wire.decode_payload

    def lenient(message: wire.Verified, header: wire.UpdateHeader) -> Any:
        digest = fuzz.message_digest(message.payload)
        return real(message, dataclasses.replace(header, payload_digest=digest))

    monkeypatch.setattr(wire, "decode_payload", lenient)
    report = fuzz.run(messages=400, seed=1)
    assert report.forgery_kinds["update"] > 0 and report.forgery_kinds["evidence"] == 0


def test_the_oracle_sees_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(bits: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(wire, "bfloat16_bits_to_float32", broken)
    report = fuzz.run(messages=400, seed=1)
    assert report.crashes > 0 and "injected" in report.reproducers[0]["error"]


def test_lossy_tensors_are_fuzzed_past_the_digest() -> None:
    """Insider messages carry q8 / topk8_dN tensors under a correct digest, so that the codec's
    checks (docs/protocol.md 5.1) are what refuses them; valid ones open, and so do genuine ones."""
    pool = fuzz.genuine_pool(0)
    lossy_pool = [m for m in pool.messages if b"\xa2q8" in m and b"topk8_d" in m]
    assert len(lossy_pool) >= 2
    for message in lossy_pool:
        update = fuzz.open_message(message)
        assert isinstance(update, wire.Update)
        assert any(spec.dtype in wire.ENCODINGS for spec in update.specs)
    opened, refused = 0, set()
    for index in range(3000):
        case = fuzz.make_case(0, index, pool)
        if case.generator != "insider" or not case.desc.startswith("lossy"):
            continue
        try:
            fuzz.open_message(case.message)
            opened += 1
        except wire.MalformedMessage as exc:
            refused |= {
                what for what in ("bitmap marks", "padding", "scale of block", "-128") if what in str(exc)
            }
    assert opened > 0
    assert refused == {"bitmap marks", "padding", "scale of block", "-128"}


def test_a_chains_base_is_fuzzed() -> None:
    """Insider headers carry ``base`` values: below the round they open, anything else is malformed."""
    pool = fuzz.genuine_pool(0)
    opened, refused = 0, 0
    for index in range(6000):
        case = fuzz.make_case(0, index, pool)
        if case.generator != "insider" or not case.desc.startswith("base :="):
            continue
        try:
            update = fuzz.open_message(case.message)
        except wire.MalformedMessage:
            refused += 1
            continue
        assert isinstance(update, wire.Update) and update.base is not None and 0 <= update.base < update.round
        opened += 1
    assert opened > 0 and refused > 0
