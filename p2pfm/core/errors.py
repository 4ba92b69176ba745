"""The exception hierarchy of p2pfm.

Following h11, errors are split by *who* is at fault:

* :class:`LocalProtocolError` -- the caller misused an API (a bug in our own
  code or a script driving it). Never caused by network input.
* :class:`RemoteProtocolError` -- a peer sent bytes we refuse. Each subclass
  carries a :class:`RejectReason` so that a node can count refusals by reason
  instead of crashing or logging a traceback.
* :class:`UserInputError` -- a file or setting given by the operator is wrong
  (key file, topology spec, config). Its message names the file or field and
  the fix; the CLI prints it on one line and exits non-zero.
"""

from __future__ import annotations

import enum


class RejectReason(str, enum.Enum):
    """Why an incoming message was refused. Values are stable metric names."""

    MALFORMED = "malformed"  # framing, msgpack or schema is wrong
    TOO_LARGE = "too_large"  # a size bound was exceeded before allocation
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_SENDER = "unknown_sender"
    WRONG_NETWORK = "wrong_network"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    SCHEMA_MISMATCH = "schema_mismatch"  # tensor names/dtypes/shapes differ
    REPLAY = "replay"  # (round, seq) not newer than the last accepted
    STALE_ROUND = "stale_round"  # round older than the receiver's round
    RATE_LIMITED = "rate_limited"  # the sender exceeded its message rate
    CLOCK_SKEW = "clock_skew"  # timestamp too far from the receiver's clock
    NON_FINITE = "non_finite"  # a NaN or infinity in a tensor
    FUTURE_ROUND = "future_round"  # round further ahead than gossip.max_rounds_ahead
    SENDER_MISMATCH = "sender_mismatch"  # signed by a key other than the link's authenticated one
    EQUIVOCATION = "equivocation"  # a second, different update for a round (proof kept, sender banned)
    BANNED = "banned"  # from a sender proven to equivocate
    WRONG_RECIPIENT = "wrong_recipient"  # a control message addressed to another node (a relayed replay)


class P2PFMError(Exception):
    """Base class of every error p2pfm raises on purpose."""


class LocalProtocolError(P2PFMError):
    """The caller used an API wrongly (not the peer's fault)."""


class ArgumentError(LocalProtocolError, ValueError):
    """A Python API was called with a bad argument (``p2pfm.simulate``); ``argument`` names it."""

    def __init__(self, argument: str, problem: str) -> None:
        super().__init__(f"argument {argument!r}: {problem}")
        self.argument = argument
        self.problem = problem


class RemoteProtocolError(P2PFMError):
    """A peer sent data that is refused. ``reason`` says why."""

    reason: RejectReason = RejectReason.MALFORMED

    def __init__(self, message: str, reason: RejectReason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class MalformedMessage(RemoteProtocolError):
    reason = RejectReason.MALFORMED


class MessageTooLarge(RemoteProtocolError):
    reason = RejectReason.TOO_LARGE


class UnsupportedVersion(RemoteProtocolError):
    reason = RejectReason.UNSUPPORTED_VERSION


class BadSignature(RemoteProtocolError):
    reason = RejectReason.BAD_SIGNATURE


class UnknownSender(RemoteProtocolError):
    reason = RejectReason.UNKNOWN_SENDER


class UserInputError(P2PFMError):
    """An operator-supplied file or value is wrong; the message says how to fix it."""


class KeyFileError(UserInputError):
    """A key file is missing, unreadable, too permissive or corrupt."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"key file {path}: {problem}")
        self.path = path
        self.problem = problem


class TopologyError(UserInputError):
    """A topology spec or file is invalid, or the graph is unusable."""


class ConfigError(UserInputError):
    """A configuration value is invalid. The message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"config field {field!r}: {problem}")
        self.field = field
        self.problem = problem


class UnsafePathError(UserInputError):
    """A path p2pfm must create privately is a symlink or not what it should be (a folder, a file)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class SummaryError(UserInputError):
    """A run's summary.json is missing, not JSON, or not what this p2pfm writes; ``key`` names where."""

    def __init__(self, source: object, problem: str, key: str | None = None) -> None:
        super().__init__(f"{source}: {problem}" if key is None else f"{source}: key {key!r} {problem}")
        self.source = source
        self.problem = problem
        self.key = key


class NodeFailedError(P2PFMError):
    """A node process of a local run exited in a way its plan did not ask for; the run was stopped."""

    def __init__(self, node: str, exit_status: int, last_line: str, log: object) -> None:
        said = f": {last_line}" if last_line else ""
        super().__init__(f"{node} failed (exit status {exit_status}){said}\n  its log: {log}")
        self.node = node
        self.exit_status = exit_status
        self.last_line = last_line
        self.log = log
