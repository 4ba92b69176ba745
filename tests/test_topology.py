"""Tests of p2pfm.core.topology: generators, files, errors and the mixing spectrum."""

from __future__ import annotations

import json
import math
import pathlib

import networkx as nx
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from p2pfm.core.errors import TopologyError, UserInputError
from p2pfm.core.topology import (
    SpectralStats,
    Topology,
    metropolis_weight,
    mixing_matrix,
    parse_topology,
    rounds_to_shrink,
    spectral_stats,
)
from p2pfm.lab.plots import draw_png

READY_FILES = pathlib.Path(__file__).resolve().parent.parent / "topology"


def edge_set(topology: Topology) -> set[tuple[int, int]]:
    return {(min(u, v), max(u, v)) for u, v in topology.graph.edges}


def degrees(topology: Topology) -> list[int]:
    return [topology.degree(i) for i in range(topology.n_nodes)]


def write(tmp_path: pathlib.Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(spec: str) -> str:
    with pytest.raises(TopologyError) as info:
        parse_topology(spec)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------- generators


@pytest.mark.parametrize(
    ("spec", "nodes", "edges", "degree_set"),
    [
        ("ring:8", 8, 8, {2}),
        ("ring:3", 3, 3, {2}),
        ("torus:4x4", 16, 32, {4}),
        ("torus:3x5", 15, 30, {4}),
        ("complete:5", 5, 10, {4}),
        ("complete:2", 2, 1, {1}),
        ("exp:16", 16, 56, {7}),
        ("exp:2", 2, 1, {1}),
        ("hypercube:8", 8, 12, {3}),
        ("hypercube:2", 2, 1, {1}),
        ("random-regular:10:3:1", 10, 15, {3}),
        ("smallworld:20:4:0:1", 20, 40, {4}),
    ],
)
def test_generated_counts_and_degrees(spec: str, nodes: int, edges: int, degree_set: set[int]) -> None:
    topology = parse_topology(spec)
    assert (topology.n_nodes, topology.n_edges) == (nodes, edges)
    assert set(degrees(topology)) == degree_set
    assert topology.names == tuple(str(i) for i in range(nodes))
    assert topology.spec == spec
    assert nx.number_of_selfloops(topology.graph) == 0


def test_star_hub_is_node_zero() -> None:
    star = parse_topology("star:5")
    assert (star.n_nodes, star.n_edges) == (5, 4)
    assert star.degree(0) == 4
    assert star.neighbours(0) == (1, 2, 3, 4)
    assert all(star.neighbours(i) == (0,) for i in range(1, 5))


def test_torus_node_id_is_row_times_cols_plus_col() -> None:
    torus = parse_topology("torus:3x4")  # 3 rows, 4 columns
    assert torus.neighbours(0) == (1, 3, 4, 8)  # right, left (wrap), down, up (wrap)
    assert torus.neighbours(5) == (1, 4, 6, 9)


def test_exp_and_hypercube_neighbours() -> None:
    assert parse_topology("exp:8").neighbours(0) == (1, 2, 4, 6, 7)
    assert parse_topology("hypercube:8").neighbours(5) == (1, 4, 7)


def test_ring_neighbours_are_sorted() -> None:
    assert parse_topology("ring:8").neighbours(0) == (1, 7)


@pytest.mark.parametrize("spec", ["random-regular:12:3:4", "smallworld:20:4:0.3:7", "erdos:30:0.3:2"])
def test_seeded_graphs_are_deterministic(spec: str) -> None:
    assert edge_set(parse_topology(spec)) == edge_set(parse_topology(spec))
    other_seed = spec.rsplit(":", 1)[0] + ":99"
    assert edge_set(parse_topology(spec)) != edge_set(parse_topology(other_seed))


def test_graph_is_frozen_and_bad_node_access_is_refused() -> None:
    ring = parse_topology("ring:4")
    with pytest.raises(nx.NetworkXError):
        ring.graph.add_edge(0, 2)
    with pytest.raises(TopologyError, match="node 4 does not exist"):
        ring.neighbours(4)
    with pytest.raises(TopologyError, match="no node named 'x'"):
        ring.index_of("x")


def test_topology_constructor_checks_invariants() -> None:
    with pytest.raises(TopologyError, match=r"nodes must be 0\.\.1"):
        Topology(nx.Graph([("a", "b")]), ("a", "b"), "hand")
    with pytest.raises(TopologyError, match="undirected"):
        Topology(nx.DiGraph([(0, 1)]), ("a", "b"), "hand")
    with pytest.raises(TopologyError, match="self loops"):
        Topology(nx.Graph([(0, 1), (1, 1)]), ("a", "b"), "hand")
    with pytest.raises(TopologyError, match="unique"):
        Topology(nx.Graph([(0, 1)]), ("a", "a"), "hand")


# --------------------------------------------------------------- mixing matrix


def test_metropolis_weight() -> None:
    assert metropolis_weight(2, 3) == 0.25
    assert metropolis_weight(5, 1) == pytest.approx(1 / 6)
    assert metropolis_weight(0, 0) == 1.0
    with pytest.raises(ValueError, match=">= 0"):
        metropolis_weight(-1, 2)


def check_mixing_matrix(topology: Topology) -> None:
    weights = mixing_matrix(topology)
    n = topology.n_nodes
    assert weights.shape == (n, n)
    assert weights.dtype == np.float64
    np.testing.assert_allclose(weights, weights.T, atol=0)
    np.testing.assert_allclose(weights.sum(axis=1), np.ones(n), atol=1e-12)
    assert (weights >= 0).all()
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            expected = metropolis_weight(topology.degree(i), topology.degree(j))
            assert weights[i, j] == (expected if topology.graph.has_edge(i, j) else 0.0)


random_specs = st.one_of(
    st.integers(3, 30).map(lambda n: f"ring:{n}"),
    st.tuples(st.integers(3, 7), st.integers(3, 7)).map(lambda rc: f"torus:{rc[0]}x{rc[1]}"),
    st.tuples(st.integers(4, 24), st.integers(2, 5), st.integers(0, 1000))
    .filter(lambda t: t[0] * t[1] % 2 == 0 and t[1] < t[0])
    .map(lambda t: f"random-regular:{t[0]}:{t[1]}:{t[2]}"),
    st.tuples(st.integers(1, 25), st.floats(0.2, 1.0), st.integers(0, 1000)).map(
        lambda t: f"erdos:{t[0]}:{t[1]:.3f}:{t[2]}"
    ),
    st.sampled_from(["star:7", "exp:13", "hypercube:16", "complete:6", "smallworld:15:4:0.5:3"]),
)


@settings(max_examples=60, deadline=None)
@given(random_specs)
def test_mixing_matrix_is_symmetric_stochastic(spec: str) -> None:
    try:
        topology = parse_topology(spec)
    except TopologyError as exc:  # a sparse random draw may be disconnected
        assert "disconnected" in str(exc)
        assume(False)
        return
    check_mixing_matrix(topology)
    stats = spectral_stats(topology)
    assert 0.0 <= stats.lambda2 < 1.0
    assert stats.rounds_to_1e_3 >= 1


def test_mixing_matrix_of_star() -> None:
    weights = mixing_matrix(parse_topology("star:5"))
    assert weights[0, 1] == pytest.approx(0.2)
    assert weights[0, 0] == pytest.approx(0.2)
    assert weights[1, 1] == pytest.approx(0.8)
    assert weights[1, 2] == 0.0


# ------------------------------------------------------------------ spectrum


@pytest.mark.parametrize("n", [5, 8, 16, 31])
def test_ring_lambda2_matches_closed_form(n: int) -> None:
    # W = (I + A) / 3; eigenvalues (1 + 2 cos(2 pi k / n)) / 3, largest |.| for k = 1.
    stats = spectral_stats(parse_topology(f"ring:{n}"))
    expected = 1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)
    assert stats.lambda2 == pytest.approx(expected, abs=1e-12)
    assert stats.spectral_gap == pytest.approx(1 - expected, abs=1e-12)
    assert stats.rounds_to_1e_3 == math.ceil(math.log(1000) / -math.log(expected))


def test_ring16_rounds() -> None:
    stats = spectral_stats(parse_topology("ring:16"))
    assert stats.lambda2 == pytest.approx(0.949253021674191, abs=1e-12)
    assert stats.rounds_to_1e_3 == 133


def test_torus_4x4_lambda2() -> None:
    # W = (I + A) / 5; A's second eigenvalue on the 4x4 torus is 2, so (1 + 2) / 5.
    stats = spectral_stats(parse_topology("torus:4x4"))
    assert stats.lambda2 == pytest.approx(0.6, abs=1e-12)
    assert stats.rounds_to_1e_3 == 14  # ceil(ln 1000 / ln(5/3)) = ceil(13.52)


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_complete_graph_averages_in_one_round(n: int) -> None:
    stats = spectral_stats(parse_topology(f"complete:{n}"))
    assert stats.lambda2 == pytest.approx(0.0, abs=1e-12)
    assert stats.rounds_to_1e_3 == 1
    assert stats.edges == n * (n - 1) // 2
    assert (stats.min_degree, stats.max_degree) == (n - 1, n - 1)


def test_single_node_graph() -> None:
    stats = spectral_stats(parse_topology("erdos:1:0.5:0"))
    assert (stats.nodes, stats.edges, stats.min_degree, stats.max_degree) == (1, 0, 0, 0)
    assert (stats.lambda2, stats.spectral_gap, stats.rounds_to_1e_3) == (0.0, 1.0, 1)


def test_rounds_formula() -> None:
    assert rounds_to_shrink(0.5) == 10  # 2**-10 < 1e-3 < 2**-9
    assert rounds_to_shrink(0.9) == 66  # ln 1000 / -ln 0.9 = 65.56
    assert rounds_to_shrink(1e-13) == 1
    assert rounds_to_shrink(0.5, factor=4.0) == 2
    with pytest.raises(ValueError, match="lambda2"):
        rounds_to_shrink(1.0)


def test_star_stats_degree_range() -> None:
    stats = spectral_stats(parse_topology("star:5"))
    assert (stats.min_degree, stats.max_degree) == (1, 4)
    assert stats.lambda2 == pytest.approx(0.8, abs=1e-12)


def test_as_json_keys_are_exact() -> None:
    stats = spectral_stats(parse_topology("ring:8"))
    data = stats.as_json()
    assert list(data) == [
        "nodes",
        "edges",
        "min_degree",
        "max_degree",
        "lambda2",
        "spectral_gap",
        "rounds_to_1e-3",
    ]
    assert data["rounds_to_1e-3"] == stats.rounds_to_1e_3
    assert json.loads(json.dumps(data)) == data
    assert isinstance(stats, SpectralStats)


def test_spectral_stats_refuses_hand_built_disconnected_graph() -> None:
    graph = nx.Graph([(0, 1), (2, 3)])
    with pytest.raises(TopologyError, match="disconnected"):
        spectral_stats(Topology(graph, ("a", "b", "c", "d"), "hand"))


# -------------------------------------------------------------- spec errors


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("bogus:4", ["unknown topology kind 'bogus'", "ring:N", "torus:RxC", "erdos:N:P:SEED"]),
        ("ring:2", ["ring:2: N must be >= 3"]),
        ("ring:x", ["ring:x: N must be an integer", "'x'"]),
        ("ring:-4", ["N must be >= 3"]),
        ("ring:8:1", ["expected ring:N", "got 2"]),
        ("ring", ["expected ring:N", "got 0"]),
        ("ring:100001", ["N must be <= 10000"]),
        ("ring:" + "9" * 40, ["N must be <= 10000"]),
        ("torus:4", ["expected torus:RxC"]),
        ("torus:2x4", ["R must be >= 3"]),
        ("torus:4x2", ["C must be >= 3"]),
        ("torus:200x200", ["R*C must be <= 10000"]),
        ("complete:1", ["complete:1: N must be >= 2"]),
        ("complete:5000", ["too large"]),
        ("star:1", ["N must be >= 2"]),
        ("exp:1", ["N must be >= 2"]),
        ("hypercube:6", ["power of two", "got 6"]),
        ("hypercube:1", ["N must be >= 2"]),
        ("random-regular:5:3:1", ["N*D must be even"]),
        ("random-regular:5:5:1", ["D must be <= 4"]),
        ("random-regular:6:0:1", ["D must be >= 1"]),
        ("random-regular:10:3:-1", ["SEED must be >= 0"]),
        ("random-regular:10:3", ["expected random-regular:N:D:SEED"]),
        ("smallworld:10:3:0.1:1", ["K must be even"]),
        ("smallworld:10:10:0.1:1", ["K must be <= 9"]),
        ("smallworld:10:4:1.5:1", ["P must be in [0, 1]"]),
        ("smallworld:10:4:nan:1", ["P must be a number"]),
        ("erdos:10:abc:1", ["P must be a number"]),
        ("erdos:0:0.5:1", ["N must be >= 1"]),
    ],
)
def test_bad_specs_name_the_problem(spec: str, fragments: list[str]) -> None:
    message = error_of(spec)
    assert message.startswith(spec)
    for fragment in fragments:
        assert fragment in message


def test_disconnected_random_graph_suggests_another_seed() -> None:
    message = error_of("random-regular:10:1:0")  # a perfect matching: 5 pieces
    assert "disconnected" in message
    assert "5 components of sizes 2, 2, 2, 2, 2" in message
    assert "another SEED (e.g. random-regular:10:1:1)" in message
    assert "components" in error_of("erdos:20:0.05:1")


def test_empty_spec() -> None:
    assert "spec is empty" in error_of("")


def test_topology_error_is_a_user_input_error() -> None:
    with pytest.raises(UserInputError):
        parse_topology("bogus:4")


def test_missing_file_and_directory(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "nope.edgelist")
    message = error_of(missing)
    assert missing in message
    assert "does not exist" in message
    assert "ring:N" in message
    assert "not a regular file" in error_of(str(tmp_path))


# --------------------------------------------------------------------- files


@pytest.mark.parametrize(
    ("name", "equivalent"),
    [("ring8.edgelist", "ring:8"), ("torus4x4.json", "torus:4x4"), ("campus.graphml", None)],
)
def test_ready_files_load_and_are_connected(name: str, equivalent: str | None) -> None:
    topology = parse_topology(str(READY_FILES / name))
    assert nx.is_connected(topology.graph)
    assert topology.spec == str(READY_FILES / name)
    if equivalent is not None:
        assert edge_set(topology) == edge_set(parse_topology(equivalent))
    assert spectral_stats(topology).rounds_to_1e_3 >= 1


def test_campus_names_and_bridge() -> None:
    campus = parse_topology(str(READY_FILES / "campus.graphml"))
    assert campus.n_nodes == 10
    assert campus.names == tuple(sorted(campus.names))
    assert "lab-a" in campus.names
    north, south = campus.index_of("gw-north"), campus.index_of("gw-south")
    assert south in campus.neighbours(north)
    assert not nx.is_connected(nx.restricted_view(campus.graph, [], [(north, south)]))


def test_edgelist_comments_columns_duplicates(tmp_path: pathlib.Path) -> None:
    text = "# header\n\n0 1 0.5 extra\n1 0  # same edge reversed\n1 2\n  \n2 0\n0 1\n"
    topology = parse_topology(write(tmp_path, "t.edges", text))
    assert (topology.n_nodes, topology.n_edges) == (3, 3)


def test_labels_sort_numerically_when_all_are_integers(tmp_path: pathlib.Path) -> None:
    topology = parse_topology(write(tmp_path, "n.txt", "10 9\n9 2\n2 1\n"))
    assert topology.names == ("1", "2", "9", "10")
    assert topology.neighbours(topology.index_of("9")) == (1, 3)


def test_labels_sort_as_text_when_mixed(tmp_path: pathlib.Path) -> None:
    topology = parse_topology(write(tmp_path, "m.txt", "b 10\n10 9\n9 a\n"))
    assert topology.names == ("10", "9", "a", "b")


def test_json_node_link_and_plain_forms(tmp_path: pathlib.Path) -> None:
    graph = nx.path_graph(["x", "y", "z"])
    node_link = {
        "directed": False,
        "multigraph": False,
        "nodes": [{"id": v} for v in graph.nodes],
        "links": [{"source": u, "target": v} for u, v in graph.edges],
    }
    linked = parse_topology(write(tmp_path, "nl.json", json.dumps(node_link)))
    assert linked.names == ("x", "y", "z")
    assert linked.n_edges == 2
    plain = parse_topology(write(tmp_path, "p.json", json.dumps({"edges": [[3, 1], [1, 2]]})))
    assert plain.names == ("1", "2", "3")
    assert plain.neighbours(0) == (1, 2)
    with_edges_key = dict(node_link, edges=node_link.pop("links"))
    assert parse_topology(write(tmp_path, "e.json", json.dumps(with_edges_key))).n_edges == 2


def test_directed_graphml_becomes_undirected(tmp_path: pathlib.Path) -> None:
    directed = nx.DiGraph([("a", "b"), ("b", "a"), ("b", "c")])
    path = tmp_path / "d.graphml"
    nx.write_graphml(directed, path)
    topology = parse_topology(str(path))
    assert topology.n_edges == 2
    assert topology.neighbours(topology.index_of("b")) == (0, 2)


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [
        ("s.edgelist", "0 1\n2 2\n1 2\n", ["line 2", "node 2 links to itself"]),
        ("b.edgelist", "0 1\n5\n", ["line 2", "expected 'u v'", "'5'"]),
        ("e.edgelist", "# nothing\n\n", ["no nodes"]),
        ("d.edgelist", "a b\nc d\n", ["2 components of sizes 2, 2", "join the components"]),
        ("bad.json", '{"edges": [[0, 1],]}', ["invalid JSON at line 1"]),
        ("list.json", "[[0, 1]]", ["expected a JSON object"]),
        ("edge.json", '{"edges": [[0]]}', ["edge #0", "expected [u, v]"]),
        ("null.json", '{"edges": [[0, null]]}', ["edge #0", "string or number"]),
        ("unk.json", '{"nodes": [0, 1], "edges": [[0, 1], [1, 2]]}', ["edge #1", "'2' is not in"]),
        ("iso.json", '{"nodes": [0, 1, 2], "edges": [[0, 1]]}', ["2 components of sizes 2, 1"]),
        ("loop.json", '{"edges": [["a", "a"]]}', ["node a links to itself"]),
        ("g.graphml", "this is not xml", ["not valid GraphML"]),
        ("h.graphml", "<graphml><graph><hyperedge/></graph></graphml>", ["not valid GraphML"]),
        (
            "l.graphml",
            '<graphml><graph edgedefault="undirected"><node id="a"/>'
            '<edge source="a" target="a"/></graph></graphml>',
            ["node a links to itself"],
        ),
    ],
)
def test_bad_files_name_the_file_and_problem(
    tmp_path: pathlib.Path, name: str, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, name, text)
    message = error_of(path)
    assert path in message
    for fragment in fragments:
        assert fragment in message


def test_non_utf8_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "latin.edgelist"
    path.write_bytes(b"caf\xe9 b\n")
    assert "not UTF-8" in error_of(str(path))


# ------------------------------------------------------------------- drawing


@pytest.mark.parametrize("spec", ["ring:6", "torus:3x3"])
def test_draw_png_writes_png(tmp_path: pathlib.Path, spec: str) -> None:
    out = tmp_path / "t.png"
    draw_png(parse_topology(spec), out)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000


def test_draw_png_accepts_str_path_and_names(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "campus.png"
    draw_png(parse_topology(str(READY_FILES / "campus.graphml")), str(out))
    assert out.stat().st_size > 1000
