"""Does a real network mix like the simulator? (issue: within 10%).

Run::

    python benchmarks/consensus.py [--topology ring:8] [--rounds 40] [--model minilm] [--json]

One run of real ``p2pfm node`` processes on loopback (8 by default), each
starting from its own adapter (distinct seeds) and doing no training
(``local_steps = 0``): every round is pure gossip mixing over ZeroMQ. From
the nodes' per-round adapter snapshots it computes the consensus distance
(the simulator's definition), fits its per-round decay over the rounds where
it lies between 1e-3 and the float32 floor (``p2pfm.lab.sim.fit_decay_rate``),
and compares that with the simulator's fitted decay on the same graph, run
in the same process, and with lambda2^2 from the mixing matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _scenarios import run

from p2pfm.core.topology import parse_topology, spectral_stats
from p2pfm.lab.sim import SimConfig, fit_decay_rate, float_floor, simulate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topology", default="ring:8")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--model", default="minilm", help="model directory, or 'minilm' (packaged)")
    parser.add_argument("--num-labels", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    lambda2 = spectral_stats(parse_topology(args.topology)).lambda2
    started = time.monotonic()
    summary, run_dir = run(
        {
            "name": "consensus-bench",
            "topology": args.topology,
            "distinct_seeds": True,
            "timeout_s": 900.0,
            "model": {"path": args.model, "task": "classification", "num_labels": args.num_labels},
            "data": {"source": "bbc-news", "partition": "iid", "max_test_examples": 16},
            "train": {"local_steps": 0, "threads": 1},
            "gossip": {"rounds": args.rounds, "round_timeout_s": 30.0, "eval_every": args.rounds},
        }
    )
    network_s = time.monotonic() - started
    network = [c.consensus_distance for c in summary.consensus]
    sim = simulate(SimConfig(args.topology, rounds=args.rounds, dim=1000, seed=0, dtype="float32"))
    simulated = [r.consensus_distance for r in sim.rounds[1:]]  # rounds 1.., like the snapshots
    floor = float_floor("float32")
    network_rate = fit_decay_rate(network, floor=floor)
    sim_rate = fit_decay_rate(simulated, floor=floor)
    ratio = network_rate / sim_rate
    result = {
        "topology": args.topology,
        "nodes": len(summary.nodes),
        "rounds": args.rounds,
        "model": args.model,
        "lambda2_squared": lambda2**2,
        "network_decay_per_round": network_rate,
        "simulator_decay_per_round": sim_rate,
        "ratio": ratio,
        "within_10_percent": abs(ratio - 1.0) <= 0.10,
        "network_wall_s": network_s,
        "network_distances": network,
        "run_dir": str(run_dir),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"consensus benchmark: {result['nodes']} node processes on {args.topology}, {args.rounds} rounds")
    print(f"mixing only (local_steps = 0), distinct adapter seeds, model {args.model}; {network_s:.0f} s")
    print("round  network distance   simulator distance")
    for i, (a, b) in enumerate(zip(network, simulated, strict=False), start=1):
        print(f"{i:5d}  {a:16.3e}   {b:18.3e}")
    print(f"predicted decay per round lambda2^2      = {lambda2**2:.4f}")
    print(f"simulator fitted decay per round          = {sim_rate:.4f}")
    print(f"real network fitted decay per round       = {network_rate:.4f}")
    verdict = "PASS" if result["within_10_percent"] else "FAIL"
    print(f"ratio network / simulator = {ratio:.4f} (target within 10%) -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
