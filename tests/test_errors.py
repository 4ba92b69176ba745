"""The error hierarchy: split by who is at fault, each message naming what to fix."""

from __future__ import annotations

import pytest

from p2pfm.core import errors
from p2pfm.core.errors import (
    ConfigError,
    KeyFileError,
    LocalProtocolError,
    RejectReason,
    RemoteProtocolError,
    SummaryError,
    TopologyError,
    UnsafePathError,
    UserInputError,
)

REMOTE = [
    (errors.MalformedMessage, RejectReason.MALFORMED),
    (errors.MessageTooLarge, RejectReason.TOO_LARGE),
    (errors.UnsupportedVersion, RejectReason.UNSUPPORTED_VERSION),
    (errors.BadSignature, RejectReason.BAD_SIGNATURE),
    (errors.UnknownSender, RejectReason.UNKNOWN_SENDER),
]


def test_the_three_kinds_of_fault_never_overlap() -> None:
    kinds = (LocalProtocolError, RemoteProtocolError, UserInputError)
    for kind in kinds:
        assert issubclass(kind, errors.P2PFMError)
        assert [other for other in kinds if other is not kind and issubclass(kind, other)] == []
    for operator_error in (ConfigError, KeyFileError, TopologyError, UnsafePathError, SummaryError):
        assert issubclass(operator_error, UserInputError)  # the CLI prints these on one line


@pytest.mark.parametrize(("cls", "reason"), REMOTE)
def test_a_peers_error_carries_the_reason_it_is_counted_under(
    cls: type[RemoteProtocolError], reason: RejectReason
) -> None:
    assert cls("x").reason is reason
    overridden = cls("x", RejectReason.NON_FINITE)
    assert overridden.reason is RejectReason.NON_FINITE and cls.reason is reason  # the class keeps its own


def test_reject_reasons_are_distinct_snake_case_metric_names() -> None:
    values = [reason.value for reason in RejectReason]
    assert len(set(values)) == len(values)
    assert all(value.isidentifier() and value == value.lower() for value in values)
    assert RejectReason("stale_round") is RejectReason.STALE_ROUND  # looked up from a metrics file


def test_operator_errors_name_the_field_or_file_and_keep_their_parts() -> None:
    config = ConfigError("train.lr", "must be > 0, got 0.0")
    assert str(config) == "config field 'train.lr': must be > 0, got 0.0"
    assert (config.field, config.problem) == ("train.lr", "must be > 0, got 0.0")
    key = KeyFileError("/k/a.key", "does not exist")
    assert str(key) == "key file /k/a.key: does not exist" and key.path == "/k/a.key"
    assert str(UnsafePathError("/out", "is a symbolic link")) == "/out: is a symbolic link"
    assert str(SummaryError("run/summary.json", "is not JSON")) == "run/summary.json: is not JSON"
    keyed = SummaryError("run/summary.json", "is missing", key="wall_s")
    assert str(keyed) == "run/summary.json: key 'wall_s' is missing" and keyed.key == "wall_s"
