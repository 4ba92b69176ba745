"""How fast does the simulator run real node loops? (issue 10 item 8).

Run::

    python benchmarks/simulator.py [--nodes 1024] [--rounds 20] [--dim 10000] [--quick] [--json]

Two measurements, side by side in one run:

1. gossip only: ``p2pfm simulate exp:N --rounds R --dim D`` (real
   signatures, every receiver checks everything) with one worker process
   and with one worker per core; prints both wall times, their ratio, and
   the wall time against the 20 s target; and the fitted decay per round
   against lambda2^2 of the graph;
2. training: N/4 nodes (256 by default) on the quadratic (numpy) learner,
   4 local steps per round, R rounds; wall time against the 60 s target.

``--quick`` shrinks everything (CI smoke run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any

from p2pfm.lab.sim import SimConfig, SimResult, fit_decay_rate, float_floor, simulate


def _timed(config: SimConfig) -> tuple[float, SimResult]:
    started = time.perf_counter()
    result = simulate(config)
    return time.perf_counter() - started, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dim", type=int, default=10000)
    parser.add_argument("--quick", action="store_true", help="64 nodes, 6 rounds, dim 1000")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    nodes, rounds, dim = (64, 6, 1000) if args.quick else (args.nodes, args.rounds, args.dim)
    cores = len(os.sched_getaffinity(0))
    gossip = SimConfig(f"exp:{nodes}", rounds=rounds, dim=dim, workers=1)
    one_s, one = _timed(gossip)
    many_s, many = _timed(SimConfig(f"exp:{nodes}", rounds=rounds, dim=dim, workers=cores))
    distances = [r.consensus_distance for r in many.rounds]
    # Equal up to the order of float sums (the parts' tallies merge in another order).
    same = all(
        math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-30)
        for a, b in zip(distances, [r.consensus_distance for r in one.rounds], strict=True)
    )
    try:
        decay = fit_decay_rate(distances, floor=float_floor("float32"))
    except Exception:  # noqa: BLE001  too few rounds in range (--quick): reported as missing
        decay = float("nan")
    predicted = many.lambda2**2
    messages = sum(r.messages for r in many.rounds)
    train_nodes = max(4, nodes // 4)
    train_s, trained = _timed(
        SimConfig(f"exp:{train_nodes}", rounds=rounds, dim=dim, local_steps=4, workers=1)
    )
    honest = [n.distance for n in trained.node_results]
    doc: dict[str, Any] = {
        "cores": cores,
        "gossip": {
            "topology": f"exp:{nodes}", "rounds": rounds, "dim": dim, "messages": messages,
            "one_worker_s": one_s, "workers": many.workers, "many_workers_s": many_s,
            "speedup": one_s / many_s, "vs_target_20s": many_s / 20.0,
            "identical_results": same, "decay": decay, "lambda2_squared": predicted,
            "decay_ratio": decay / predicted, "rejected": many.rejected,
            "us_per_message_cpu": 1e6 * one_s / max(messages, 1),
        },
        "training": {
            "topology": f"exp:{train_nodes}", "nodes": train_nodes, "rounds": rounds, "dim": dim,
            "local_steps": 4, "wall_s": train_s, "vs_target_60s": train_s / 60.0,
            "mean_distance": sum(honest) / len(honest), "worst_distance": max(honest),
        },
    }  # fmt: skip
    if args.json:
        print(json.dumps(doc))
        return 0
    g, t = doc["gossip"], doc["training"]
    print(f"simulator benchmark ({cores} cores)")
    print(
        f"  gossip exp:{nodes}, {rounds} rounds, dim {dim}, {messages} messages checked: "
        f"1 worker {one_s:.1f} s, {g['workers']} workers {many_s:.1f} s "
        f"(speedup {g['speedup']:.2f}x, identical results: {same}); "
        f"{g['us_per_message_cpu']:.0f} us of one core per message"
    )
    print(f"  vs the 20 s target: {g['vs_target_20s']:.2f}")
    print(f"  decay per round {decay:.4f} vs lambda2^2 {predicted:.4f}: ratio {g['decay_ratio']:.4f}")
    print(
        f"  training exp:{train_nodes} ({train_nodes} real node loops, 4 local steps, {rounds} rounds): "
        f"{train_s:.1f} s (vs the 60 s target: {t['vs_target_60s']:.2f}); "
        f"distance to the optimum mean {t['mean_distance']:.3f}, worst {t['worst_distance']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
