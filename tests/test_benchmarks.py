"""The benchmark scripts still run (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wire_benchmark_runs_and_reports_its_ratio() -> None:
    tiny = ["--mib", "2", "--repeats", "1", "--small-messages", "20", "--json"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "wire.py"), *tiny],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["update"]["payload_bytes"] == 2 * 2**20
    assert report["ratio"] > 0 and isinstance(report["pass"], bool)
    assert report["pass"] == (report["ratio"] >= report["target"])
    assert report["pipeline"]["gbps"] > 0 and report["zmq"]["gbps"] > 0
    assert report["simulator"]["messages"] > 0
