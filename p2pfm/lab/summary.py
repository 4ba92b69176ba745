"""Typed results of a scenario run (``Summary``, ``NodeSummary``) and their file, summary.json.

The report builds a :class:`Summary` from the node folders
(p2pfm/lab/report.py) and renders report.md and the plots from it alone;
summary.json is its :meth:`Summary.to_json`. Readers (the CLI, benchmarks,
scripts) get it back with :func:`read_summary`, which checks every key and
type: a truncated, hand-edited or foreign file raises :class:`SummaryError`
naming the key, never a ``KeyError`` deep in a caller.

Keys that are functions of others (``metric``, ``mean_final_<metric>``,
``attackers``, ``baselines.local``) are written for readers of the JSON
and recomputed on reading, so a ``Summary`` cannot disagree with itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from p2pfm.core.errors import ConfigError, SummaryError

SUMMARY_FORMAT = "p2pfm-summary-v1"
Metric = Literal["accuracy", "perplexity"]
#: What a node's evaluation reports for each task (p2pfm/learn/train.py): runs are compared by it.
_METRIC_OF_TASK: Mapping[str, Metric] = {"classification": "accuracy", "causal-lm": "perplexity"}
#: (round, the metric after that round) for every evaluated round.
Curve = tuple[tuple[int, float | None], ...]
_T = TypeVar("_T")


def metric_for_task(task: str) -> Metric:
    """The metric runs of ``task`` are measured by; ConfigError (field ``model.task``) if unknown."""
    if task not in _METRIC_OF_TASK:
        raise ConfigError("model.task", f"unknown task {task!r}; choose one of: {', '.join(_METRIC_OF_TASK)}")
    return _METRIC_OF_TASK[task]


def _mean(values: tuple[float | None, ...]) -> float | None:
    """Mean of the values there are (a node that never evaluated has none); None if there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


@dataclass(frozen=True)
class NodeSummary:
    """One node's run, from its metrics.jsonl (docs/node.md describes the counters)."""

    name: str
    peer_id: str | None  # hex; None if the node never wrote a record ("id" in summary.json)
    final: float | None  # the metric at its last evaluated round ("final_<metric>")
    curve: Curve = ()
    rounds_completed: int = 0  # the last round reached
    rounds_trained: int = 0  # rounds really run: rounds skipped by a catch-up are not training
    timed_out_rounds: int = 0
    restarts: int = 0  # restarts with --resume
    caught_up: int = 0  # times it skipped to the round a majority of its neighbours had reached
    finished: bool = False  # wrote a done record without being stopped
    attack: str = ""  # the attack it ran (p2pfm/node/attacks.py); empty for an honest node
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)  # refused messages, by reason
    dropped: Mapping[str, int] = field(default_factory=dict)  # lost outgoing messages, by reason
    banned: tuple[str, ...] = ()  # peers it holds a proof of equivocation against
    refused_connections: int = 0
    internal_errors: int = 0
    io_errors: Mapping[str, int] = field(default_factory=dict)  # its own failed writes, by what
    # (round, the LoRA aggregation error of its mix: p2pfm/learn/aggregation.py) for every mixed round
    aggregation_error: Curve = ()
    # (round, bytes it had sent when it recorded that round): the x axis of metric against bytes
    bytes_curve: Curve = ()

    @property
    def is_attacker(self) -> bool:
        return bool(self.attack)

    def to_json(self, metric: Metric) -> dict[str, object]:
        return {
            "id": self.peer_id,
            "name": self.name,
            f"final_{metric}": self.final,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "rejected": dict(self.rejected),
            "dropped": dict(self.dropped),
            "restarts": self.restarts,
            "caught_up": self.caught_up,
            "rounds_completed": self.rounds_completed,
            "rounds_trained": self.rounds_trained,
            "banned": list(self.banned),
            "timed_out_rounds": self.timed_out_rounds,
            "finished": self.finished,
            "attack": self.attack,
            "refused_connections": self.refused_connections,
            "internal_errors": self.internal_errors,
            "io_errors": dict(self.io_errors),
            "curve": [[round_, value] for round_, value in self.curve],
            "aggregation_error": [[round_, value] for round_, value in self.aggregation_error],
            "bytes_curve": [[round_, value] for round_, value in self.bytes_curve],
        }

    @classmethod
    def _read(cls, doc: _Reader, metric: Metric) -> NodeSummary:
        counts = _map_of(_integer)
        return cls(
            name=doc.get("name", _string),
            peer_id=doc.get("id", _optional(_string)),
            final=doc.get(f"final_{metric}", _optional(_number)),
            curve=doc.get("curve", _curve),
            rounds_completed=doc.get("rounds_completed", _integer),
            rounds_trained=doc.get("rounds_trained", _integer),
            timed_out_rounds=doc.get("timed_out_rounds", _integer),
            restarts=doc.get("restarts", _integer),
            caught_up=doc.get("caught_up", _integer),
            finished=doc.get("finished", _boolean),
            attack=doc.get("attack", _string),
            bytes_sent=doc.get("bytes_sent", _integer),
            bytes_received=doc.get("bytes_received", _integer),
            messages_sent=doc.get("messages_sent", _integer),
            messages_received=doc.get("messages_received", _integer),
            rejected=doc.get("rejected", counts),
            dropped=doc.get("dropped", counts),
            banned=doc.get("banned", _tuple_of(_string)),
            refused_connections=doc.get("refused_connections", _integer),
            internal_errors=doc.get("internal_errors", _integer),
            io_errors=doc.get("io_errors", counts),
            aggregation_error=doc.get("aggregation_error", _curve) if doc.has("aggregation_error") else (),
            bytes_curve=doc.get("bytes_curve", _curve) if doc.has("bytes_curve") else (),
        )


@dataclass(frozen=True)
class ConsensusPoint:
    """Consensus distance over the honest nodes' mixed adapters after one round."""

    round: int
    consensus_distance: float
    nodes: int  # nodes that had a snapshot of that round

    def to_json(self) -> dict[str, object]:
        return {"round": self.round, "consensus_distance": self.consensus_distance, "nodes": self.nodes}

    @classmethod
    def _read(cls, doc: _Reader) -> ConsensusPoint:
        return cls(
            doc.get("round", _integer), doc.get("consensus_distance", _number), doc.get("nodes", _integer)
        )


@dataclass(frozen=True)
class MembershipPoint:
    """An open network after one round: who recorded it and how they were linked (docs/membership.md)."""

    round: int
    members: int  # nodes that recorded the round
    components: int  # connected components of their active views (links to members only)
    min_degree: int  # fewest live neighbours of a member
    mean_degree: float

    def to_json(self) -> dict[str, object]:
        return {
            "round": self.round, "members": self.members, "components": self.components,
            "min_degree": self.min_degree, "mean_degree": self.mean_degree,
        }  # fmt: skip

    @classmethod
    def _read(cls, doc: _Reader) -> MembershipPoint:
        return cls(
            doc.get("round", _integer), doc.get("members", _integer), doc.get("components", _integer),
            doc.get("min_degree", _integer), doc.get("mean_degree", _number),
        )  # fmt: skip


@dataclass(frozen=True)
class Baselines:
    """Final metrics of the baseline runs (docs/scenarios.md); None where there is none."""

    local_per_node: Mapping[str, float | None] | None = None  # node name -> its local-only final
    pooled: float | None = None  # one model trained on all shards

    @property
    def local(self) -> float | None:
        """Mean local-only final over every shard (an attacker's shard too: its data is honest)."""
        return None if self.local_per_node is None else _mean(tuple(self.local_per_node.values()))

    def to_json(self) -> dict[str, object]:
        """Keys only for the baselines there are: ``local`` (with ``local_per_node``), ``pooled``."""
        doc: dict[str, object] = {}
        if self.local_per_node is not None:
            doc.update(local=self.local, local_per_node=dict(self.local_per_node))
        if self.pooled is not None:
            doc["pooled"] = self.pooled
        return doc

    @classmethod
    def _read(cls, doc: _Reader) -> Baselines:
        local = doc.get("local_per_node", _map_of(_optional(_number))) if doc.has("local_per_node") else None
        return cls(local, doc.get("pooled", _optional(_number)) if doc.has("pooled") else None)


@dataclass(frozen=True)
class Summary:
    """A scenario run: what ran, whether it ended cleanly, every node's results."""

    scenario: str  # the scenario's name
    topology: str  # its topology spec
    model: str  # model.path
    task: str  # model.task, which decides the metric
    ok: bool  # every process ended cleanly in time
    wall_s: float  # wall time of the gossip run (the baselines run after it)
    nodes: tuple[NodeSummary, ...]
    consensus: tuple[ConsensusPoint, ...] = ()  # "consensus_distance" in summary.json
    baselines: Baselines | None = None  # None: the scenario asked for none
    faults: tuple[str, ...] = ()  # the faults injected, one sentence each
    membership: tuple[MembershipPoint, ...] = ()  # an open network's, per round; () otherwise
    # The learning algorithm and its settings (gossip.algorithm, ...; docs/training.md)
    algorithm: Mapping[str, str | float | bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        metric_for_task(self.task)  # a Summary always has a metric

    @property
    def metric(self) -> Metric:
        return metric_for_task(self.task)

    @property
    def honest(self) -> tuple[NodeSummary, ...]:
        return tuple(n for n in self.nodes if not n.is_attacker)

    @property
    def attackers(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes if n.is_attacker)

    @property
    def mean_final(self) -> float | None:
        """Mean final metric of the honest nodes: the attackers' own models are not what is measured."""
        return _mean(tuple(n.final for n in self.honest))

    def to_json(self) -> dict[str, object]:
        """summary.json's document (docs/scenarios.md lists its keys)."""
        metric = self.metric
        doc: dict[str, object] = {
            "format": SUMMARY_FORMAT,
            "scenario": self.scenario,
            "topology": self.topology,
            "model": self.model,
            "task": self.task,
            "ok": self.ok,
            "metric": metric,
            f"mean_final_{metric}": self.mean_final,
            "attackers": list(self.attackers),
            "nodes": [n.to_json(metric) for n in self.nodes],
            "consensus_distance": [c.to_json() for c in self.consensus],
            "wall_s": self.wall_s,
            "faults": list(self.faults),
        }
        if self.baselines is not None:
            doc["baselines"] = self.baselines.to_json()
        if self.membership:
            doc["membership"] = [m.to_json() for m in self.membership]
        if self.algorithm:
            doc["algorithm"] = dict(self.algorithm)
        return doc

    @classmethod
    def from_json(cls, doc: object, source: object = "summary.json") -> Summary:
        """The Summary in ``doc`` (parsed summary.json); SummaryError naming the first bad key.

        ``source`` (the file, say) only goes into error messages.
        """
        top = _Reader(doc, "", source)
        if not top.has("format"):
            raise top.error(
                "format", f"is missing (a file of an older p2pfm? this one reads {SUMMARY_FORMAT})"
            )
        if (found := top.get("format", _string)) != SUMMARY_FORMAT:
            raise top.error("format", f"is {found!r}; this p2pfm reads {SUMMARY_FORMAT!r}")
        task = top.get("task", _string)
        if task not in _METRIC_OF_TASK:
            raise top.error("task", f"is {task!r}, not one of: {', '.join(_METRIC_OF_TASK)}")
        metric = _METRIC_OF_TASK[task]
        if top.get("metric", _string) != metric:
            raise top.error("metric", f"must be {metric!r} for task {task!r}")
        return cls(
            scenario=top.get("scenario", _string),
            topology=top.get("topology", _string),
            model=top.get("model", _string),
            task=task,
            ok=top.get("ok", _boolean),
            wall_s=top.get("wall_s", _number),
            nodes=tuple(NodeSummary._read(node, metric) for node in top.objects("nodes")),
            consensus=tuple(ConsensusPoint._read(point) for point in top.objects("consensus_distance")),
            baselines=Baselines._read(top.object("baselines")) if top.has("baselines") else None,
            faults=top.get("faults", _tuple_of(_string)),
            membership=tuple(MembershipPoint._read(m) for m in top.objects("membership"))
            if top.has("membership")
            else (),
            algorithm=top.get("algorithm", _map_of(_setting)) if top.has("algorithm") else {},
        )


def write_summary(path: Path, summary: Summary) -> None:
    path.write_text(json.dumps(summary.to_json(), indent=2) + "\n", encoding="utf-8")


def read_summary(path: Path) -> Summary:
    """The Summary in ``path`` (a run's summary.json); SummaryError if missing, not JSON or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SummaryError(path, "does not exist (`p2pfm run` writes it at the end of a run)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SummaryError(path, f"cannot be read ({exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SummaryError(path, f"is not JSON (line {exc.lineno}: {exc.msg})") from None
    return Summary.from_json(doc, path)


# --------------------------------------------------------------------------- #
# Reading: converters raise _Wrong; the reader adds which key it was
# --------------------------------------------------------------------------- #


class _Wrong(Exception):
    """A value of the wrong type; ``at`` locates it inside the value (``[2]``, ``.replay``)."""

    def __init__(self, problem: str, at: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.at = at


class _Reader:
    """Typed access to one JSON object of a summary, ``where`` (e.g. ``nodes[2]``) inside ``source``."""

    def __init__(self, doc: object, where: str, source: object) -> None:
        if not isinstance(doc, dict):
            raise SummaryError(source, f"must be an object, not {_kind(doc)}", where or None)
        self._doc: dict[str, object] = doc
        self._where = where
        self._source = source

    def has(self, key: str) -> bool:
        return key in self._doc

    def get(self, key: str, convert: Callable[[object], _T]) -> _T:
        if key not in self._doc:
            raise self.error(key, "is missing")
        try:
            return convert(self._doc[key])
        except _Wrong as wrong:
            raise self.error(key + wrong.at, wrong.problem) from None

    def object(self, key: str) -> _Reader:
        return _Reader(self.get(key, _object), self._path(key), self._source)

    def objects(self, key: str) -> list[_Reader]:
        items = self.get(key, _tuple_of(_object))
        return [_Reader(item, f"{self._path(key)}[{i}]", self._source) for i, item in enumerate(items)]

    def error(self, key: str, problem: str) -> SummaryError:
        return SummaryError(self._source, problem, self._path(key))

    def _path(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _kind(value: object) -> str:
    """How an error names a JSON value's type."""
    return "null" if value is None else _KINDS.get(type(value), "an object")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Wrong(f"must be a string, not {_kind(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Wrong(f"must be true or false, not {_kind(value)}")
    return value


def _integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Wrong(f"must be an integer, not {_kind(value)}")
    return value


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Wrong(f"must be a number, not {_kind(value)}")
    return float(value)


def _setting(value: object) -> str | float | bool:
    if isinstance(value, (str, bool)):
        return value
    return _number(value)


def _object(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Wrong(f"must be an object, not {_kind(value)}")
    return value


def _optional(convert: Callable[[object], _T]) -> Callable[[object], _T | None]:
    return lambda value: None if value is None else convert(value)


def _tuple_of(convert: Callable[[object], _T]) -> Callable[[object], tuple[_T, ...]]:
    def read(value: object) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise _Wrong(f"must be a list, not {_kind(value)}")
        return tuple(_at(f"[{i}]", convert, item) for i, item in enumerate(value))

    return read


def _map_of(convert: Callable[[object], _T]) -> Callable[[object], dict[str, _T]]:
    return lambda value: {key: _at(f".{key}", convert, item) for key, item in _object(value).items()}


def _at(at: str, convert: Callable[[object], _T], value: object) -> _T:
    try:
        return convert(value)
    except _Wrong as wrong:
        raise _Wrong(wrong.problem, at + wrong.at) from None


def _curve(value: object) -> Curve:
    def point(item: object) -> tuple[int, float | None]:
        if not isinstance(item, list) or len(item) != 2:
            raise _Wrong("must be a [round, value] pair")
        return _at("[0]", _integer, item[0]), _at("[1]", _optional(_number), item[1])

    return _tuple_of(point)(value)
