"""Shared helpers for benchmarks that run real node processes via the scenario runner."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import tomli_w

from p2pfm.lab.scenario import run_scenario
from p2pfm.lab.summary import Summary
from p2pfm.node.metrics import read_metrics


def run(doc: dict[str, Any], out: Path | None = None) -> tuple[Summary, Path]:
    """Write ``doc`` as a scenario file, run it quietly, return (summary, output folder)."""
    folder = Path(tempfile.mkdtemp(prefix=f"p2pfm-bench-{doc['name']}-")) if out is None else out
    path = folder / "scenario.toml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(doc))
    summary = run_scenario(path, folder / "run")
    if not summary.ok:
        brief = json.dumps(summary.to_json())[:500]
        raise SystemExit(f"scenario {doc['name']} failed; see {folder / 'run'}: {brief}")
    return summary, folder / "run"


def round_records(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Per node, its metrics records of completed rounds (round >= 1)."""
    out = {}
    for node in sorted((run_dir / "nodes").iterdir()):
        out[node.name] = [
            r for r in read_metrics(node / "metrics.jsonl") if r.get("event") == "round" and r["round"] >= 1
        ]
    return out
