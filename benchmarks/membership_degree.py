"""Why membership.degree defaults to 6: lambda2 of Metropolis mixing on random d-regular graphs.

For each size and degree, the worst lambda2 over 3 random d-regular graphs
(networkx, seeds 0-2), the rounds for the consensus distance to fall by
1e3 (``ceil(log 1e-3 / log lambda2^2)``) and the adapters a node sends to
get there (degree x rounds). docs/membership.md records the output.

    python benchmarks/membership_degree.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import math

import networkx as nx
import numpy as np

from p2pfm.core.consensus import metropolis_weights


def lambda2(graph: nx.Graph) -> float:
    n = graph.number_of_nodes()
    degree = dict(graph.degree())
    w = np.zeros((n, n))
    for i in graph.nodes:
        row = metropolis_weights(degree[i], {j: degree[j] for j in graph.neighbors(i)})
        for j, weight in row.items():
            w[i, j] = weight
        w[i, i] = 1.0 - sum(row.values())
    return float(np.sort(np.abs(np.linalg.eigvalsh((w + w.T) / 2)))[-2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 and 64 nodes only")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = (16, 64) if args.quick else (16, 64, 256, 1000)
    rows = []
    for n in sizes:
        for d in (3, 4, 6, 8):
            worst = max(lambda2(nx.random_regular_graph(d, n, seed=s)) for s in range(3))
            rounds = math.ceil(math.log(1e-3) / math.log(worst**2))
            rows.append(
                {"nodes": n, "degree": d, "lambda2": worst, "rounds_to_1e-3": rounds, "adapters": d * rounds}
            )
    if args.json:
        print(json.dumps(rows))
        return
    print("nodes degree lambda2 rounds_to_1e-3 adapters_sent")
    for r in rows:
        cells = (r["nodes"], r["degree"], f"{r['lambda2']:.3f}", r["rounds_to_1e-3"], r["adapters"])
        print("{:>5} {:>6} {:>7} {:>14} {:>13}".format(*cells))


if __name__ == "__main__":
    main()
