"""Peer topologies: who gossips with whom, and how fast gossip averaging mixes.

A *spec* is a generated graph (``ring:8``, ``torus:4x4``, ``erdos:20:0.3:1``)
or a path to a GraphML, JSON or edge-list file (``topology/README.md``). Each
topology is checked once here so the simulator and CLI can trust it: nodes are
``0..N-1``, no self loops, and connected (gossip on a disconnected graph never
reaches consensus, so it is refused up front). ``lambda2`` of the
Metropolis-Hastings mixing matrix predicts how many rounds averaging needs.
"""

from __future__ import annotations

import io
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import networkx as nx
import numpy as np

from p2pfm.core.errors import TopologyError
from p2pfm.core.schedule import SCHEDULE_KINDS, RoundSchedule, parse_schedule

#: Larger graphs are refused: the dense N x N mixing matrix (8 * N**2 bytes,
#: 800 MB at this bound) and its O(N**3) eigen-decomposition stop being usable.
MAX_NODES = 10_000
#: Upper bound on the edges (for complete/erdos: node pairs visited) of a spec.
MAX_EDGES = 2_000_000
#: Seeds are passed to networkx's random generators; any non-negative int64.
MAX_SEED = 2**63 - 1
#: Kinds drawn on a circle; the others use a seeded spring layout.
CIRCULAR_KINDS = frozenset({"ring", "exp", "complete", "hypercube", "star"})
#: Below this lambda2 one gossip round already averages exactly.
EXACT_LAMBDA2 = 1e-12
_INT_RE = re.compile(r"-?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


@dataclass(frozen=True)
class Topology:
    """An undirected, loop-free graph on nodes ``0..N-1`` with human names.

    Constructing one directly validates those invariants (``TopologyError``
    otherwise) so that code indexing arrays by node id can rely on them.
    """

    graph: nx.Graph
    names: tuple[str, ...]
    spec: str
    # Time-varying topologies (one-peer-exp, matching): the partners of each
    # round; ``graph`` is then the union of every round's edges.
    schedule: RoundSchedule | None = None
    _index_by_name: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        graph = self.graph
        if not isinstance(graph, nx.Graph) or graph.is_directed() or graph.is_multigraph():
            raise TopologyError(f"{self.spec}: topology graph must be an undirected nx.Graph")
        if not self.names:
            raise TopologyError(f"{self.spec}: the topology has no nodes; it needs at least one")
        if set(graph.nodes) != set(range(len(self.names))):
            raise TopologyError(f"{self.spec}: nodes must be 0..{len(self.names) - 1}, one per name")
        if nx.number_of_selfloops(graph) > 0:
            raise TopologyError(f"{self.spec}: topology graph has self loops")
        index = {name: i for i, name in enumerate(self.names)}
        if len(index) != len(self.names):
            raise TopologyError(f"{self.spec}: node names must be unique")
        object.__setattr__(self, "_index_by_name", index)

    @property
    def n_nodes(self) -> int:
        return int(self.graph.number_of_nodes())

    @property
    def n_edges(self) -> int:
        return int(self.graph.number_of_edges())

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self.n_nodes:
            raise TopologyError(f"{self.spec}: node {node} does not exist (nodes are 0..{self.n_nodes - 1})")

    def neighbours(self, node: int) -> tuple[int, ...]:
        """Neighbours of ``node``, ascending (deterministic iteration); a schedule's: every round's."""
        self._check_node(node)
        return tuple(sorted(int(v) for v in self.graph.neighbors(node)))

    def partners(self, node: int, round_: int) -> tuple[int, ...]:
        """Whom ``node`` mixes with in round ``round_``: its neighbours, or the schedule's pick."""
        if self.schedule is None:
            return self.neighbours(node)
        self._check_node(node)
        return self.schedule.partners(node, round_)

    def degree(self, node: int) -> int:
        self._check_node(node)
        return int(self.graph.degree[node])

    def index_of(self, name: str) -> int:
        """Node id of the node labelled ``name`` (as written in the file)."""
        try:
            return self._index_by_name[name]
        except KeyError:
            raise TopologyError(f"{self.spec}: no node named {name!r}") from None


def _int_field(spec: str, name: str, text: str, minimum: int, maximum: int) -> int:
    """Parse a decimal integer field; the error names the field and bounds."""
    if not _INT_RE.fullmatch(text):
        raise TopologyError(f"{spec}: {name} must be an integer, got {text!r}")
    # Over 19 characters is out of any range here, and int() refuses very long strings.
    value = int(text) if len(text) <= 19 else (maximum + 1 if text[0] != "-" else minimum - 1)
    if value < minimum:
        raise TopologyError(f"{spec}: {name} must be >= {minimum}, got {text}")
    if value > maximum:
        raise TopologyError(f"{spec}: {name} must be <= {maximum}, got {text}")
    return value


def _probability_field(spec: str, name: str, text: str) -> float:
    if not _FLOAT_RE.fullmatch(text):
        raise TopologyError(f"{spec}: {name} must be a number in [0, 1], got {text!r}")
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise TopologyError(f"{spec}: {name} must be in [0, 1], got {text}")
    return value


def _check_edges(spec: str, edge_count: int) -> None:
    """Refuse specs whose graph would be too big to build and analyse."""
    if edge_count > MAX_EDGES:
        raise TopologyError(f"{spec}: too large ({edge_count} edges/pairs > {MAX_EDGES})")


def _graph(n_nodes: int, edges: Iterable[tuple[int, int]]) -> nx.Graph:
    """A graph with nodes inserted as 0..N-1 and edges in sorted order."""
    graph = nx.Graph()
    graph.add_nodes_from(range(n_nodes))
    graph.add_edges_from(sorted({(min(u, v), max(u, v)) for u, v in edges}))
    return graph


def _ring(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 3, MAX_NODES)
    return _graph(n, ((i, (i + 1) % n) for i in range(n)))


def _torus(spec: str, f: Sequence[str]) -> nx.Graph:
    parts = f[0].split("x")
    if len(parts) != 2:
        raise TopologyError(f"{spec}: expected torus:RxC, e.g. torus:4x4")
    rows = _int_field(spec, "R", parts[0], 3, MAX_NODES)
    cols = _int_field(spec, "C", parts[1], 3, MAX_NODES)
    n = rows * cols
    if n > MAX_NODES:
        raise TopologyError(f"{spec}: R*C must be <= {MAX_NODES}, got {n}")
    down = ((r * cols + c, (r + 1) % rows * cols + c) for r in range(rows) for c in range(cols))
    right = ((r * cols + c, r * cols + (c + 1) % cols) for r in range(rows) for c in range(cols))
    return _graph(n, (*down, *right))


def _complete(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 2, MAX_NODES)
    _check_edges(spec, n * (n - 1) // 2)
    return _graph(n, ((i, j) for i in range(n) for j in range(i + 1, n)))


def _star(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 2, MAX_NODES)
    return _graph(n, ((0, i) for i in range(1, n)))


def _exp(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 2, MAX_NODES)
    hops = [1 << k for k in range((n - 1).bit_length())]  # every 2**k < n
    _check_edges(spec, n * len(hops))
    return _graph(n, ((i, (i + s * h) % n) for i in range(n) for h in hops for s in (1, -1)))


def _hypercube(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 2, MAX_NODES)
    if n & (n - 1):
        raise TopologyError(f"{spec}: N must be a power of two (e.g. 8, 16), got {n}")
    return _graph(n, ((i, i ^ (1 << k)) for i in range(n) for k in range((n - 1).bit_length())))


def _random_regular(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 2, MAX_NODES)
    d = _int_field(spec, "D", f[1], 1, n - 1)
    seed = _int_field(spec, "SEED", f[2], 0, MAX_SEED)
    if (n * d) % 2:
        raise TopologyError(f"{spec}: N*D must be even, got {n}*{d}; change N or D")
    _check_edges(spec, n * d // 2)
    return _graph(n, nx.random_regular_graph(d, n, seed=seed).edges)


def _smallworld(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 3, MAX_NODES)
    k = _int_field(spec, "K", f[1], 2, n - 1)
    if k % 2:
        raise TopologyError(f"{spec}: K must be even, got {k}")
    p = _probability_field(spec, "P", f[2])
    seed = _int_field(spec, "SEED", f[3], 0, MAX_SEED)
    _check_edges(spec, n * k // 2)
    return _graph(n, nx.watts_strogatz_graph(n, k, p, seed=seed).edges)


def _erdos(spec: str, f: Sequence[str]) -> nx.Graph:
    n = _int_field(spec, "N", f[0], 1, MAX_NODES)
    p = _probability_field(spec, "P", f[1])
    seed = _int_field(spec, "SEED", f[2], 0, MAX_SEED)
    _check_edges(spec, n * (n - 1) // 2)
    return _graph(n, nx.gnp_random_graph(n, p, seed=seed).edges)


_Builder = Callable[[str, Sequence[str]], nx.Graph]
#: kind -> (usage, builder); the number of fields is read from the usage.
GENERATORS: dict[str, tuple[str, _Builder]] = {
    "ring": ("ring:N", _ring),
    "torus": ("torus:RxC", _torus),
    "complete": ("complete:N", _complete),
    "star": ("star:N", _star),
    "exp": ("exp:N", _exp),
    "hypercube": ("hypercube:N", _hypercube),
    "random-regular": ("random-regular:N:D:SEED", _random_regular),
    "smallworld": ("smallworld:N:K:P:SEED", _smallworld),
    "erdos": ("erdos:N:P:SEED", _erdos),
}
RANDOM_KINDS = frozenset({"random-regular", "smallworld", "erdos"})


def _generate(spec: str) -> Topology:
    kind, *fields = spec.split(":")
    usage, builder = GENERATORS[kind]
    expected = usage.count(":")
    if len(fields) != expected:
        raise TopologyError(
            f"{spec}: expected {usage} ({expected} field(s) after '{kind}:'), got {len(fields)}"
        )
    graph = builder(spec, fields)
    hint = "check the spec"
    if kind in RANDOM_KINDS:
        other = ":".join([kind, *fields[:-1], str(int(fields[-1]) + 1)])
        hint = f"try another SEED (e.g. {other}) or a denser setting"
    names = tuple(str(i) for i in range(graph.number_of_nodes()))
    _check_connected(spec, graph, names, hint)
    return Topology(nx.freeze(graph), names, spec)


_Edge = tuple[str, str, str]  # (u label, v label, where in the file)


def _label(source: str, value: object, where: str) -> str:
    """JSON node ids may be strings or numbers; names are always strings."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise TopologyError(f"{source}: {where}: node id must be a string or number, got {value!r}")


def _read_edgelist(source: str, text: str) -> tuple[list[str] | None, list[_Edge]]:
    edges: list[_Edge] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens:
            continue
        if len(tokens) < 2:
            raise TopologyError(
                f"{source}: line {lineno}: expected 'u v' (two node labels), got {raw.strip()!r}"
            )
        edges.append((tokens[0], tokens[1], f"line {lineno}"))
    return None, edges


def _json_edge(source: str, entry: object, where: str) -> _Edge:
    if isinstance(entry, dict) and "source" in entry and "target" in entry:
        ends = (entry["source"], entry["target"])
    elif isinstance(entry, list) and len(entry) >= 2:
        ends = (entry[0], entry[1])
    else:
        raise TopologyError(
            f"{source}: {where}: expected [u, v] or {{'source': u, 'target': v}}, got {entry!r}"
        )
    return _label(source, ends[0], where), _label(source, ends[1], where), where


def _read_json(source: str, text: str) -> tuple[list[str] | None, list[_Edge]]:
    """Read ``{"nodes": [...], "edges": [[u, v], ...]}`` or node-link JSON."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopologyError(f"{source}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    key = "links" if isinstance(data, dict) and "links" in data else "edges"
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise TopologyError(f"{source}: expected a JSON object with an 'edges' (or 'links') list")
    edges = [_json_edge(source, e, f"edge #{i}") for i, e in enumerate(data[key])]
    if "nodes" not in data:
        return None, edges
    if not isinstance(data["nodes"], list):
        raise TopologyError(f"{source}: 'nodes' must be a list")
    ids = [e.get("id") if isinstance(e, dict) else e for e in data["nodes"]]
    return [_label(source, value, f"node #{i}") for i, value in enumerate(ids)], edges


def _read_graphml(source: str, data: bytes) -> tuple[list[str] | None, list[_Edge]]:
    try:
        graph = nx.read_graphml(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 -- xml/networkx raise many types, all mean "bad file"
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TopologyError(f"{source}: not valid GraphML ({detail})") from None
    nodes = [str(v) for v in graph.nodes]
    return nodes, [(str(u), str(v), f"edge {u}-{v}") for u, v in graph.edges()]


def _natural_order(labels: Iterable[str]) -> list[str]:
    """Numeric order when every label is an integer, so "10" follows "9"."""
    unique = set(labels)
    if all(_INT_RE.fullmatch(s) and len(s) <= 18 for s in unique):
        return sorted(unique, key=lambda s: (int(s), s))
    return sorted(unique)


def _load_file(spec: str) -> Topology:
    """Load a file, relabel its sorted labels 0..N-1, and check it like a generated graph."""
    path = pathlib.Path(spec)
    try:
        if path.suffix.lower() == ".graphml":
            nodes, edges = _read_graphml(spec, path.read_bytes())
        else:
            reader = _read_json if path.suffix.lower() == ".json" else _read_edgelist
            nodes, edges = reader(spec, path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise TopologyError(f"topology file {spec}: not UTF-8 text") from None
    except OSError as exc:
        raise TopologyError(f"topology file {spec}: cannot read it ({exc.strerror})") from None
    known = None if nodes is None else set(nodes)
    for u, v, where in edges:
        if u == v:
            raise TopologyError(f"{spec}: {where}: node {u} links to itself; remove that edge")
        if known is not None and not {u, v} <= known:
            missing = u if u not in known else v
            raise TopologyError(f"{spec}: {where}: node {missing!r} is not in the node list")
    names = _natural_order(list(nodes or []) + [x for u, v, _ in edges for x in (u, v)])
    if not names:
        raise TopologyError(f"{spec}: the file has no nodes; add at least one edge")
    if len(names) > MAX_NODES:
        raise TopologyError(f"{spec}: {len(names)} nodes, more than the {MAX_NODES} supported")
    index = {name: i for i, name in enumerate(names)}
    graph = _graph(len(names), ((index[u], index[v]) for u, v, _ in edges))
    _check_connected(spec, graph, names, "add edges that join the components")
    return Topology(nx.freeze(graph), tuple(names), spec)


def _check_connected(spec: str, graph: nx.Graph, names: Sequence[str], hint: str) -> None:
    """Refuse disconnected graphs: gossip averaging can never reach consensus."""
    components = sorted(nx.connected_components(graph), key=lambda c: (-len(c), min(c)))
    if len(components) == 1:
        return
    sizes = ", ".join(str(len(c)) for c in components[:5]) + (", ..." if len(components) > 5 else "")
    examples = ", ".join(repr(names[min(c)]) for c in components[:3])
    raise TopologyError(
        f"{spec}: graph is disconnected: {len(components)} components of sizes {sizes} "
        f"(containing e.g. nodes {examples}); {hint}"
    )


def parse_topology(spec: str) -> Topology:
    """Build a topology from a generator spec (``ring:8``) or a file path.

    Files (``.graphml``, ``.json``, else an edge list) give string labels, kept
    in ``names`` in natural order. Directed files are made undirected (``u -> v``
    links u and v both ways) and repeated edges collapse, because gossip mixing
    needs symmetric links. Generator kinds win over paths: load a file named
    ``ring`` as ``./ring``. Every problem raises a one-line ``TopologyError``.
    """
    kind = spec.split(":", 1)[0]
    if kind in GENERATORS:
        return _generate(spec)
    if kind in SCHEDULE_KINDS:
        schedule = parse_schedule(spec, MAX_NODES)
        _check_edges(spec, schedule.n * len(schedule.links(0)) // 2)
        edges = [(i, j) for i in range(schedule.n) for j in schedule.links(i) if i < j]
        names = tuple(str(i) for i in range(schedule.n))
        return Topology(nx.freeze(_graph(schedule.n, edges)), names, spec, schedule)
    if not spec.strip():
        raise TopologyError("the topology spec is empty; give e.g. ring:8 or a file path")
    path = pathlib.Path(spec)
    if path.is_file():
        return _load_file(spec)
    valid = ", ".join([*(usage for usage, _ in GENERATORS.values()), "one-peer-exp:N", "matching:N[:SEED]"])
    if path.exists():
        raise TopologyError(f"topology file {spec}: is not a regular file")
    if re.fullmatch(r"[A-Za-z][\w-]*:[^/\\]*", spec):  # looks like a spec, not a path
        raise TopologyError(f"{spec}: unknown topology kind {kind!r}; valid kinds: {valid}")
    raise TopologyError(
        f"topology file {spec}: does not exist; give an existing .graphml/.json/edge-list "
        f"file or a generated spec ({valid})"
    )


def metropolis_weight(degree_i: int, degree_j: int) -> float:
    """Metropolis-Hastings weight: symmetric, and keeps every row stochastic."""
    if degree_i < 0 or degree_j < 0:
        raise ValueError(f"degrees must be >= 0, got {degree_i} and {degree_j}")
    return 1.0 / (1 + max(degree_i, degree_j))


def mixing_matrix(topology: Topology) -> np.ndarray:
    """Dense N x N doubly stochastic gossip matrix (Metropolis-Hastings weights)."""
    n = topology.n_nodes
    degrees = [topology.degree(i) for i in range(n)]
    weights = np.zeros((n, n), dtype=np.float64)
    for u, v in topology.graph.edges:
        weights[u, v] = weights[v, u] = metropolis_weight(degrees[u], degrees[v])
    np.fill_diagonal(weights, 1.0 - weights.sum(axis=1))
    return weights


@dataclass(frozen=True)
class SpectralStats:
    """How fast gossip averaging converges on a topology."""

    nodes: int
    edges: int
    min_degree: int
    max_degree: int
    lambda2: float
    spectral_gap: float
    rounds_to_1e_3: int

    def as_json(self) -> dict[str, int | float]:
        """Field values, with the key ``rounds_to_1e-3`` that reports print."""
        fields = asdict(self)
        fields["rounds_to_1e-3"] = fields.pop("rounds_to_1e_3")
        return fields


def rounds_to_shrink(lambda2: float, factor: float = 1000.0) -> int:
    """Rounds t after which disagreement has shrunk by ``factor``: lambda2**t <= 1/factor."""
    if not 0.0 <= lambda2 < 1.0:
        raise ValueError(f"lambda2 must be in [0, 1) for averaging to converge, got {lambda2}")
    if lambda2 < EXACT_LAMBDA2:
        return 1
    return max(1, math.ceil(math.log(factor) / -math.log(lambda2)))


def spectral_stats(topology: Topology) -> SpectralStats:
    """Degree range and second-largest absolute eigenvalue of the mixing matrix."""
    eigenvalues = np.linalg.eigvalsh(mixing_matrix(topology))
    magnitudes = np.sort(np.abs(eigenvalues))[::-1]
    lambda2 = float(magnitudes[1]) if len(magnitudes) > 1 else 0.0
    if lambda2 >= 1.0 - EXACT_LAMBDA2:  # only a hand-built, disconnected Topology gets here
        raise TopologyError(f"{topology.spec}: lambda2 is 1, the graph is disconnected")
    degrees = [topology.degree(i) for i in range(topology.n_nodes)]
    return SpectralStats(
        nodes=topology.n_nodes,
        edges=topology.n_edges,
        min_degree=min(degrees),
        max_degree=max(degrees),
        lambda2=lambda2,
        spectral_gap=1.0 - lambda2,
        rounds_to_1e_3=rounds_to_shrink(lambda2),
    )
