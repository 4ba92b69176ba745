"""The config schema's building blocks: enumerations, constrained types and the one decoder.

Every config file (node config, roster, scenario) is decoded into frozen
msgspec Structs that refuse unknown keys. Constraints are declared on the
types (``Annotated[int, Meta(ge=1)]``, ``Literal`` enumerations, regex
patterns), so msgspec checks every value in one pass; checks that span
several fields live in a Struct's ``__post_init__``, which msgspec runs in
that same pass and which raises a :class:`ConfigError` itself. ``decode``
turns msgspec's ``ValidationError`` (``Expected `int` >= 1 - at
`$.gossip.rounds```) into a ConfigError that names the dotted field and
says what is expected: ``config field 'gossip.rounds': must be >= 1, got 0``.

Why msgspec and not pydantic: docs/node.md, "How the config is validated".
"""

from __future__ import annotations

import abc
import math
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, get_args

import msgspec
import msgspec.inspect as mi

from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import PeerId
from p2pfm.core.wire import WireLimits

T = TypeVar("T")

# --------------------------------------------------------------------------- #
# Enumerations: each defined once, here or in the core (MixRule, CompressionName).
# --------------------------------------------------------------------------- #

Task = Literal["classification", "causal-lm"]
TASKS: tuple[str, ...] = get_args(Task)
PartitionScheme = Literal["iid", "dirichlet", "labels"]
SCHEMES: tuple[str, ...] = get_args(PartitionScheme)
#: What an adapter may travel as (``gossip.wire_dtype``): a subset of the wire's dtypes.
WireDtype = Literal["float32", "bfloat16"]
Precision = Literal["auto", "fp32", "bf16"]
# gossip.algorithm (p2pfm/learn/algorithm.py)
AlgorithmName = Literal["dpsgd", "diloco", "scaffold", "fedadam"]
Optimizer = Literal["adamw", "sgd"]  # train.optimizer
#: Misbehaviours of an attacking member (p2pfm/node/attacks.py implements them).
AttackKind = Literal[
    "scale", "noise", "signflip", "replay", "forge", "wrong-model", "equivocate", "far-future"
]

#: The network id's limit is the wire's (a receiver refuses longer ones).
MAX_NETWORK_ID_BYTES: Final[int] = WireLimits.max_network_id_bytes

# --------------------------------------------------------------------------- #
# Constrained types
# --------------------------------------------------------------------------- #

_FLOAT_MAX = sys.float_info.max


def number(*, gt: float | None = None, ge: float | None = None) -> msgspec.Meta:
    """A float setting's lower bound, and float max as its upper one.

    Both refuse nan and the infinities, which TOML has and no setting means
    (a range with two finite bounds, ``Meta(ge=0, lt=1)``, refuses them too).
    """
    if gt is not None:
        return msgspec.Meta(gt=gt, le=_FLOAT_MAX)
    return msgspec.Meta(ge=-_FLOAT_MAX if ge is None else ge, le=_FLOAT_MAX)


Finite = Annotated[float, number()]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
_PORT = r"0*(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
#: ``tcp://HOST:PORT`` (port 1..65535); ``ipc://`` and ``inproc://`` for tests.
Address = Annotated[
    str,
    msgspec.Meta(
        pattern=rf"\A(?:(?:ipc|inproc)://.*|tcp://.+:{_PORT})\Z",
        description="an address like tcp://127.0.0.1:5550 (port 1..65535)",
    ),
]
#: ``HOST:PORT`` a node serves Prometheus ``/metrics`` on (``node.metrics_address``); "" is off.
MetricsAddress = Annotated[
    str,
    msgspec.Meta(
        pattern=rf"\A(?:(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):{_PORT})?\Z",
        description='HOST:PORT with a port in 1..65535, like 127.0.0.1:9464, or "" (off)',
    ),
]
Device = Annotated[
    str,
    msgspec.Meta(
        pattern=r"\A(?:auto|cpu|cuda(?::[0-9]+)?)\Z", description="'auto', 'cpu', 'cuda' or 'cuda:N'"
    ),
]


if typing.TYPE_CHECKING:
    PeerIdText = PeerId
else:

    class PeerIdText(abc.ABC):  # noqa: B024  (nothing is abstract: PeerId is registered as a subclass)
        """How msgspec sees a ``PeerId`` field: a custom type that ``_dec_hook`` builds from 64 hex digits.

        ``PeerId`` itself is a dataclass, which msgspec would decode from a
        table; registered here, a PeerId is what this type accepts.
        """

    PeerIdText.register(PeerId)


def check_network_id(field: str, network: str) -> None:
    """A network id is 1..64 bytes of UTF-8 (a byte count, which ``Meta(max_length)`` cannot express)."""
    size = len(network.encode())
    if not 1 <= size <= MAX_NETWORK_ID_BYTES:
        raise ConfigError(field, f"must be 1..{MAX_NETWORK_ID_BYTES} bytes of UTF-8, got {size} bytes")


def check_address(field: str, address: object) -> str:
    """Validate one address outside a config file (``p2pfm roster add --address``)."""
    return decode(Address, address, field)


class Schema(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of the config types: immutable, and a key the type does not have is an error."""


# --------------------------------------------------------------------------- #
# Decoding, and msgspec's errors as ConfigErrors
# --------------------------------------------------------------------------- #


def decode(cls: type[T], value: object, where: str) -> T:
    """Validate ``value`` (a parsed TOML table) as ``cls``; every mistake is a ConfigError under ``where``."""
    try:
        return msgspec.convert(value, cls, strict=True, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise _config_error(exc, cls, value, where) from None


def _dec_hook(cls: type, value: object) -> object:
    """The two non-msgspec types of the schema, built from TOML strings."""
    if cls is Path:
        if not isinstance(value, str) or not value:
            raise TypeError(f"must be a path string, got {_kind(value)}")
        return Path(value)
    if cls is PeerIdText:
        if not isinstance(value, str):
            raise TypeError(f"must be a peer id (64 hex digits), got {_kind(value)}")
        return PeerId.from_hex(value)  # ValueError says what is wrong
    raise NotImplementedError(cls)


_AT = re.compile(r"(?s)(.*?)(?: - at `\$(.*)`)?")
_SEGMENT = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_FIELD_PROBLEM = re.compile(r"Object (missing required|contains unknown) field `(.*)`")
_MSGSPEC_PROBLEM = ("Expected ", "Invalid enum value")


def _config_error(exc: msgspec.ValidationError, cls: Any, value: object, where: str) -> ConfigError:
    text, path = typing.cast(re.Match[str], _AT.fullmatch(str(exc))).groups()
    annotation, field = cls, where
    for match in _SEGMENT.finditer(path or ""):
        annotation, value, field = _step(annotation, value, field, match.group(1), match.group(2))
    if exc.__cause__ is not None:  # a dec_hook's TypeError / ValueError: its message is the problem
        return ConfigError(field, str(exc.__cause__))
    missing = _FIELD_PROBLEM.fullmatch(text)
    if missing is not None:
        kind, name = missing.groups()
        if kind == "missing required":
            return ConfigError(_join(field, name), "is required")
        struct = next(
            m for m in _members(annotation) if isinstance(m, type) and issubclass(m, msgspec.Struct)
        )
        valid = ", ".join(sorted(f.encode_name for f in msgspec.structs.fields(struct)))
        return ConfigError(_join(field, name), f"unknown field; valid fields are: {valid}")
    if text.startswith(_MSGSPEC_PROBLEM):
        return ConfigError(field, _expected(annotation, value))
    return ConfigError(field, text)  # a __post_init__'s ValueError / TypeError without a field of its own


def _step(
    annotation: Any, value: object, field: str, name: str | None, index: str | None
) -> tuple[Any, object, str]:
    """Follow one segment of msgspec's error path through the type and the value."""
    for member in _members(annotation):
        origin = typing.get_origin(member)
        if name is not None and isinstance(member, type) and issubclass(member, msgspec.Struct):
            info = next(f for f in msgspec.structs.fields(member) if f.encode_name == name)
            child = value.get(name) if isinstance(value, Mapping) else None
            return info.type, child, _join(field, name)
        if index == "..." and origin is dict and isinstance(value, Mapping):
            # msgspec does not say which key: the first whose value fails is the one.
            item_type = get_args(member)[1]
            for key, item in value.items():
                try:
                    msgspec.convert(item, item_type, strict=True, dec_hook=_dec_hook)
                except msgspec.ValidationError:
                    return item_type, item, _join(field, str(key))
        if index not in (None, "...") and origin in (tuple, list) and isinstance(value, Sequence):
            return get_args(member)[0], value[int(index)], f"{field}[{index}]"
    return annotation, None, field  # pragma: no cover - msgspec's path always fits the type


def _join(field: str, name: str) -> str:
    return f"{field}.{name}" if field else name


def _members(annotation: Any) -> list[Any]:
    """A union's options (or the type itself), with ``Annotated`` taken off."""
    if typing.get_origin(annotation) is Annotated:
        return _members(get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in _members(arg)]
    return [annotation]


def _expected(annotation: Any, value: object) -> str:
    """What the value at a failing field must be, and what it is."""
    options = _options(mi.type_info(annotation))
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value}"
    # From the annotation, not msgspec.inspect (which sorts them): in the order the schema gives them.
    literals = [v for m in _members(annotation) if typing.get_origin(m) is Literal for v in get_args(m)]
    fitting = [(option, about) for option, about in options if _fits(option, value)]
    if fitting:  # the right kind of value, out of range
        option, about = fitting[0]
        return f"must be {about or _bounds(option)}, got {value!r}"
    if literals and all(isinstance(option, (mi.LiteralType, mi.NoneType)) for option, _ in options):
        return f"must be one of {', '.join(map(repr, literals))}, got {value!r}"
    nouns = [about or _noun(option) for option, about in options if not isinstance(option, mi.NoneType)]
    return f"must be {' or '.join(dict.fromkeys(nouns))}, got {_kind(value)}"


def _options(info: mi.Type) -> list[tuple[mi.Type, str]]:
    """The alternatives of a type, each with its ``Meta(description=...)`` ("" without one)."""
    if isinstance(info, mi.UnionType):
        return [option for member in info.types for option in _options(member)]
    if isinstance(info, mi.Metadata):
        about = (info.extra_json_schema or {}).get("description", "")
        return [(inner, about or inner_about) for inner, inner_about in _options(info.type)]
    return [(info, "")]


_KINDS: Mapping[type[mi.Type], tuple[str, tuple[type, ...]]] = {
    mi.BoolType: ("true or false", (bool,)),
    mi.IntType: ("an integer", (int,)),
    mi.FloatType: ("a number", (int, float)),
    mi.StrType: ("a string", (str,)),
    mi.VarTupleType: ("a list", (list, tuple)),
    mi.ListType: ("a list", (list, tuple)),
    mi.DictType: ("a table", (dict,)),
    mi.StructType: ("a table", (dict,)),
}


def _fits(option: mi.Type, value: object) -> bool:
    """Whether ``value`` is of the option's kind (bool is not a number here)."""
    _, kinds = _KINDS.get(type(option), ("", ()))
    return isinstance(value, kinds) and (isinstance(option, mi.BoolType) or not isinstance(value, bool))


def _noun(option: mi.Type) -> str:
    if isinstance(option, mi.LiteralType):
        return f"one of {', '.join(map(repr, option.values))}"
    return _KINDS.get(type(option), (type(option).__name__, ()))[0]


def _bounds(option: mi.Type) -> str:
    """A constraint in words: ">= 1", "in [0, 1)", "a non-empty list"."""
    if isinstance(option, (mi.IntType, mi.FloatType)):
        lows = [(op, b) for op, b in ((">=", option.ge), (">", option.gt)) if b not in (None, -_FLOAT_MAX)]
        highs = [(op, b) for op, b in (("<=", option.le), ("<", option.lt)) if b not in (None, _FLOAT_MAX)]
        if lows and highs:
            (low_op, low), (high_op, high) = lows[0], highs[0]
            return f"in {'[' if low_op == '>=' else '('}{low}, {high}{']' if high_op == '<=' else ')'}"
        return " and ".join(f"{op} {bound}" for op, bound in lows + highs)
    if isinstance(option, mi.StrType) and option.pattern is not None:
        return f"a string matching {option.pattern!r}"
    if isinstance(option, (mi.StrType, mi.VarTupleType, mi.ListType, mi.DictType)):
        noun = _noun(option).removeprefix("a ")
        shortest, longest = option.min_length or 0, option.max_length
        if longest is None:
            return f"a non-empty {noun}" if shortest == 1 else f"a {noun} of at least {shortest} items"
        return f"a {noun} of {shortest}..{longest} items"
    return _noun(option)


def _kind(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:80]
