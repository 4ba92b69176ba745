"""Pictures for people: a topology drawn to a PNG (matplotlib, imported only when drawing).

The run report's plots live in p2pfm/lab/report.py; this module keeps
matplotlib out of the core, whose graphs it draws.
"""

from __future__ import annotations

import pathlib

import networkx as nx

from p2pfm.core.topology import CIRCULAR_KINDS, Topology, spectral_stats


def draw_png(topology: Topology, path: pathlib.Path | str) -> None:
    """Render the topology to a PNG, for eyeballing a spec before a long run."""
    # Imported here: matplotlib is slow to import and only plotting needs it.
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # headless: no display on servers or in CI
    import matplotlib.pyplot as plt  # noqa: PLC0415

    graph = topology.graph
    if topology.spec.split(":", 1)[0] in CIRCULAR_KINDS:
        positions = nx.circular_layout(graph)
    else:
        positions = nx.spring_layout(graph, seed=0)
    lambda2 = spectral_stats(topology).lambda2
    figure, axes = plt.subplots(figsize=(6.0, 6.0))
    try:
        labels = {i: name for i, name in enumerate(topology.names)}
        style = {"node_size": 400, "node_color": "#cfe3f7", "edgecolors": "#4a7ab0", "font_size": 7}
        nx.draw_networkx(graph, positions, ax=axes, labels=labels, **style)
        axes.set_title(f"{topology.spec}  (lambda2 = {lambda2:.4f})")
        axes.set_axis_off()
        figure.savefig(path, format="png", dpi=100)
    finally:
        plt.close(figure)
