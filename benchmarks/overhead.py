"""Does gossip slow training down? Wall time per round with and without it.

Run::

    python benchmarks/overhead.py [--nodes 2] [--rounds 5] [--pairs 2] [--json]

In one go, alternating (gossip, local, gossip, local, ...): the same nodes,
data shards, seeds and local training (packaged MiniLM, LoRA r=8, 8 steps of
batch 16 per round), once with gossip over loopback (Metropolis mixing on a
complete graph) and once without (``gossip.mix = false``). The figure is the
ratio of mean wall time per round, gossip / local; target <= 1.05, i.e.
communication, signing and mixing hide behind compute. Evaluation runs only
after the last round, so the rounds time training plus gossip.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _scenarios import round_records, run


def _scenario(nodes: int, rounds: int, mix: bool) -> dict[str, object]:
    return {
        "name": f"overhead-{'gossip' if mix else 'local'}",
        "topology": f"complete:{nodes}",
        "timeout_s": 900.0,
        "model": {"path": "minilm", "task": "classification", "num_labels": 5},
        "data": {"source": "bbc-news", "partition": "dirichlet", "alpha": 0.3, "max_test_examples": 16},
        "train": {"local_steps": 8, "batch_size": 16, "max_length": 64},
        "gossip": {"rounds": rounds, "round_timeout_s": 60.0, "eval_every": rounds, "mix": mix},
    }


def _round_s(run_dir: Path) -> list[float]:
    """Per-round wall time, averaged over nodes, skipping round 1 (warm-up) and the evaluated last round."""
    per_node = round_records(run_dir)
    rounds = sorted({r["round"] for records in per_node.values() for r in records})[1:-1]
    return [
        statistics.mean(r["round_s"] for records in per_node.values() for r in records if r["round"] == k)
        for k in rounds
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=2, help="gossip/local pairs, run alternately")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    gossip_s: list[float] = []
    local_s: list[float] = []
    waits: list[float] = []
    for _ in range(args.pairs):
        _, gossip_dir = run(_scenario(args.nodes, args.rounds, mix=True))
        gossip_s += _round_s(gossip_dir)
        waits += [r["wait_s"] for records in round_records(gossip_dir).values() for r in records[1:-1]]
        _, local_dir = run(_scenario(args.nodes, args.rounds, mix=False))
        local_s += _round_s(local_dir)
    ratio = statistics.mean(gossip_s) / statistics.mean(local_s)
    result = {
        "nodes": args.nodes,
        "rounds": args.rounds,
        "pairs": args.pairs,
        "gossip_round_s": statistics.mean(gossip_s),
        "local_round_s": statistics.mean(local_s),
        "mean_wait_for_neighbours_s": statistics.mean(waits),
        "ratio": ratio,
        "target": 1.05,
        "pass": ratio <= 1.05,
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"overhead benchmark: {args.nodes} MiniLM nodes on complete:{args.nodes}, {args.pairs} pairs of runs"
    )
    print(f"  with gossip    {result['gossip_round_s']:.3f} s per round")
    print(f"  local only     {result['local_round_s']:.3f} s per round")
    print(f"  of which waiting for neighbours: {result['mean_wait_for_neighbours_s']:.3f} s per round")
    verdict = "PASS" if result["pass"] else "FAIL"
    print(f"ratio gossip / local = {ratio:.3f} (target <= 1.05) -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
