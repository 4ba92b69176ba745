"""Does training wait for the network? Synchronous rounds against ``gossip.overlap`` on slow links.

Run (as root: it makes network namespaces and limits their links with tc)::

    python benchmarks/overlap.py [--scenario scenarios/quickstart.toml] [--transfer-steps 3.6]
                                 [--pairs 1] [--json]

The demo's job (its model, data split, algorithm and rounds) on 4 emulated
hosts: one node per network namespace (p2pfm/lab/netns.py), every host's
uplink capped with a tc token bucket so that one adapter message to one
neighbour takes ``--transfer-steps`` local steps, the step time measured
first on the same CPUs (a short local-only run of the same nodes). Then,
alternating, the synchronous run and the overlapped one on the same links.

Printed per mode: the training-time fraction (time in local steps / wall
time) over the steady rounds (2 .. the last trained round - 1, each node's
own clock; evaluation only after the last round) and over the whole run
(first round's start to the last record), the wall time, and the nodes'
final accuracy. Targets (issue 13): overlap's steady fraction >= 0.97, and
its mean accuracy within 0.5 point of the synchronous run's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from p2pfm.config.toml import read_toml
from p2pfm.lab import netns
from p2pfm.lab.scenario import load_scenario, stop_processes, write_node_configs
from p2pfm.node.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
PORT = 5550
TARGET_FRACTION = 0.97
TARGET_ACCURACY_POINTS = 0.5


@dataclasses.dataclass
class Run:
    mode: str
    records: dict[str, list[dict[str, Any]]]  # per node: its metrics records
    wall_s: float

    def rounds(self, node: str) -> list[dict[str, Any]]:
        return [r for r in self.records[node] if r.get("event") == "round" and r["round"] >= 1]

    def steady_fraction(self, last_trained: int) -> float:
        """Mean over nodes of train_s / wall time across rounds 2 .. last_trained - 1."""
        fractions = []
        for node in self.records:
            by_round = {r["round"]: r for r in self.rounds(node)}
            train_s = sum(by_round[k]["train_s"] for k in range(2, last_trained))
            wall_s = by_round[last_trained - 1]["time_s"] - by_round[1]["time_s"]
            fractions.append(float(train_s / wall_s))
        return float(statistics.mean(fractions))

    def whole_fraction(self) -> float:
        """Mean over nodes of all local-step time / (last record - the first round's start)."""
        fractions = []
        for node in self.records:
            rounds = self.rounds(node)
            first = rounds[0]
            started_s = first["time_s"] - first["round_s"]  # the first round's training began here
            ended_s = self.records[node][-1]["time_s"]
            fractions.append(sum(r["train_s"] for r in rounds) / (ended_s - started_s))
        return float(statistics.mean(fractions))

    def accuracies(self) -> list[float]:
        return [float(self.rounds(node)[-1]["eval"]["accuracy"]) for node in sorted(self.records)]

    def message_bytes(self) -> float:
        done = [r for node in self.records for r in self.records[node] if r.get("event") == "done"]
        return float(sum(r["bytes_sent"] for r in done) / max(1, sum(r["messages_sent"] for r in done)))


def _templates(scenario_path: Path, **gossip: Any) -> Any:
    scenario = load_scenario(scenario_path)
    templates = {k: dict(v) for k, v in scenario.templates.items()}
    rounds = int(templates["gossip"].get("rounds", 10))
    templates["gossip"] = {**templates["gossip"], "eval_every": rounds + 100, **gossip}
    return dataclasses.replace(scenario, templates=templates)


def _run(scenario: Any, hosts: list[netns.Host], folder: Path, mode: str, timeout_s: float) -> Run:
    """One run of ``scenario`` with node i in ``hosts[i]``; every process stopped by pid at the end."""
    procs = write_node_configs(scenario, folder)
    listens = [read_toml(proc.config, "node")["node"]["listen"] for proc in procs]
    for path in [folder / "roster.toml", *(p.config for p in procs)]:  # loopback ports -> the hosts
        text = path.read_text()
        for host, listen in zip(hosts, listens, strict=True):
            text = text.replace(f'"{listen}"', f'"tcp://{host.address}:{PORT}"')
        path.write_text(text)
    popens: list[subprocess.Popen[bytes]] = []
    started_s = time.monotonic()
    try:
        for i, proc in enumerate(procs):
            command = hosts[i].command(sys.executable, "-m", "p2pfm", "node", "--config", str(proc.config))
            with proc.log.open("ab") as log:
                popens.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in popens) and time.monotonic() - started_s < timeout_s:
            time.sleep(0.5)
        if any(p.poll() != 0 for p in popens):
            tails = {proc.name: proc.log.read_text()[-600:] for proc in procs}
            raise SystemExit(f"{mode} run failed or timed out (logs in {folder}): {json.dumps(tails)[:3000]}")
    finally:
        stop_processes(popens)
    wall_s = time.monotonic() - started_s
    return Run(mode, {proc.name: list(read_metrics(proc.metrics)) for proc in procs}, wall_s)


def _step_s(calibration: Run, local_steps: int) -> float:
    """Seconds per local step: round 2 of the local-only run (round 1 warms up), mean over nodes."""
    return float(
        statistics.mean(
            [
                r["train_s"] / local_steps
                for node in calibration.records
                for r in calibration.rounds(node)
                if r["round"] == 2
            ]
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", type=Path, default=ROOT / "scenarios" / "quickstart.toml")
    parser.add_argument(
        "--transfer-steps", type=float, default=3.6, help="one message to one neighbour, in steps"
    )
    parser.add_argument("--pairs", type=int, default=1, help="synchronous/overlapped pairs, run alternately")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="p2pfm-bench-overlap-"))
    base = load_scenario(args.scenario)
    n = base.topology.n_nodes
    local_steps = int(base.templates["train"].get("local_steps", 8))
    trained_rounds = int(base.templates["gossip"].get("rounds", 10))
    try:
        with netns.hosts(n) as hosts:
            calibration = _run(
                _templates(args.scenario, mix=False, rounds=2, consensus_rounds=0), hosts, out / "calibrate",
                "calibration", args.timeout_s,
            )  # fmt: skip
            step_s = _step_s(calibration, local_steps)
            adapter_bytes = max(
                r["adapter_bytes"]
                for node in calibration.records
                for r in calibration.records[node]
                if r.get("event") == "start"
            )
            message_bytes = (
                adapter_bytes * 1.02 + 4096
            )  # header, signature, CurveZMQ framing (measured below)
            rate = message_bytes / (args.transfer_steps * step_s)
            limits = {netns.limit_rate(host, rate_bytes_per_s=rate) for host in hosts}
            runs: dict[str, list[Run]] = {"synchronous": [], "overlap": []}
            for pair in range(args.pairs):
                for mode, overlap in (("synchronous", False), ("overlap", True)):
                    runs[mode].append(
                        _run(
                            _templates(args.scenario, overlap=overlap),
                            hosts,
                            out / f"{mode}-{pair}",
                            mode,
                            args.timeout_s,
                        )
                    )
    except netns.NetnsUnavailable as exc:
        print(
            f"overlap benchmark: cannot emulate hosts here ({exc}); run it as root with iproute2",
            file=sys.stderr,
        )
        return 2
    result = _result(
        runs, step_s=step_s, rate=rate, trained_rounds=trained_rounds, limits=sorted(limits), n=n
    )
    result["scenario"] = str(args.scenario)
    result["out"] = str(out)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return 0


def _result(
    runs: dict[str, list[Run]], *, step_s: float, rate: float, trained_rounds: int, limits: list[str], n: int
) -> dict[str, Any]:
    modes: dict[str, Any] = {}
    for mode, done in runs.items():
        accuracies = [a for run in done for a in run.accuracies()]
        modes[mode] = {
            "steady_fraction": statistics.mean(run.steady_fraction(trained_rounds) for run in done),
            "whole_fraction": statistics.mean(run.whole_fraction() for run in done),
            "wall_s": statistics.mean(run.wall_s for run in done),
            "accuracy": accuracies,
            "mean_accuracy": statistics.mean(accuracies),
            "message_bytes": statistics.mean(run.message_bytes() for run in done),
        }
    message_bytes = modes["synchronous"]["message_bytes"]
    overlap, sync = modes["overlap"], modes["synchronous"]
    gap_points = 100 * (overlap["mean_accuracy"] - sync["mean_accuracy"])
    return {
        "nodes": n,
        "step_s": step_s,
        "rate_bytes_per_s": rate,
        "tc": limits,
        "transfer_steps": message_bytes / rate / step_s,
        "modes": modes,
        "accuracy_gap_points": gap_points,
        "pass_fraction": overlap["steady_fraction"] >= TARGET_FRACTION,
        "pass_accuracy": abs(gap_points) <= TARGET_ACCURACY_POINTS,
    }


def _print(result: dict[str, Any]) -> None:
    modes = result["modes"]
    print(f"overlap benchmark: {result['nodes']} nodes, one per network namespace ({result['scenario']})")
    print(f"  local step (measured, all nodes sharing this machine's cores): {result['step_s']:.3f} s")
    print(
        f"  uplinks: tc {result['tc'][0]}; one {modes['synchronous']['message_bytes'] / 1e3:.0f} KB message "
        f"to one neighbour = {result['transfer_steps']:.2f} local steps"
    )
    print(
        f"  {'':12} {'fraction (steady)':>18} {'fraction (whole)':>17} {'wall':>8}  accuracy per node (mean)"
    )
    for mode in ("synchronous", "overlap"):
        m = modes[mode]
        accuracies = " ".join(f"{a:.3f}" for a in m["accuracy"])
        print(
            f"  {mode:12} {m['steady_fraction']:18.3f} {m['whole_fraction']:17.3f} {m['wall_s']:7.1f}s"
            f"  {accuracies} ({m['mean_accuracy']:.3f})"
        )
    verdict = "PASS" if result["pass_fraction"] else "FAIL"
    fraction = modes["overlap"]["steady_fraction"]
    print(
        f"overlap training-time fraction (steady) = {fraction:.3f} (target >= {TARGET_FRACTION}) -> {verdict}"
    )
    verdict = "PASS" if result["pass_accuracy"] else "FAIL"
    print(
        f"accuracy overlap - synchronous = {result['accuracy_gap_points']:+.2f} points "
        f"(target within {TARGET_ACCURACY_POINTS}) -> {verdict}"
    )


if __name__ == "__main__":
    sys.exit(main())
