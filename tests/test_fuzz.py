"""The message fuzzer (fuzz/fuzz_messages.py), small: no crash, no forgery, deep paths reached.

The deep-path assertions are there so that this test fails if the fuzzer
silently stops exercising the signature check or the header/semantic gates
(for example because every mutation is refused by the framing checks).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from p2pfm import wire
from p2pfm.errors import RejectReason

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
    assert all(report.by_generator[g] >= MESSAGES // 10 for g in fuzz.GENERATORS)


def test_mutations_reach_the_signature_check(report: Any) -> None:
    mutated = report.reasons_by_generator["mutated"]
    assert mutated["bad_signature"] >= MESSAGES // 10
    assert mutated["malformed"] > 0 and mutated["unsupported_version"] > 0 and mutated["too_large"] > 0
    assert report.reasons_by_generator["random"]["bad_signature"] > 0


def test_insider_messages_reach_the_header_and_semantic_checks(report: Any) -> None:
    insider = report.reasons_by_generator["insider"]
    assert insider["malformed"] > 0 and insider["too_large"] > 0
    assert insider["schema_mismatch"] > 0 and insider["fingerprint_mismatch"] > 0
    assert insider["wrong_network"] > 0 and insider["replay"] > 0
    assert insider["unknown_sender"] > 0  # the receiver that does not know the insider
    assert report.accepted["insider"] > 0  # well-formed ones, when the insider is a neighbour
    assert report.accepted["genuine"] > 0
    assert report.decoder_opened["insider"] > report.accepted["insider"]


@pytest.mark.parametrize("reason", ["rate_limited", "non_finite", "clock_skew"])
def test_newer_gates_are_reached_where_the_protocol_has_them(report: Any, reason: str) -> None:
    if reason not in {r.value for r in RejectReason}:
        pytest.skip(f"this protocol revision has no {reason} gate")
    assert report.reasons_by_generator["insider"][reason] > 0


def test_timing_and_summary_are_reported(report: Any) -> None:
    assert 0 < report.slowest_ms < 5000 and report.slowest.startswith("#")
    summary = report.summary()
    assert f"crashes {report.crashes} ({len(report.crash_kinds)} distinct)" in summary
    assert f"accepted forgeries {report.forgeries}" in summary
    assert summary.endswith("PASS" if report.crashes == report.forgeries == 0 else "FAIL")
    assert report.to_json()["messages_per_s"] > 0


def test_messages_are_reproducible_from_seed_and_index() -> None:
    pool_a, pool_b = fuzz.genuine_pool(7), fuzz.genuine_pool(7)
    for index in (0, 1, 123, 2999):
        a, b = fuzz.make_case(7, index, pool_a), fuzz.make_case(7, index, pool_b)
        assert (a.generator, a.desc) == (b.generator, b.desc)
        if not a.insider_signed:  # Ed25519 signatures are deterministic too, but keep it cheap
            assert fuzz.frames_digest(a.frames) == fuzz.frames_digest(b.frames)
    assert fuzz.replay(7, 123).startswith("#123 ")


def test_the_oracle_sees_forgeries(monkeypatch: pytest.MonkeyPatch) -> None:
    """With signature checking switched off, mutated messages must show up as forgeries."""
    monkeypatch.setattr(wire, "_verify_key", lambda key: SimpleNamespace(verify=lambda digest, sig: None))
    assert fuzz.run(messages=400, seed=1).forgeries > 0


def test_the_oracle_sees_crashes(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(bits: Any) -> Any:
        raise RuntimeError("injected")

    monkeypatch.setattr(wire, "bfloat16_bits_to_float32", broken)
    report = fuzz.run(messages=400, seed=1)
    assert report.crashes > 0 and "injected" in report.reproducers[0]["error"]
