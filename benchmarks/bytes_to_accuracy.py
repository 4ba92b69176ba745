"""Bytes to accuracy: how much a node sends before the network is as good as uncompressed gossip.

Run::

    python benchmarks/bytes_to_accuracy.py [--scenario scenarios/quickstart.toml] \\
        [VARIANT ...] [--json]

A variant is ``compression[,gamma=G][,keyframe_every=K][,overlap=1]`` (gossip.compression,
compression_step, keyframe_every, overlap); default variants: ``none q8 topk8_d16,gamma=0.5``.
``none`` (uncompressed, synchronous) is always run first: it sets the
threshold, its final mean accuracy minus 0.5 point.

Each variant runs the scenario's job with real node processes on loopback
(the scenario runner, no baselines), evaluating every round. Per round it
reads each node's accuracy and the bytes it had sent by then (its round
records: summary.json's ``bytes_curve``), and prints the curve (mean
accuracy against mean MB sent per node) and the bytes a node had sent when
the mean accuracy first reached the threshold. Target (issue 13): the best
compressor needs >= 8x fewer bytes than uncompressed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _scenarios import run

from p2pfm.config.toml import read_toml
from p2pfm.lab.summary import Summary

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 8.0
THRESHOLD_POINTS = 0.5
_KEYS = {"gamma": "compression_step", "keyframe_every": "keyframe_every", "overlap": "overlap"}


def parse_variant(text: str) -> dict[str, Any]:
    """``topk8_d16,gamma=0.5`` -> the gossip settings it sets."""
    name, *options = text.split(",")
    gossip: dict[str, Any] = {"compression": name}
    for option in options:
        key, _, value = option.partition("=")
        if key not in _KEYS or not value:
            raise SystemExit(f"variant {text!r}: options are {', '.join(f'{k}=...' for k in _KEYS)}")
        gossip[_KEYS[key]] = (
            bool(int(value))
            if key == "overlap"
            else (int(value) if key == "keyframe_every" else float(value))
        )
    return gossip


def curve(summary: Summary) -> list[tuple[int, float, float]]:
    """Per evaluated round: (round, mean accuracy over the nodes, mean bytes sent per node so far)."""
    rows = []
    rounds = sorted({r for node in summary.nodes for r, _ in node.curve})
    for round_ in rounds:
        accuracies = [v for node in summary.nodes for r, v in node.curve if r == round_ and v is not None]
        sent = [b for node in summary.nodes for r, b in node.bytes_curve if r == round_ and b is not None]
        if len(accuracies) == len(summary.nodes) and sent:
            rows.append((round_, statistics.mean(accuracies), statistics.mean(sent)))
    return rows


def bytes_to(rows: list[tuple[int, float, float]], threshold: float) -> float | None:
    """Mean bytes a node had sent when the mean accuracy first reached ``threshold`` after round 0 (None:
    never). Round 0 (before training, nothing sent) does not count: the question is what training costs."""
    return next((sent for round_, accuracy, sent in rows if round_ >= 1 and accuracy >= threshold), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", default=["q8", "topk8_d16,gamma=0.5"])
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "quickstart.toml")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    doc = read_toml(args.scenario, "scenario")
    doc.pop("baselines", None)
    doc["gossip"] = {**doc.get("gossip", {}), "eval_every": 1}
    texts = ["none", *[v for v in args.variants if v != "none"]]
    results: dict[str, list[tuple[int, float, float]]] = {}
    for text in texts:
        gossip = parse_variant(text)
        variant_doc = {**doc, "name": f"{doc['name']}-{text.replace(',', '-').replace('=', '')}"}
        variant_doc["gossip"] = {**doc["gossip"], **gossip}
        summary, _ = run(variant_doc)
        results[text] = curve(summary)
        print(f"# {text}: done", file=sys.stderr, flush=True)
    final = results["none"][-1][1]
    threshold = final - THRESHOLD_POINTS / 100
    reference = bytes_to(results["none"], threshold)
    report: dict[str, Any] = {"scenario": str(args.scenario), "threshold": threshold, "variants": {}}
    for text, rows in results.items():
        reached = bytes_to(rows, threshold)
        report["variants"][text] = {
            "curve": [{"round": r, "mean_accuracy": a, "mb_sent": b / 1e6} for r, a, b in rows],
            "final_mean_accuracy": rows[-1][1],
            "bytes_to_threshold": reached,
            "fewer_bytes": None if not reached or reference is None else reference / reached,
        }
    best = max((v["fewer_bytes"] or 0.0 for k, v in report["variants"].items() if k != "none"), default=0.0)
    report["best_ratio"] = best
    report["pass"] = best >= TARGET_RATIO
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"bytes to accuracy: {args.scenario}; threshold = uncompressed final mean - {THRESHOLD_POINTS} point "
        f"= {threshold:.4f}"
    )
    for text, v in report["variants"].items():
        points = "  ".join(f"r{p['round']} {p['mean_accuracy']:.3f}@{p['mb_sent']:.2f}MB" for p in v["curve"])
        to_mb = "never" if v["bytes_to_threshold"] is None else f"{v['bytes_to_threshold'] / 1e6:.3f} MB"
        ratio = "" if v["fewer_bytes"] is None else f" ({v['fewer_bytes']:.1f}x fewer)"
        print(f"  {text:28s} final {v['final_mean_accuracy']:.3f}  to threshold {to_mb}{ratio}")
        print(f"    {points}")
    verdict = "PASS" if report["pass"] else "FAIL"
    print(
        f"best compressor: {best:.1f}x fewer bytes than uncompressed (target >= {TARGET_RATIO}) -> {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
