"""Scenario report: summary.json, PNG plots and report.md from node outputs.

Inputs are only files the nodes wrote (metrics.jsonl, adapter snapshots),
so a report could be rebuilt after the fact from a run folder (there is no
command for that yet: ``p2pfm run`` writes it at the end of a run).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy

from p2pfm.core.consensus import consensus_distance
from p2pfm.node.metrics import read_metrics

if TYPE_CHECKING:
    from p2pfm.lab.scenario import Scenario


def _node_dirs(folder: Path) -> list[Path]:
    if not folder.exists():
        return []
    return sorted((p for p in folder.iterdir() if (p / "metrics.jsonl").exists()), key=_natural)


def _natural(path: Path) -> tuple[int, str]:
    digits = "".join(c for c in path.name if c.isdigit())
    return (int(digits) if digits else -1, path.name)


def _node_summary(folder: Path, metric: str) -> dict[str, Any]:
    records = list(read_metrics(folder / "metrics.jsonl"))
    rounds = [r for r in records if r.get("event") == "round"]
    evaluated = [r for r in rounds if r.get("eval")]
    # Counters ride on round and done records (resume / caught_up carry none).
    last: dict[str, Any] = next((r for r in reversed(records) if "bytes_sent" in r), {})
    final = evaluated[-1]["eval"] if evaluated else {}
    peer = next((r.get("peer") for r in records if r.get("peer")), None)
    return {
        "id": peer,
        "name": folder.name,
        f"final_{metric}": final.get(metric),
        "bytes_sent": last.get("bytes_sent", 0),
        "bytes_received": last.get("bytes_received", 0),
        "messages_sent": last.get("messages_sent", 0),
        "messages_received": last.get("messages_received", 0),
        "rejected": last.get("rejected", {}),
        "dropped": last.get("dropped", {}),
        "restarts": sum(1 for r in records if r.get("event") == "resume"),
        "caught_up": sum(1 for r in records if r.get("event") == "caught_up"),
        "rounds_completed": max((r["round"] for r in rounds), default=0),
        # Rounds it really ran: a catch-up skips rounds, and skipped rounds are not training.
        "rounds_trained": max((r.get("rounds_trained", 0) for r in rounds), default=0),
        "banned": last.get("banned", []),
        "timed_out_rounds": sum(1 for r in rounds if r.get("timed_out")),
        "finished": any(r.get("event") == "done" and not r.get("stopped") for r in records),
        "attack": next((r["attack"] for r in records if r.get("attack")), ""),
        "curve": [(r["round"], r["eval"].get(metric)) for r in evaluated],
    }


def consensus_per_round(node_dirs: list[Path]) -> list[dict[str, Any]]:
    """Consensus distance over the nodes' mixed adapters, per round (nodes that have a snapshot)."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for folder in node_dirs:
        for snap in sorted((folder / "snapshots").glob("round_*.safetensors")):
            round_ = int(snap.stem.split("_")[1])
            by_round.setdefault(round_, []).append(safetensors.numpy.load_file(str(snap)))
    return [
        {"round": r, "consensus_distance": consensus_distance(states), "nodes": len(states)}
        for r, states in sorted(by_round.items())
        if len(states) >= 2
    ]


def _mean(values: list[Any]) -> float | None:
    clean = [float(v) for v in values if v is not None]
    return sum(clean) / len(clean) if clean else None


def write_report(scenario: Scenario, out: Path, *, wall_s: float, ok: bool) -> dict[str, Any]:
    metric = (
        "accuracy"
        if scenario.templates["model"].get("task", "classification") == "classification"
        else "perplexity"
    )
    node_dirs = _node_dirs(out / "nodes")
    nodes = [_node_summary(d, metric) for d in node_dirs]
    # Attackers' own models are not what the experiment measures: means and
    # consensus are over the honest nodes.
    honest = [n for n in nodes if not n["attack"]]
    summary: dict[str, Any] = {
        "scenario": scenario.header.name,
        "topology": scenario.header.topology,
        "ok": ok,
        "metric": metric,
        f"mean_final_{metric}": _mean([n[f"final_{metric}"] for n in honest]),
        "attackers": [n["name"] for n in nodes if n["attack"]],
        "nodes": [{k: v for k, v in n.items() if k != "curve"} for n in nodes],
        "consensus_distance": consensus_per_round(
            [d for d, n in zip(node_dirs, nodes, strict=True) if not n["attack"]]
        ),
        "wall_s": wall_s,
    }
    if scenario.header.baselines:
        baselines: dict[str, Any] = {}
        local = [_node_summary(d, metric) for d in _node_dirs(out / "baselines" / "local")]
        if "local" in scenario.header.baselines:
            baselines["local"] = _mean([n[f"final_{metric}"] for n in local])
            baselines["local_per_node"] = {n["name"]: n[f"final_{metric}"] for n in local}  # by node name
        pooled = _node_dirs(out / "baselines" / "pooled")
        if "pooled" in scenario.header.baselines and pooled:
            baselines["pooled"] = _node_summary(pooled[0], metric)[f"final_{metric}"]
        summary["baselines"] = baselines
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plots(out, nodes, summary, metric)
    (out / "report.md").write_text(_markdown(scenario, nodes, summary, metric))
    return summary


def _plots(out: Path, nodes: list[dict[str, Any]], summary: dict[str, Any], metric: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for node in nodes:
        xs = [r for r, _ in node["curve"]]
        ax.plot(xs, [v for _, v in node["curve"]], marker="o", label=f"{node['name']} (gossip)")
    baselines = summary.get("baselines", {})
    if baselines.get("local") is not None:
        ax.axhline(baselines["local"], color="grey", linestyle="--", label="local-only (mean)")
    if baselines.get("pooled") is not None:
        ax.axhline(baselines["pooled"], color="black", linestyle=":", label="pooled")
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per node per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{metric}.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    points = [(c["round"], c["consensus_distance"]) for c in summary["consensus_distance"]]
    positive = [(r, d) for r, d in points if d > 0]
    if positive:
        ax.semilogy([r for r, _ in positive], [d for _, d in positive], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance (after mixing)")
    ax.set_title("disagreement between nodes' adapters")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "consensus.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    index = np.arange(len(nodes))
    ax.bar(index - 0.2, [n["bytes_sent"] / 1e6 for n in nodes], 0.4, label="sent")
    ax.bar(index + 0.2, [n["bytes_received"] / 1e6 for n in nodes], 0.4, label="received")
    ax.set_xticks(index, [n["name"] for n in nodes])
    ax.set_ylabel("MB")
    ax.set_title("bytes per node")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=100)
    plt.close(fig)


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _markdown(scenario: Scenario, nodes: list[dict[str, Any]], summary: dict[str, Any], metric: str) -> str:
    baselines = summary.get("baselines", {})
    local = baselines.get("local_per_node", {})
    gossip_mean = summary[f"mean_final_{metric}"]
    lines = [
        f"# Scenario report: {scenario.header.name}",
        "",
        f"- topology: `{scenario.header.topology}` ({len(nodes)} nodes)",
        f"- model: `{scenario.templates['model'].get('path', '?')}`, "
        f"task {scenario.templates['model'].get('task', 'classification')}, metric {metric}",
        f"- wall time of the gossip run: {summary['wall_s']:.0f} s",
        f"- every node finished cleanly: {summary['ok']}",
        "",
        "## Results",
        "",
    ]
    if baselines:
        pooled = baselines.get("pooled")
        local_mean = baselines.get("local")
        lines += [
            f"| node | gossip {metric} | local-only {metric} | bytes sent | bytes received |",
            "|---|---|---|---|---|",
        ]
        for node in nodes:
            lines.append(
                f"| {_label(node)} | {_f(node[f'final_{metric}'])} "
                f"| {_f(local.get(node['name']))} "
                f"| {node['bytes_sent'] / 1e6:.2f} MB | {node['bytes_received'] / 1e6:.2f} MB |"
            )
        lines += ["", f"- mean gossip {metric}{_over(summary)}: **{_f(gossip_mean)}**"]
        if local_mean is not None:
            gap = _gap(gossip_mean, local_mean, metric)
            lines.append(f"- mean local-only {metric}: {_f(local_mean)} (gossip is {gap})")
        if pooled is not None:
            lines.append(
                f"- pooled (one model on all shards, same steps per node): {_f(pooled)} "
                f"(gossip is {_gap(gossip_mean, pooled, metric)})"
            )
    else:
        lines += [f"| node | final {metric} | bytes sent | bytes received |", "|---|---|---|---|"]
        for node in nodes:
            lines.append(
                f"| {_label(node)} | {_f(node[f'final_{metric}'])} | {node['bytes_sent'] / 1e6:.2f} MB "
                f"| {node['bytes_received'] / 1e6:.2f} MB |"
            )
        lines += ["", f"- mean final {metric}{_over(summary)}: **{_f(gossip_mean)}**"]
    lines += ["", f"![{metric} per round]({metric}.png)", "", "## Consensus", ""]
    consensus = summary["consensus_distance"]
    if consensus:
        lines += ["| round | consensus distance | nodes |", "|---|---|---|"]
        lines += [f"| {c['round']} | {c['consensus_distance']:.3e} | {c['nodes']} |" for c in consensus]
    lines += ["", "![consensus distance](consensus.png)", "", "## Network and faults", ""]
    lines += [
        "| node | rounds trained / reached | restarts | rounds timed out | dropped | rejected | banned |",
        "|---|---|---|---|---|---|---|",
    ]
    for node in nodes:
        banned = ", ".join(node.get("banned", [])) or "-"
        lines.append(
            f"| {_label(node)} | {node.get('rounds_trained', 0)} / {node['rounds_completed']} "
            f"| {node['restarts']} | {node['timed_out_rounds']} "
            f"| {_counts(node['dropped'])} | {_counts(node['rejected'])} | {banned} |"
        )
    faults = scenario.faults
    described = [
        f"crash node{c.node} after round {c.round}, restart after {c.restart_after_s:g} s"
        for c in faults.crash
    ]
    described += [f"node{s.node} trains {s.factor:g}x slower" for s in faults.slow]
    described += [f"drop p={d.prob:g} on {list(d.link) or 'every link'}" for d in faults.drop]
    described += [
        f"node{a.node} attacks: {a.kind}" + (f" x{a.factor:g}" if a.factor else "") for a in faults.attack
    ]
    lines += ["", "Faults injected: " + ("; ".join(described) if described else "none"), ""]
    lines += ["![bytes per node](bytes.png)", ""]
    return "\n".join(lines)


def _label(node: dict[str, Any]) -> str:
    return f"{node['name']} (attacker: {node['attack']})" if node["attack"] else str(node["name"])


def _over(summary: dict[str, Any]) -> str:
    attackers = summary.get("attackers") or []
    return f" (honest nodes; attackers: {', '.join(attackers)})" if attackers else ""


def _gap(ours: float | None, other: float | None, metric: str) -> str:
    """'12.3 points above' for accuracy; 'x.xx lower (better)' for perplexity."""
    if ours is None or other is None:
        return "n/a"
    if metric == "accuracy":
        diff = (ours - other) * 100
        return f"{abs(diff):.1f} points {'above' if diff >= 0 else 'below'}"
    diff = ours - other
    return f"{abs(diff):.2f} {'higher (worse)' if diff > 0 else 'lower (better)'}"


def _counts(counter: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()) if v) or "0"
