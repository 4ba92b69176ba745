"""Does gossip slow training down? Wall time per round with and without it.

Run::

    python benchmarks/overhead.py [--nodes 4] [--rounds 6] [--pairs 1] [--sync | --both] [--json]

In one go, alternating (gossip, local, gossip, local, ...): the same nodes,
data shards, seeds and local training (packaged MiniLM, LoRA r=8, 8 steps of
batch 16 per round), once with gossip over loopback (Metropolis mixing on a
complete graph; ``gossip.overlap`` on unless ``--sync``) and once without
(``gossip.mix = false``); ``--both`` runs the overlapped and the
synchronous gossip in every set, beside the same local run, and every
set's ratio is printed (the run-to-run spread). The figure is the ratio
of mean wall time per round, gossip / local, a round's wall time being the time between a node's
consecutive round records (everything the loop does, not only training and
waiting); target <= 1.02 with 4 nodes (issue 13), i.e. communication,
signing and mixing hide behind compute. Evaluation runs only after the last
round; rounds 2 .. R - 1 are timed (the first warms up, the last waits for
its mix and evaluates).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _scenarios import round_records, run

TARGET = 1.02


def _scenario(nodes: int, rounds: int, mix: bool, overlap: bool) -> dict[str, object]:
    return {
        "name": f"overhead-{'gossip' if mix else 'local'}",
        "topology": f"complete:{nodes}",
        "timeout_s": 900.0,
        "model": {"path": "minilm", "task": "classification", "num_labels": 5},
        "data": {"source": "bbc-news", "partition": "dirichlet", "alpha": 0.3, "max_test_examples": 16},
        "train": {"local_steps": 8, "batch_size": 16, "max_length": 64},
        "gossip": {
            "rounds": rounds,
            "round_timeout_s": 60.0,
            "eval_every": rounds,
            "mix": mix,
            "overlap": overlap,
        },
    }


def _round_s(run_dir: Path) -> list[float]:
    """Per node, the mean time between its consecutive round records over rounds 2 .. R - 1."""
    per_node = round_records(run_dir)
    out = []
    for records in per_node.values():
        times = {r["round"]: r["time_s"] for r in records}
        last = max(times)
        out.append((times[last - 1] - times[1]) / (last - 2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=1, help="sets of runs (gossip, then local), alternating")
    parser.add_argument("--sync", action="store_true", help="gossip without overlap (gossip.overlap = false)")
    parser.add_argument("--both", action="store_true", help="overlap and synchronous gossip in every set")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 4:
        parser.error("--rounds must be >= 4 (rounds 2 .. R - 1 are timed)")
    modes = ["overlap", "synchronous"] if args.both else ["synchronous" if args.sync else "overlap"]
    gossip_s: dict[str, list[float]] = {mode: [] for mode in modes}
    waits: dict[str, list[float]] = {mode: [] for mode in modes}
    set_ratios: dict[str, list[float]] = {mode: [] for mode in modes}
    local_s: list[float] = []
    for _ in range(args.pairs):
        this_set: dict[str, list[float]] = {}
        for mode in modes:
            _, gossip_dir = run(_scenario(args.nodes, args.rounds, mix=True, overlap=mode == "overlap"))
            this_set[mode] = _round_s(gossip_dir)
            gossip_s[mode] += this_set[mode]
            records = round_records(gossip_dir).values()
            waits[mode] += [r["wait_s"] for node_records in records for r in node_records[1:-1]]
        _, local_dir = run(_scenario(args.nodes, args.rounds, mix=False, overlap=False))
        local = _round_s(local_dir)
        local_s += local
        for mode in modes:
            set_ratios[mode].append(statistics.mean(this_set[mode]) / statistics.mean(local))
    results = {}
    for mode in modes:
        ratio = statistics.mean(gossip_s[mode]) / statistics.mean(local_s)
        results[mode] = {
            "nodes": args.nodes,
            "rounds": args.rounds,
            "pairs": args.pairs,
            "gossip_round_s": statistics.mean(gossip_s[mode]),
            "local_round_s": statistics.mean(local_s),
            "mean_wait_for_neighbours_s": statistics.mean(waits[mode]),
            "overlap": mode == "overlap",
            "ratio": ratio,
            "ratio_per_set": set_ratios[mode],
            "target": TARGET,
            "pass": ratio <= TARGET,
        }
    if args.json:
        print(json.dumps(results if args.both else results[modes[0]]))
        return 0
    print(
        f"overhead benchmark: {args.nodes} MiniLM nodes on complete:{args.nodes}, {args.pairs} sets of runs "
        f"({', '.join(f'gossip {m}' for m in modes)}, local only), alternating"
    )
    print(f"  local only     {statistics.mean(local_s):.3f} s per round")
    for mode in modes:
        result = results[mode]
        verdict = "PASS" if result["pass"] else "FAIL"
        spread = " ".join(f"{r:.3f}" for r in result["ratio_per_set"])
        print(
            f"  gossip {mode:12} {result['gossip_round_s']:.3f} s per round, of which waiting "
            f"{result['mean_wait_for_neighbours_s']:.3f} s; ratio per set: {spread}"
        )
        print(f"ratio gossip ({mode}) / local = {result['ratio']:.3f} (target <= {TARGET}) -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
