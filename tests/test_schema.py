"""The schema decoder: msgspec's checks, and its errors as ConfigErrors naming the dotted field."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
import pytest
from msgspec import Meta

from p2pfm.config.schema import (
    MAX_NETWORK_ID_BYTES,
    Address,
    Finite,
    PeerIdText,
    Schema,
    WireDtype,
    check_address,
    check_network_id,
    decode,
    number,
)
from p2pfm.core import wire
from p2pfm.core.errors import ConfigError, UserInputError
from p2pfm.core.identity import Identity, PeerId
from p2pfm.lab.scenario import Faults

PEER = Identity(b"\7" * 32).peer_id


class Inner(Schema, frozen=True):
    depth: int
    label: str = "x"


class Sample(Schema, frozen=True, kw_only=True):
    count: int  # the one required field
    ratio: Finite = 0.5
    flag: bool = False
    name: str = ""
    where: Path = Path("default")
    mode: Literal["fast", "slow"] = "fast"
    sizes: tuple[int, ...] = ()
    weights: dict[str, Finite] = msgspec.field(default_factory=dict)
    limit: int | None = None
    either: int | str = 0
    child: Inner = msgspec.field(default_factory=lambda: Inner(1))
    maybe: Inner | None = None
    peer: PeerIdText | None = None


class TwoRequired(Schema, frozen=True):
    first: int
    second: str
    third: int = 3


class Checked(Schema, frozen=True):
    low: int = 0
    high: int = 1

    def __post_init__(self) -> None:
        if self.low < 0:
            raise ConfigError("checked.low", "must be >= 0")
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.high > 100:
            raise TypeError("high is absurd")


def _refused(value: object, annotation: Any, name: str = "s.f") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        decode(annotation, value, name)
    return info.value


# --------------------------------------------------------------------------- #
# One value at a time
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (3, int, 3),
        (-7, int, -7),
        (True, bool, True),
        (False, bool, False),
        (2.5, float, 2.5),
        ("text", str, "text"),
        ("", str, ""),
        ("a/b.key", Path, Path("a/b.key")),
        ("slow", Literal["fast", "slow"], "slow"),
        ([1, 2, 3], tuple[int, ...], (1, 2, 3)),
        ([], tuple[str, ...], ()),
        ({"a": 0.5}, dict[str, float], {"a": 0.5}),
        ({}, dict[str, int], {}),
        (None, int | None, None),
        (4, int | None, 4),
        ("x", int | str, "x"),
        (5, int | str, 5),
        ({"nested": [True]}, dict[str, Any], {"nested": [True]}),
        (PEER.hex, PeerIdText, PEER),
        ("tcp://10.0.0.2:5550", Address, "tcp://10.0.0.2:5550"),
    ],
)
def test_decode_accepts_each_kind_of_value(value: object, annotation: Any, expected: object) -> None:
    result = decode(annotation, value, "s.f")
    assert result == expected
    assert type(result) is type(expected)


def test_decode_widens_an_int_to_a_float_and_converts_nested_lists() -> None:
    assert type(decode(float, 3, "s.f")) is float and decode(float, 3, "s.f") == 3.0
    weights = decode(dict[str, float], {"a": 1, "b": 2.5}, "s.f")
    assert weights == {"a": 1.0, "b": 2.5} and all(type(v) is float for v in weights.values())
    assert decode(tuple[tuple[int, ...], ...], [[1, 2], []], "s.f") == ((1, 2), ())


@pytest.mark.parametrize(
    "annotation", [Finite, Annotated[float, number(gt=0)], Annotated[float, number(ge=1.0)], Finite | None]
)
def test_non_finite_floats_are_refused(annotation: Any) -> None:
    # TOML has inf and nan; no setting means either, so every float setting refuses them.
    for value in (math.inf, -math.inf, math.nan):
        error = _refused(value, annotation)
        assert error.field == "s.f" and error.problem == f"must be a finite number, got {value}"
    assert decode(annotation, 1e300, "s.f") == 1e300


def test_literal_compares_types_and_optional_tables_keep_nested_field_names() -> None:
    for value in (True, 1.0):
        assert _refused(value, Literal[1, 2]).problem == f"must be one of 1, 2, got {value!r}"
    assert decode(Literal[1, 2], 2, "s.f") == 2
    error = _refused({"count": 1, "maybe": {"depth": "x"}}, Sample, "s")
    assert (error.field, error.problem) == ("s.maybe.depth", "must be an integer, got str 'x'")


@pytest.mark.parametrize(
    ("value", "annotation", "problem"),
    [
        (True, int, "must be an integer, got bool True"),  # a bool is not an int here
        (1.0, int, "must be an integer, got float 1.0"),
        ("1", int, "must be an integer, got str '1'"),
        (1, bool, "must be true or false, got int 1"),
        ("true", bool, "must be true or false, got str 'true'"),
        (True, float, "must be a number, got bool True"),
        ("1.5", float, "must be a number, got str '1.5'"),
        (None, float, "must be a number, got NoneType None"),
        (1, str, "must be a string, got int 1"),
        (["a"], str, "must be a string, got list ['a']"),
        ("", Path, "must be a path string, got str ''"),
        (7, Path, "must be a path string, got int 7"),
        ("medium", Literal["fast", "slow"], "must be one of 'fast', 'slow', got 'medium'"),
        ("FAST", Literal["fast", "slow"], "must be one of 'fast', 'slow', got 'FAST'"),
        ("1,2", tuple[int, ...], "must be a list, got str '1,2'"),
        ([1], dict[str, int], "must be a table, got list [1]"),
        ("x", int | None, "must be an integer, got str 'x'"),  # None is only ever a default
        (1.5, int | str, "must be an integer or a string, got float 1.5"),
        (None, int | str, "must be an integer or a string, got NoneType None"),
        (0, Annotated[int, Meta(ge=1)], "must be >= 1, got 0"),
        (1.0, Annotated[float, Meta(ge=0, lt=1)], "must be in [0, 1), got 1.0"),
        (0, Annotated[float, number(gt=0)], "must be > 0, got 0"),
        ("", Annotated[str, Meta(min_length=1)], "must be a non-empty string, got ''"),
        ([], Annotated[tuple[str, ...], Meta(min_length=1)], "must be a non-empty list, got []"),
        ("ab", Annotated[str, Meta(pattern="^x")], "must be a string matching '^x', got 'ab'"),
        ("zz", PeerIdText, "peer id 'zz' is not hexadecimal"),
        (5, PeerIdText, "must be a peer id (64 hex digits), got int 5"),
    ],
)
def test_wrong_values_name_the_field_and_say_what_is_expected(
    value: object, annotation: Any, problem: str
) -> None:
    error = _refused(value, annotation)
    assert error.field == "s.f"
    assert error.problem == problem
    assert str(error) == f"config field 's.f': {problem}"
    assert isinstance(error, UserInputError)


def test_the_bad_item_of_a_list_or_table_is_named() -> None:
    error = _refused([1, 2, "three"], tuple[int, ...])
    assert error.field == "s.f[2]" and error.problem == "must be an integer, got str 'three'"
    # msgspec reports a table's bad value without its key; the error names the key.
    error = _refused({"ok": 0.5, "bad": "x"}, dict[str, float])
    assert error.field == "s.f.bad" and error.problem == "must be a number, got str 'x'"
    error = _refused({"ok": 0.5, "node3": 1.5}, dict[str, Annotated[float, Meta(ge=0, le=1)]])
    assert error.field == "s.f.node3" and error.problem == "must be in [0, 1], got 1.5"
    error = _refused([[1], [2, True]], tuple[tuple[int, ...], ...])
    assert error.field == "s.f[1][1]"


def test_long_values_are_cut_in_the_message() -> None:
    error = _refused("x" * 500, int)
    assert error.problem == "must be an integer, got " + ("str '" + "x" * 500)[:80]


# --------------------------------------------------------------------------- #
# Tables into Structs
# --------------------------------------------------------------------------- #


def test_a_full_table_is_decoded() -> None:
    table = {
        "count": 2,
        "ratio": 1,
        "flag": True,
        "name": "n",
        "where": "out/dir",
        "mode": "slow",
        "sizes": [4, 8],
        "weights": {"a": 1},
        "limit": 9,
        "either": "e",
        "child": {"depth": 3},
        "maybe": {"depth": 4, "label": "m"},
        "peer": PEER.hex,
    }

    decoded = decode(Sample, table, "s")

    assert decoded == Sample(
        count=2, ratio=1.0, flag=True, name="n", where=Path("out/dir"), mode="slow", sizes=(4, 8),
        weights={"a": 1.0}, limit=9, either="e", child=Inner(3), maybe=Inner(4, "m"), peer=PEER,
    )  # fmt: skip
    assert type(decoded.ratio) is float and isinstance(decoded.sizes, tuple)
    assert isinstance(decoded.peer, PeerId)


def test_defaults_fill_what_a_table_leaves_out() -> None:
    decoded = decode(Sample, {"count": 0}, "s")
    assert decoded == Sample(count=0)
    assert decoded.child == Inner(1) and decoded.maybe is None and decoded.where == Path("default")


def test_a_non_table_is_refused() -> None:
    for value, kind in (([1, 2], "list [1, 2]"), (3, "int 3"), ("x", "str 'x'"), (None, "NoneType None")):
        error = _refused(value, Sample, "s")
        assert error.field == "s" and error.problem == f"must be a table, got {kind}"


def test_an_unknown_field_is_named_with_the_valid_ones() -> None:
    error = _refused({"count": 1, "cuont": 2}, Sample, "s")
    assert error.field == "s.cuont"
    valid = sorted(f.name for f in msgspec.structs.fields(Sample))
    assert error.problem == f"unknown field; valid fields are: {', '.join(valid)}"
    error = _refused({"depth": 1, "colour": 2}, Inner, "")  # at the top level: no dot
    assert error.field == "colour"


def test_a_missing_required_field_is_named() -> None:
    error = _refused({"third": 1}, TwoRequired, "two")
    assert (error.field, error.problem) == ("two.first", "is required")
    error = _refused({"first": 1}, TwoRequired, "two")
    assert error.field == "two.second"
    assert decode(TwoRequired, {"first": 1, "second": "b"}, "two") == TwoRequired(1, "b")


def test_a_wrong_type_is_reported_before_a_missing_field() -> None:
    error = _refused({"third": "3"}, TwoRequired, "two")
    assert error.field == "two.third"


def test_nested_structs_get_dotted_field_names() -> None:
    cases = [
        ({"count": 1, "child": {"depth": "deep"}}, "s.child.depth", "must be an integer, got str 'deep'"),
        ({"count": 1, "child": {"depth": 1, "colour": 2}}, "s.child.colour", "unknown field"),
        ({"count": 1, "child": {"label": "y"}}, "s.child.depth", "is required"),
        ({"count": 1, "child": 5}, "s.child", "must be a table, got int"),
        ({"count": 1, "sizes": [1, "2"]}, "s.sizes[1]", "must be an integer"),
        ({"count": 1, "weights": {"w": False}}, "s.weights.w", "must be a number"),
        ({"count": 1, "peer": "abc"}, "s.peer", "peer id 'abc' is not hexadecimal"),
    ]
    for table, name, problem in cases:
        error = _refused(table, Sample, "s")
        assert error.field == name
        assert error.problem.startswith(problem)


def test_a_tuple_of_structs_names_the_entry() -> None:
    # The scenario's [[faults.crash]] array of tables.
    faults = decode(Faults, {"crash": [{"node": 1, "round": 2}, {"node": 2, "round": 3}]}, "faults")
    assert [(c.node, c.round, c.restart_after_s) for c in faults.crash] == [(1, 2, 5.0), (2, 3, 5.0)]
    error = _refused({"crash": [{"node": 1, "round": 2}, {"node": 2, "round": "3"}]}, Faults, "faults")
    assert error.field == "faults.crash[1].round"
    error = _refused({"crash": [{"node": 1}]}, Faults, "faults")
    assert (error.field, error.problem) == ("faults.crash[0].round", "is required")


def test_post_init_errors_keep_their_field_or_get_the_struct_s() -> None:
    assert decode(Checked, {"low": 1, "high": 2}, "checked") == Checked(1, 2)
    error = _refused({"low": -1}, Checked, "section")
    assert (error.field, error.problem) == ("checked.low", "must be >= 0")  # passed through as is
    error = _refused({"low": 5, "high": 2}, Checked, "section")
    assert (error.field, error.problem) == ("section", "low (5) must be <= high (2)")
    error = _refused({"high": 101}, Checked, "section")
    assert (error.field, error.problem) == ("section", "high is absurd")
    error = _refused({"checked": {"high": 101}}, dict[str, Checked], "many")
    assert (error.field, error.problem) == ("many.checked", "high is absurd")


# --------------------------------------------------------------------------- #
# Shared types
# --------------------------------------------------------------------------- #


def test_addresses() -> None:
    for good in ("tcp://10.0.0.2:5550", "tcp://[::1]:1", "tcp://h:65535", "tcp://h:05550", "ipc:///tmp/s"):
        assert check_address("peers[0].address", good) == good
    for bad in (
        "127.0.0.1:5000",
        "tcp://:5000",
        "tcp://host:port",
        "tcp://h:70000",
        "tcp://h:0",
        "tcp://h:1\n",
    ):
        with pytest.raises(ConfigError) as info:
            check_address("peers[0].address", bad)
        assert info.value.field == "peers[0].address"
        assert info.value.problem.startswith("must be an address like tcp://127.0.0.1:5550 (port 1..65535)")


def test_the_network_id_is_the_wire_s_1_to_64_bytes_of_utf8() -> None:
    assert MAX_NETWORK_ID_BYTES == wire.WireLimits().max_network_id_bytes == 64
    check_network_id("node.network", "n" * 64)
    check_network_id("node.network", "é" * 32)
    for bad, size in (("", 0), ("n" * 65, 65), ("é" * 33, 66)):
        with pytest.raises(ConfigError) as info:
            check_network_id("node.network", bad)
        assert (info.value.field, info.value.problem) == (
            "node.network",
            f"must be 1..64 bytes of UTF-8, got {size} bytes",
        )


def test_gossip_wire_dtypes_are_wire_dtypes() -> None:
    assert set(get_args(WireDtype)) <= set(wire.DTYPES)


@pytest.mark.slow  # starts a process
def test_the_config_layer_imports_neither_torch_nor_zmq() -> None:
    heavy = ("torch", "zmq", "peft", "transformers")
    for module, banned in (("p2pfm.config.node_config", heavy), ("p2pfm.config.roster", ("zmq",))):
        code = f"import {module}, sys; print([m for m in {banned!r} if m in sys.modules])"
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        assert out.stdout.strip() == "[]", (module, out.stdout)
