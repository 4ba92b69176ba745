"""Typed construction of settings dataclasses from TOML tables.

Every config section is a frozen dataclass (validated in its own
``__post_init__``); this module turns a TOML table into one, refusing
unknown keys and wrong types with a :class:`ConfigError` that names the
field (``train.lr``) and says what is expected.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from p2pfm.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

T = TypeVar("T")


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; problems name the file (and line, from tomllib)."""
    try:
        with path.open("rb") as handle:
            doc: dict[str, Any] = tomllib.load(handle)
            return doc
    except FileNotFoundError:
        raise ConfigError(what, f"file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(what, f"cannot read {path} ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(what, f"{path} is not valid TOML ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            what, f"{path} is not UTF-8 text (byte {exc.start}); TOML files must be UTF-8"
        ) from None


def build(cls: type[T], table: object, section: str) -> T:
    """Instantiate dataclass ``cls`` from ``table``, checking keys and types."""
    if not isinstance(table, Mapping):
        raise ConfigError(section, f"must be a table, got {type(table).__name__}")
    assert dataclasses.is_dataclass(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"{section}.{key}", f"unknown field; valid fields are: {valid}")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{section}.{missing[0]}", "is required")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ without a field name
        raise ConfigError(section, str(exc)) from None


def coerce(value: object, annotation: Any, field: str) -> Any:
    """Check ``value`` against a (simple) type annotation; convert lists to tuples."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return build(annotation, value, field)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors: list[ConfigError] = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, field)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]  # keeps the nested field name (e.g. a table inside an optional one)
        raise ConfigError(field, "; ".join(exc.problem for exc in errors))
    if origin is typing.Literal:
        # Compare by type too: True == 1 and 1.0 == 1 must not pass for Literal[1].
        if not any(type(value) is type(a) and value == a for a in args):
            raise ConfigError(field, f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(field, f"must be a list, got {_kind(value)}")
        item_type = args[0]
        return tuple(coerce(item, item_type, f"{field}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(field, f"must be a table, got {_kind(value)}")
        key_type, value_type = args
        return {coerce(k, key_type, field): coerce(v, value_type, f"{field}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(field, f"must be true or false, got {_kind(value)}")
        return value
    if annotation is int:
        if type(value) is not int:
            raise ConfigError(field, f"must be an integer, got {_kind(value)}")
        return value
    if annotation is float:
        if type(value) not in (int, float):
            raise ConfigError(field, f"must be a number, got {_kind(value)}")
        number = float(typing.cast(float, value))
        if not math.isfinite(number):  # TOML has inf and nan; no setting means either
            raise ConfigError(field, f"must be a finite number, got {number}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"must be a string, got {_kind(value)}")
        return value
    if annotation is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(field, f"must be a path string, got {_kind(value)}")
        return Path(value)
    raise ConfigError(field, f"has an unsupported type {annotation!r}")  # pragma: no cover


def _kind(value: object) -> str:
    return f"{type(value).__name__} {value!r}"[:80]
