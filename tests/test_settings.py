"""Typed settings from TOML tables: coercion per type, field names in errors, read_toml's failures."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from p2pfm.config.node_config import GossipSettings
from p2pfm.config.toml import build, coerce, read_toml
from p2pfm.core.errors import ConfigError, UserInputError
from p2pfm.lab.scenario import Faults


@dataclass(frozen=True)
class Inner:
    depth: int
    label: str = "x"


@dataclass(frozen=True)
class Sample:
    count: int  # the one required field
    ratio: float = 0.5
    flag: bool = False
    name: str = ""
    where: Path = Path("default")
    mode: Literal["fast", "slow"] = "fast"
    sizes: tuple[int, ...] = ()
    weights: dict[str, float] = field(default_factory=dict)
    limit: int | None = None
    either: int | str = 0
    child: Inner = field(default_factory=lambda: Inner(1))
    maybe: Inner | None = None
    anything: Any = None
    derived: int = field(default=0, init=False)


@dataclass(frozen=True)
class TwoRequired:
    first: int
    second: str
    third: int = 3


@dataclass(frozen=True)
class Checked:
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
        coerce(value, annotation, name)
    return info.value


# --------------------------------------------------------------------------- #
# coerce: one type at a time
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
        ([{"nested": True}], Any, [{"nested": True}]),
    ],
)
def test_coerce_accepts_each_supported_type(value: object, annotation: Any, expected: object) -> None:
    result = coerce(value, annotation, "s.f")
    assert result == expected
    assert type(result) is type(expected)


def test_coerce_widens_an_int_to_a_float_and_converts_nested_lists() -> None:
    assert type(coerce(3, float, "s.f")) is float and coerce(3, float, "s.f") == 3.0
    weights = coerce({"a": 1, "b": 2.5}, dict[str, float], "s.f")
    assert weights == {"a": 1.0, "b": 2.5} and all(type(v) is float for v in weights.values())
    assert coerce([[1, 2], []], tuple[tuple[int, ...], ...], "s.f") == ((1, 2), ())


def test_coerce_refuses_non_finite_floats() -> None:
    # TOML has inf and nan; no setting means either, so they are refused at the type check.
    for value in (math.inf, -math.inf, math.nan):
        with pytest.raises(ConfigError, match="must be a finite number") as info:
            coerce(value, float, "s.f")
        assert info.value.field == "s.f"


def test_literal_compares_types_and_optional_tables_keep_nested_field_names() -> None:
    for value in (True, 1.0):
        with pytest.raises(ConfigError):
            coerce(value, Literal[1, 2], "s.f")
    assert coerce(2, Literal[1, 2], "s.f") == 2

    @dataclass(frozen=True)
    class Inner:
        depth: int = 0

    @dataclass(frozen=True)
    class Outer:
        maybe: Inner | None = None

    with pytest.raises(ConfigError) as info:
        build(Outer, {"maybe": {"depth": "x"}}, "s")
    assert info.value.field == "s.maybe.depth"


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
        ((1, 2), tuple[int, ...], "must be a list, got tuple (1, 2)"),
        ("1,2", tuple[int, ...], "must be a list, got str '1,2'"),
        ([1], dict[str, int], "must be a table, got list [1]"),
        ("x", int | None, "must be an integer, got str 'x'"),  # one option left: its problem alone
        (1.5, int | str, "must be an integer, got float 1.5; must be a string, got float 1.5"),
        (None, int | str, "must be an integer, got NoneType None; must be a string, got NoneType None"),
    ],
)
def test_coerce_refuses_wrong_types_naming_the_field(value: object, annotation: Any, problem: str) -> None:
    error = _refused(value, annotation)
    assert error.field == "s.f"
    assert error.problem == problem
    assert str(error) == f"config field 's.f': {problem}"
    assert isinstance(error, UserInputError)


def test_coerce_names_the_bad_item_of_a_list_or_table() -> None:
    error = _refused([1, 2, "three"], tuple[int, ...])
    assert error.field == "s.f[2]" and error.problem == "must be an integer, got str 'three'"
    error = _refused({"ok": 0.5, "bad": "x"}, dict[str, float])
    assert error.field == "s.f.bad" and error.problem == "must be a number, got str 'x'"
    error = _refused([[1], [2, True]], tuple[tuple[int, ...], ...])
    assert error.field == "s.f[1][1]"


def test_coerce_cuts_long_values_in_the_message() -> None:
    error = _refused("x" * 500, int)
    assert error.problem == "must be an integer, got " + ("str '" + "x" * 500)[:80]


# --------------------------------------------------------------------------- #
# build: tables into dataclasses
# --------------------------------------------------------------------------- #


def test_build_converts_a_full_table() -> None:
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
        "anything": {"k": [1]},
    }

    built = build(Sample, table, "s")

    assert built == Sample(
        count=2, ratio=1.0, flag=True, name="n", where=Path("out/dir"), mode="slow", sizes=(4, 8),
        weights={"a": 1.0}, limit=9, either="e", child=Inner(3), maybe=Inner(4, "m"), anything={"k": [1]},
    )  # fmt: skip
    assert type(built.ratio) is float and isinstance(built.sizes, tuple)


def test_build_fills_defaults() -> None:
    built = build(Sample, {"count": 0}, "s")
    assert built == Sample(count=0)
    assert built.child == Inner(1) and built.maybe is None and built.where == Path("default")


def test_build_refuses_a_non_table() -> None:
    for value, kind in (([1, 2], "list"), (3, "int"), ("x", "str"), (None, "NoneType")):
        with pytest.raises(ConfigError) as info:
            build(Sample, value, "s")
        assert info.value.field == "s" and info.value.problem == f"must be a table, got {kind}"


def test_build_names_an_unknown_field_and_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        build(Sample, {"count": 1, "cuont": 2}, "s")
    assert info.value.field == "s.cuont"
    valid = sorted(f.name for f in dataclasses.fields(Sample) if f.init)
    assert info.value.problem == f"unknown field; valid fields are: {', '.join(valid)}"
    assert "derived" not in info.value.problem  # init=False fields cannot be set ...
    with pytest.raises(ConfigError) as info:
        build(Sample, {"count": 1, "derived": 5}, "s")
    assert info.value.field == "s.derived"  # ... and are refused like unknown ones


def test_build_names_the_first_missing_required_field() -> None:
    with pytest.raises(ConfigError) as info:
        build(TwoRequired, {"third": 1}, "two")
    assert (info.value.field, info.value.problem) == ("two.first", "is required")
    with pytest.raises(ConfigError) as info:
        build(TwoRequired, {"first": 1}, "two")
    assert info.value.field == "two.second"
    assert build(TwoRequired, {"first": 1, "second": "b"}, "two") == TwoRequired(1, "b")


def test_build_checks_types_before_required_fields() -> None:
    with pytest.raises(ConfigError) as info:
        build(TwoRequired, {"third": "3"}, "two")
    assert info.value.field == "two.third"


def test_nested_dataclasses_get_dotted_field_names() -> None:
    cases = [
        ({"count": 1, "child": {"depth": "deep"}}, "s.child.depth", "must be an integer, got str 'deep'"),
        ({"count": 1, "child": {"depth": 1, "colour": 2}}, "s.child.colour", "unknown field"),
        ({"count": 1, "child": {"label": "y"}}, "s.child.depth", "is required"),
        ({"count": 1, "child": 5}, "s.child", "must be a table, got int"),
        ({"count": 1, "sizes": [1, "2"]}, "s.sizes[1]", "must be an integer"),
        ({"count": 1, "weights": {"w": False}}, "s.weights.w", "must be a number"),
    ]
    for table, name, problem in cases:
        with pytest.raises(ConfigError) as info:
            build(Sample, table, "s")
        assert info.value.field == name
        assert info.value.problem.startswith(problem)


def test_a_tuple_of_dataclasses_names_the_entry() -> None:
    # The scenario's [[faults.crash]] array of tables.
    faults = build(Faults, {"crash": [{"node": 1, "round": 2}, {"node": 2, "round": 3}]}, "faults")
    assert [(c.node, c.round, c.restart_after_s) for c in faults.crash] == [(1, 2, 5.0), (2, 3, 5.0)]
    with pytest.raises(ConfigError) as info:
        build(Faults, {"crash": [{"node": 1, "round": 2}, {"node": 2, "round": "3"}]}, "faults")
    assert info.value.field == "faults.crash[1].round"
    with pytest.raises(ConfigError) as info:
        build(Faults, {"crash": [{"node": 1}]}, "faults")
    assert (info.value.field, info.value.problem) == ("faults.crash[0].round", "is required")


def test_post_init_errors_keep_their_field_or_get_the_section() -> None:
    assert build(Checked, {"low": 1, "high": 2}, "checked") == Checked(1, 2)
    with pytest.raises(ConfigError) as info:
        build(Checked, {"low": -1}, "section")
    assert (info.value.field, info.value.problem) == ("checked.low", "must be >= 0")  # passed through as is
    with pytest.raises(ConfigError) as info:
        build(Checked, {"low": 5, "high": 2}, "section")
    assert (info.value.field, info.value.problem) == ("section", "low (5) must be <= high (2)")
    with pytest.raises(ConfigError) as info:
        build(Checked, {"high": 101}, "section")
    assert (info.value.field, info.value.problem) == ("section", "high is absurd")


# --------------------------------------------------------------------------- #
# A real settings class
# --------------------------------------------------------------------------- #


def test_gossip_settings_from_a_table() -> None:
    gossip = build(
        GossipSettings, {"rounds": 4, "round_timeout_s": 5, "rule": "clip", "mix": False}, "gossip"
    )
    assert (gossip.rounds, gossip.round_timeout_s, gossip.rule, gossip.mix) == (4, 5.0, "clip", False)
    assert type(gossip.round_timeout_s) is float
    assert gossip.max_rounds_ahead == GossipSettings().max_rounds_ahead


@pytest.mark.parametrize(
    ("table", "name", "problem"),
    [
        ({"max_rounds_ahead": 0}, "gossip.max_rounds_ahead", "must be >= 1"),
        ({"max_rounds_ahead": 1.5}, "gossip.max_rounds_ahead", "must be an integer, got float 1.5"),
        ({"rounds": 0}, "gossip.rounds", "must be >= 1"),
        ({"rounds": True}, "gossip.rounds", "must be an integer, got bool True"),
        ({"mix": 1}, "gossip.mix", "must be true or false, got int 1"),
        ({"round_timeout_s": 0}, "gossip.round_timeout_s", "must be > 0 seconds"),
        ({"round_timeout_s": math.nan}, "gossip.round_timeout_s", "must be a finite number, got nan"),
        ({"round_timeout_s": math.inf}, "gossip.round_timeout_s", "must be a finite number, got inf"),
        ({"byzantine_weight": 1.0}, "gossip.byzantine_weight", "must be in [0, 1)"),
        ({"byzantine_weight": math.nan}, "gossip.byzantine_weight", "must be a finite number, got nan"),
        (
            {"rule": "avg"},
            "gossip.rule",
            "must be one of 'mean', 'trimmed-mean', 'median', 'clip', got 'avg'",
        ),
        ({"wire_dtype": "float16"}, "gossip.wire_dtype", "must be one of 'float32', 'bfloat16'"),
        ({"eval_every": 0}, "gossip.eval_every", "must be >= 1"),
        ({"snapshot_every": -1}, "gossip.snapshot_every", "must be >= 0"),
        ({"trim": -1}, "gossip.trim", "must be >= 0"),
    ],
)
def test_gossip_settings_errors_name_the_real_field(
    table: dict[str, object], name: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as info:
        build(GossipSettings, table, "gossip")
    assert info.value.field == name
    assert info.value.problem.startswith(problem)
    assert str(info.value).startswith(f"config field '{name}': {problem}")


def test_gossip_settings_unknown_field_lists_the_real_fields() -> None:
    with pytest.raises(ConfigError) as info:
        build(GossipSettings, {"max_round_ahead": 2}, "gossip")
    assert info.value.field == "gossip.max_round_ahead"
    listed = info.value.problem.removeprefix("unknown field; valid fields are: ").split(", ")
    assert listed == sorted(f.name for f in dataclasses.fields(GossipSettings))
    assert "max_rounds_ahead" in listed and "round_timeout_s" in listed


# --------------------------------------------------------------------------- #
# read_toml
# --------------------------------------------------------------------------- #


def test_read_toml_parses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text('name = "n"\n\n[gossip]\nrounds = 3\nround_timeout_s = 2.5\n\n[[peers]]\nid = "ab"\n')
    assert read_toml(path, "config") == {
        "name": "n",
        "gossip": {"rounds": 3, "round_timeout_s": 2.5},
        "peers": [{"id": "ab"}],
    }
    assert read_toml(tmp_path / "node.toml", "config")["gossip"]["rounds"] == 3


def test_read_toml_on_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        read_toml(path, "scenario")
    assert info.value.field == "scenario"
    assert info.value.problem == f"file {path} does not exist"


def test_read_toml_on_a_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        read_toml(tmp_path, "config")
    assert info.value.field == "config"
    assert info.value.problem.startswith(f"cannot read {tmp_path} (")


def test_read_toml_on_invalid_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[gossip]\nrounds = 3\nrule = "mean\n')
    with pytest.raises(ConfigError) as info:
        read_toml(path, "config")
    assert info.value.field == "config"
    assert info.value.problem.startswith(f"{path} is not valid TOML (")
    assert "line 3" in info.value.problem


def test_a_non_table_at_the_top_level_or_as_a_section_is_refused(tmp_path: Path) -> None:
    # A TOML document is always a table: a bare array is a syntax error ...
    top = tmp_path / "array.toml"
    top.write_text("[1, 2, 3]\n")
    with pytest.raises(ConfigError) as info:
        read_toml(top, "config")
    assert "is not valid TOML" in info.value.problem
    # ... and a section given as a value is refused by build, with the section's name.
    section = tmp_path / "section.toml"
    section.write_text("gossip = 3\n")
    doc = read_toml(section, "config")
    with pytest.raises(ConfigError) as info:
        build(GossipSettings, doc["gossip"], "gossip")
    assert (info.value.field, info.value.problem) == ("gossip", "must be a table, got int")


def test_read_toml_on_a_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b'a = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_toml(path, "config")
