"""Scenario report: a Summary from the node folders, then report.md and PNG plots from that Summary.

:func:`summarize` reads only files the nodes wrote (metrics.jsonl, adapter
snapshots); :func:`write_report` reads only the :class:`Summary`, so
``p2pfm report RUN`` redraws a run's report from its summary.json alone.
What the report must know about the scenario comes in a :class:`Setup`,
filled in by the runner: this module never imports p2pfm.lab.scenario.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import safetensors.numpy

from p2pfm.core.consensus import consensus_distance
from p2pfm.lab.summary import (
    Baselines,
    ConsensusPoint,
    MembershipPoint,
    Metric,
    NodeSummary,
    Summary,
    metric_for_task,
    write_summary,
)
from p2pfm.node.metrics import read_metrics


@dataclass(frozen=True)
class Setup:
    """What a run was, as its report states it; ``task`` decides the metric."""

    scenario: str
    topology: str
    model: str
    task: str
    faults: tuple[str, ...] = ()  # one sentence per injected fault
    baselines: tuple[str, ...] = ()  # the baseline runs asked for: "local", "pooled"
    algorithm: Mapping[str, str | float | bool] = field(default_factory=dict)  # Summary.algorithm

    def __post_init__(self) -> None:
        metric_for_task(self.task)  # an unknown task fails here, before the runner starts anything


def report_run(out: Path, setup: Setup, *, wall_s: float, ok: bool) -> Summary:
    """Summarize the run in ``out``, write its summary.json, report.md and plots; return the Summary."""
    summary = summarize(out, setup, wall_s=wall_s, ok=ok)
    write_summary(out / "summary.json", summary)
    write_report(out, summary)
    return summary


def summarize(out: Path, setup: Setup, *, wall_s: float, ok: bool) -> Summary:
    """The Summary of the run in ``out`` (its ``nodes/`` and ``baselines/``), as the nodes recorded it."""
    metric = metric_for_task(setup.task)
    node_dirs = _node_dirs(out / "nodes")
    nodes = tuple(node_summary(d, metric) for d in node_dirs)
    baselines = None
    if setup.baselines:
        local = None
        if "local" in setup.baselines:
            local_dirs = _node_dirs(out / "baselines" / "local")
            local = {d.name: node_summary(d, metric).final for d in local_dirs}  # by node name
        pooled = _node_dirs(out / "baselines" / "pooled")
        final = node_summary(pooled[0], metric).final if "pooled" in setup.baselines and pooled else None
        baselines = Baselines(local, final)
    honest_dirs = [d for d, n in zip(node_dirs, nodes, strict=True) if not n.is_attacker]
    return Summary(
        scenario=setup.scenario,
        topology=setup.topology,
        model=setup.model,
        task=setup.task,
        ok=ok,
        wall_s=wall_s,
        nodes=nodes,
        consensus=consensus_per_round(honest_dirs),  # the attackers' models are not what is measured
        baselines=baselines,
        faults=setup.faults,
        membership=membership_per_round(node_dirs),
        algorithm=setup.algorithm,
    )


def _node_dirs(folder: Path) -> list[Path]:
    if not folder.exists():
        return []
    return sorted((p for p in folder.iterdir() if (p / "metrics.jsonl").exists()), key=_natural)


def _natural(path: Path) -> tuple[int, str]:
    digits = "".join(c for c in path.name if c.isdigit())
    return (int(digits) if digits else -1, path.name)


def node_summary(folder: Path, metric: Metric) -> NodeSummary:
    """One node's results from its metrics.jsonl; fields it never wrote keep their zero defaults."""
    records = list(read_metrics(folder / "metrics.jsonl"))
    rounds = [r for r in records if r.get("event") == "round"]
    evaluated = [r for r in rounds if isinstance(r.get("eval"), dict) and r["eval"]]
    # Counters ride on round and done records (resume / caught_up carry none).
    last: dict[str, Any] = next((r for r in reversed(records) if "bytes_sent" in r), {})
    peer = next((r["peer"] for r in records if isinstance(r.get("peer"), str)), None)
    curve = tuple((_int(r, "round"), _value(r["eval"].get(metric))) for r in evaluated)
    return NodeSummary(
        name=folder.name,
        peer_id=peer,
        final=curve[-1][1] if curve else None,
        curve=curve,
        rounds_completed=max((_int(r, "round") for r in rounds), default=0),
        # Rounds it really ran: a catch-up skips rounds, and skipped rounds are not training.
        rounds_trained=max((_int(r, "rounds_trained") for r in rounds), default=0),
        timed_out_rounds=sum(1 for r in rounds if r.get("timed_out")),
        restarts=sum(1 for r in records if r.get("event") == "resume"),
        caught_up=sum(1 for r in records if r.get("event") == "caught_up"),
        finished=any(r.get("event") == "done" and not r.get("stopped") for r in records),
        attack=next((str(r["attack"]) for r in records if r.get("attack")), ""),
        bytes_sent=_int(last, "bytes_sent"),
        bytes_received=_int(last, "bytes_received"),
        messages_sent=_int(last, "messages_sent"),
        messages_received=_int(last, "messages_received"),
        rejected=_counts(last, "rejected"),
        dropped=_counts(last, "dropped"),
        banned=_names(last, "banned"),
        refused_connections=_int(last, "refused_connections"),
        internal_errors=_int(last, "internal_errors"),
        io_errors=_counts(last, "io_errors"),
        aggregation_error=tuple(
            (_int(r, "round"), _value(r.get("aggregation_error")))
            for r in rounds
            if r.get("aggregation_error") is not None
        ),
        bytes_curve=tuple(
            (_int(r, "round"), float(_int(r, "bytes_sent"))) for r in rounds if "bytes_sent" in r
        ),
    )


# The node's own records, read as leniently as docs/node.md asks of readers: a
# counter that is missing or not a number counts as zero, never as a crash.
def _int(record: Mapping[str, Any], key: str) -> int:
    value = record.get(key, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _counts(record: Mapping[str, Any], key: str) -> dict[str, int]:
    table = record.get(key)
    return {str(k): _int(table, k) for k in table} if isinstance(table, dict) else {}


def _names(record: Mapping[str, Any], key: str) -> tuple[str, ...]:
    names = record.get(key)
    return tuple(str(name) for name in names) if isinstance(names, list) else ()


def _value(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def consensus_per_round(node_dirs: list[Path]) -> tuple[ConsensusPoint, ...]:
    """Consensus distance over the nodes' mixed adapters, per round (nodes that have a snapshot)."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for folder in node_dirs:
        for snap in sorted((folder / "snapshots").glob("round_*.safetensors")):
            round_ = int(snap.stem.split("_")[1])
            by_round.setdefault(round_, []).append(safetensors.numpy.load_file(str(snap)))
    return tuple(
        ConsensusPoint(r, consensus_distance(states), len(states))
        for r, states in sorted(by_round.items())
        if len(states) >= 2
    )


def membership_per_round(node_dirs: list[Path]) -> tuple[MembershipPoint, ...]:
    """Per round of an open network: members, components and live degrees (empty for fixed neighbours)."""
    views: dict[int, dict[str, set[str]]] = {}  # round -> node short id -> neighbours' short ids
    for folder in node_dirs:
        me = ""
        for record in read_metrics(folder / "metrics.jsonl"):
            me = str(record.get("peer", ""))[:10] or me
            view = record.get("active_view")
            if record.get("event") == "round" and isinstance(view, list) and _int(record, "round") > 0:
                views.setdefault(_int(record, "round"), {})[me] = {str(v) for v in view}
    points = []
    for round_, members in sorted(views.items()):
        graph = nx.Graph()
        graph.add_nodes_from(members)
        live = {m: [v for v in view if v in members] for m, view in members.items()}
        graph.add_edges_from((m, v) for m, view in live.items() for v in view)
        degrees = [len(view) for view in live.values()]
        low, mean = min(degrees), sum(degrees) / len(degrees)
        points.append(MembershipPoint(round_, len(members), nx.number_connected_components(graph), low, mean))
    return tuple(points)


def write_report(out: Path, summary: Summary) -> None:
    """report.md and the plots (``<metric>.png``, ``<metric>_bytes.png``, consensus.png, bytes.png)."""
    _plots(out, summary)
    (out / "report.md").write_text(_markdown(summary), encoding="utf-8")


def _plots(out: Path, summary: Summary) -> None:
    import matplotlib  # noqa: PLC0415  (only when drawing: reading a summary must not load it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    metric = summary.metric
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for node in summary.nodes:
        xs = [r for r, _ in node.curve]
        ys = [math.nan if v is None else v for _, v in node.curve]  # a gap where a round has no value
        ax.plot(xs, ys, marker="o", label=f"{node.name} (gossip)")
    baselines = summary.baselines or Baselines()
    if baselines.local is not None:
        ax.axhline(baselines.local, color="grey", linestyle="--", label="local-only (mean)")
    if baselines.pooled is not None:
        ax.axhline(baselines.pooled, color="black", linestyle=":", label="pooled")
    _finish(
        plt,
        fig,
        ax,
        out / f"{metric}.png",
        xlabel="round",
        ylabel=metric,
        title=f"{metric} per node per round",
    )

    fig, ax = plt.subplots(figsize=(7, 4))
    positive = [(c.round, c.consensus_distance) for c in summary.consensus if c.consensus_distance > 0]
    if positive:
        ax.semilogy([r for r, _ in positive], [d for _, d in positive], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance (after mixing)")
    ax.set_title("disagreement between nodes' adapters")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out / "consensus.png", dpi=100)
    plt.close(fig)

    _plot_metric_against_bytes(plt, out, summary)

    fig, ax = plt.subplots(figsize=(7, 4))
    index = np.arange(len(summary.nodes))
    ax.bar(index - 0.2, [n.bytes_sent / 1e6 for n in summary.nodes], 0.4, label="sent")
    ax.bar(index + 0.2, [n.bytes_received / 1e6 for n in summary.nodes], 0.4, label="received")
    ax.set_xticks(index, [n.name for n in summary.nodes])
    ax.set_ylabel("MB")
    ax.set_title("bytes per node")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bytes.png", dpi=100)
    plt.close(fig)


def _plot_metric_against_bytes(plt: Any, out: Path, summary: Summary) -> None:
    """``<metric>_bytes.png``: each node's metric at each evaluated round against the bytes it had sent."""
    metric = summary.metric
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for node in summary.nodes:
        sent = {r: b for r, b in node.bytes_curve if b is not None}
        points = [(sent[r] / 1e6, v) for r, v in node.curve if r in sent and v is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=node.name)
    title = f"{metric} against bytes sent"
    _finish(
        plt,
        fig,
        ax,
        out / f"{metric}_bytes.png",
        xlabel="MB sent by the node so far",
        ylabel=metric,
        title=title,
    )


def _finish(plt: Any, fig: Any, ax: Any, path: Path, *, xlabel: str, ylabel: str, title: str) -> None:
    """Label a per-node line plot (grid, small legend) and write it to ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(summary: Summary) -> str:
    metric, nodes, gossip_mean = summary.metric, summary.nodes, summary.mean_final
    lines = [
        f"# Scenario report: {summary.scenario}",
        "",
        f"- topology: `{summary.topology}` ({len(nodes)} nodes)",
        f"- model: `{summary.model}`, task {summary.task}, metric {metric}",
        f"- algorithm: {_algorithm_text(summary.algorithm)}",
        f"- wall time of the gossip run: {summary.wall_s:.0f} s",
        f"- every node finished cleanly: {summary.ok}",
        "",
        "## Results",
        "",
    ]
    if summary.baselines is not None:
        local = summary.baselines.local_per_node or {}
        lines += [
            f"| node | gossip {metric} | local-only {metric} | bytes sent | bytes received |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {_label(n)} | {_f(n.final)} | {_f(local.get(n.name))} | {_mb(n.bytes_sent)} "
            f"| {_mb(n.bytes_received)} |"
            for n in nodes
        ]
        lines += ["", f"- mean gossip {metric}{_over(summary)}: **{_f(gossip_mean)}**"]
        if (local_mean := summary.baselines.local) is not None:
            gap = _gap(gossip_mean, local_mean, metric)
            lines.append(f"- mean local-only {metric}: {_f(local_mean)} (gossip is {gap})")
        if (pooled := summary.baselines.pooled) is not None:
            lines.append(
                f"- pooled (one model on all shards, same steps per node): {_f(pooled)} "
                f"(gossip is {_gap(gossip_mean, pooled, metric)})"
            )
    else:
        lines += [f"| node | final {metric} | bytes sent | bytes received |", "|---|---|---|---|"]
        lines += [
            f"| {_label(n)} | {_f(n.final)} | {_mb(n.bytes_sent)} | {_mb(n.bytes_received)} |" for n in nodes
        ]
        lines += ["", f"- mean final {metric}{_over(summary)}: **{_f(gossip_mean)}**"]
    lines += ["", f"![{metric} per round]({metric}.png)", "", "## Per round", ""]
    lines += _rounds_table(summary)
    lines += [
        "",
        "![consensus distance](consensus.png)",
        "",
        f"![{metric} against bytes]({metric}_bytes.png)",
        "",
    ]
    if summary.membership:
        lines += _membership_table(summary)
    lines += ["## Network and faults", ""]
    lines += [
        "| node | rounds trained / reached | restarts | rounds timed out | dropped | rejected | banned |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {_label(n)} | {n.rounds_trained} / {n.rounds_completed} | {n.restarts} | {n.timed_out_rounds} "
        f"| {_counts_text(n.dropped)} | {_counts_text(n.rejected)} | {', '.join(n.banned) or '-'} |"
        for n in nodes
    ]
    lines += ["", "Faults injected: " + ("; ".join(summary.faults) or "none"), ""]
    lines += ["![bytes per node](bytes.png)", ""]
    return "\n".join(lines)


def _algorithm_text(algorithm: Mapping[str, str | float | bool]) -> str:
    if not algorithm:
        return "n/a"
    name = algorithm.get("algorithm", "dpsgd")
    rest = ", ".join(f"{key} {value}" for key, value in algorithm.items() if key != "algorithm")
    return f"`{name}` ({rest})" if rest else f"`{name}`"


def _rounds_table(summary: Summary) -> list[str]:
    """Per round: each node's metric, their mean, the mean MB a node had sent by then, the consensus
    distance and the LoRA aggregation error.

    The aggregation error is the mean over the nodes that mixed that round of
    ``||mean(B) mean(A) - mean(BA)|| / ||mean(BA)||`` of their own mix (0 when A is frozen).
    """
    nodes = summary.nodes
    by_node = [dict(node.curve) for node in nodes]
    errors: dict[int, list[float]] = {}
    for node in nodes:
        for round_, value in node.aggregation_error:
            if value is not None:
                errors.setdefault(round_, []).append(value)
    consensus = {c.round: c.consensus_distance for c in summary.consensus}
    sent: dict[int, list[float]] = {}
    for node in nodes:
        for round_, value in node.bytes_curve:
            if value is not None:
                sent.setdefault(round_, []).append(value)
    rounds = sorted({r for curve in by_node for r in curve} | set(consensus) | set(errors))
    if not rounds:
        return ["No round was recorded."]
    names = " | ".join(node.name for node in nodes)
    lines = [
        f"| round | {names} | mean {summary.metric} | MB sent per node | consensus distance "
        "| LoRA aggregation error |",
        "|---" * (len(nodes) + 5) + "|",
    ]
    for round_ in rounds:
        values = [curve.get(round_) for curve in by_node]
        present = [v for v in values if v is not None]
        mean = sum(present) / len(present) if present else None
        distance = consensus.get(round_)
        error = errors.get(round_)
        mb = sent.get(round_)
        lines.append(
            f"| {round_} | {' | '.join(_f(v) for v in values)} | {_f(mean)} "
            f"| {'-' if not mb else f'{sum(mb) / len(mb) / 1e6:.2f}'} "
            f"| {'-' if distance is None else f'{distance:.3e}'} "
            f"| {'-' if not error else f'{sum(error) / len(error):.3e}'} |"
        )
    return lines


def _membership_table(summary: Summary) -> list[str]:
    """An open network's rounds: members and degrees beside the mean metric and the consensus distance."""
    metric = summary.metric
    consensus = {c.round: c.consensus_distance for c in summary.consensus}
    values: dict[int, list[float]] = {}
    for node in summary.nodes:
        for round_, value in node.curve:
            if value is not None:
                values.setdefault(round_, []).append(value)
    lines = [
        "## Membership",
        "",
        f"| round | members | components | min degree | mean degree | mean {metric} | consensus distance |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in summary.membership:
        mean = sum(values[m.round]) / len(values[m.round]) if values.get(m.round) else None
        distance = consensus.get(m.round)
        lines.append(
            f"| {m.round} | {m.members} | {m.components} | {m.min_degree} | {m.mean_degree:.2f} | {_f(mean)} "
            f"| {'-' if distance is None else f'{distance:.3e}'} |"
        )
    return [*lines, ""]


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _mb(count_bytes: int) -> str:
    return f"{count_bytes / 1e6:.2f} MB"


def _label(node: NodeSummary) -> str:
    return f"{node.name} (attacker: {node.attack})" if node.is_attacker else node.name


def _over(summary: Summary) -> str:
    attackers = summary.attackers
    return f" (honest nodes; attackers: {', '.join(attackers)})" if attackers else ""


def _gap(ours: float | None, other: float | None, metric: Metric) -> str:
    """'12.3 points above' for accuracy; 'x.xx lower (better)' for perplexity."""
    if ours is None or other is None:
        return "n/a"
    if metric == "accuracy":
        diff = (ours - other) * 100
        return f"{abs(diff):.1f} points {'above' if diff >= 0 else 'below'}"
    diff = ours - other
    return f"{abs(diff):.2f} {'higher (worse)' if diff > 0 else 'lower (better)'}"


def _counts_text(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items()) if v) or "0"
