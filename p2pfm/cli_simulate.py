"""``p2pfm simulate``: real node loops on a topology, in-process, without a model (p2pfm/lab/sim.py).

Faults and attacks are given as flags (``--attack 3:scale:10``,
``--slow 2:3``, ``--crash 1:2:10``, ``--drop-link 0:3:0.3``) or taken from a
scenario file (``--scenario scenarios/faults.toml``: its topology, faults and
gossip rule; flags add to them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from p2pfm.core.compression import COMPRESSIONS
from p2pfm.core.errors import ArgumentError, ConfigError, LocalProtocolError

if TYPE_CHECKING:
    from p2pfm.core.topology import Topology
    from p2pfm.lab.scenario import Faults
    from p2pfm.lab.sim import SimConfig, SimResult

_MAX_NODE_ROWS = 32  # larger networks get a summary line instead of one row per node


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = commands.add_parser(
        "simulate", help="run real node loops in-process on a topology, without a model (virtual time)"
    )
    sim.add_argument(
        "spec", nargs="?",
        help="topology spec or file (default: the --scenario's), or 'overlay' for an open network (below)",
    )  # fmt: skip
    sim.add_argument("--rounds", type=int, help="rounds to run (default: the --scenario's gossip.rounds)")
    sim.add_argument("--scenario", type=Path, help="take topology, faults and gossip rule from this file")
    sim.add_argument("--dim", type=int, default=1000, help="vector length per node (default 1000)")
    sim.add_argument("--seed", type=int, default=0, help="seed for start vectors, keys and losses")
    sim.add_argument("--drop", type=float, default=0.0, metavar="P", help="loss probability per message")
    sim.add_argument(
        "--dtype", choices=["float32", "float64"], help="learners' dtype (default float32; overlay float64)"
    )
    sim.add_argument(
        "--rule", help="mixing rule, as gossip.rule: mean, trimmed-mean, median or clip (default mean)"
    )
    sim.add_argument("--trim", type=int, help="trimmed-mean: values dropped at each end (default 1)")
    sim.add_argument("--byzantine-weight", type=float, help="clip: weight share clipped (default 0.25)")
    sim.add_argument("--steps", type=int, default=0, help="local steps per round on f_i(x) = |x - c_i|^2/2")
    sim.add_argument("--lr", type=float, default=0.1, help="local step size (default 0.1)")
    sim.add_argument("--noise", type=float, default=0.0, help="gradient noise (default 0)")
    sim.add_argument(
        "--attack", action="append", default=[], metavar="NODE:KIND[:FACTOR]",
        help="node NODE attacks (scale, noise, signflip, replay, forge, wrong-model, equivocate, far-future)",
    )  # fmt: skip
    sim.add_argument("--slow", action="append", default=[], metavar="NODE:FACTOR", help="a slow node")
    sim.add_argument(
        "--crash", action="append", default=[], metavar="NODE:ROUND[:RESTART_S]",
        help="node NODE dies after round ROUND and resumes RESTART_S virtual seconds later (default 5)",
    )  # fmt: skip
    sim.add_argument("--drop-link", action="append", default=[], metavar="A:B:P", help="a lossy link")
    sim.add_argument(
        "--deadline", choices=["adaptive", "fixed"],
        help="as gossip.deadline: wait as long as neighbours take, or always the timeout (default adaptive)",
    )  # fmt: skip
    sim.add_argument(
        "--overlap",
        action="store_true",
        default=None,
        help="as gossip.overlap: exchange beside the next round's local steps, mix applied a round late",
    )
    sim.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        help="as gossip.compression: send compressed differences of public estimates (default none)",
    )
    sim.add_argument("--compression-step", type=float, help="as gossip.compression_step (default 1.0)")
    sim.add_argument("--workers", type=int, help="processes (default: one per core for big networks)")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    overlay = sim.add_argument_group(
        "overlay", "p2pfm simulate overlay --nodes N --degree D --rounds R: membership keeps the neighbours "
        "(docs/membership.md); --crash takes FRACTION@ROUND there"
    )  # fmt: skip
    overlay.add_argument("--nodes", type=int, help="overlay: nodes at the start")
    overlay.add_argument("--degree", type=int, default=6, help="overlay: active view size (default 6)")
    overlay.add_argument(
        "--bootstrap-only", action="store_true", help="overlay: all start knowing only node 0"
    )
    overlay.add_argument("--join", metavar="COUNT@ROUND", help="overlay: COUNT new nodes join after ROUND")
    overlay.add_argument(
        "--leave", metavar="COUNT@ROUND", help="overlay: COUNT nodes leave gracefully after ROUND"
    )
    sim.set_defaults(run=run, simulate_parser=sim)


def run(args: argparse.Namespace) -> int:
    if args.spec == "overlay":
        return run_overlay(args)
    from p2pfm.lab.scenario import Faults, load_scenario  # noqa: PLC0415
    from p2pfm.lab.sim import fit_decay_rate, float_floor, simulate  # noqa: PLC0415

    spec, rounds, faults = args.spec, args.rounds, Faults()
    gossip: dict[str, Any] = {}
    if args.scenario is not None:
        scenario = load_scenario(args.scenario)
        spec = spec or scenario.header.topology
        faults = scenario.faults
        gossip = dict(scenario.templates.get("gossip", {}))
        rounds = rounds if rounds is not None else gossip.get("rounds", 10)
    if spec is None or rounds is None:  # a usage error (exit status 2), as argparse's own
        args.simulate_parser.error("a topology spec and --rounds are required (or a --scenario with both)")
    try:
        config = _config(args, spec, rounds, gossip, faults)
    except ArgumentError as exc:  # name the flag (or the scenario's field) the value came from
        raise ConfigError(
            _FLAG_OF.get(exc.argument, "--" + exc.argument.replace("_", "-")), exc.problem
        ) from None
    result = simulate(config)
    if args.json:
        print(json.dumps(result.as_json()))
        return 0
    console = Console()
    table = Table(title=f"real node loops on {result.topology} ({result.nodes} nodes, virtual time)")
    for column in ("round", "consensus distance", "messages", "delivered", "bytes"):
        table.add_column(column, justify="right")
    for row in result.rounds:
        cells = (row.round, f"{row.consensus_distance:.3e}", row.messages, row.delivered, row.bytes)
        table.add_row(*(str(cell) for cell in cells))
    console.print(table)
    _print_nodes(console, result)
    predicted = result.lambda2**2
    console.print(f"lambda2 = {result.lambda2:.6f}; predicted decay per round lambda2^2 = {predicted:.6f}")
    distances = [r.consensus_distance for r in result.rounds]
    try:
        measured = fit_decay_rate(distances, floor=float_floor(config.dtype))
    except LocalProtocolError as exc:
        console.print(f"measured decay: not enough rounds to fit ({exc})")
    else:
        ratio = measured / predicted
        console.print(f"measured decay per round = {measured:.6f} (ratio to predicted {ratio:.4f})")
    if result.rejected:
        console.print(f"[bold red]{result.rejected} messages were rejected[/]")
    return 0


# SimConfig's fields whose flag is not "--" + the field's name with dashes, or that come from the scenario.
_FLAG_OF = {
    "drop_prob": "--drop",
    "local_steps": "--steps",
    "keyframe_every": "gossip.keyframe_every",
    "round_timeout_s": "gossip.round_timeout_s",
    "faults": "faults",
}


def _config(
    args: argparse.Namespace, spec: str, rounds: int, gossip: dict[str, Any], faults: Faults
) -> SimConfig:
    """The simulation the flags (over the scenario's ``[gossip]``, when one is given) ask for."""
    from p2pfm.core.topology import parse_topology  # noqa: PLC0415
    from p2pfm.lab.sim import SimConfig  # noqa: PLC0415

    return SimConfig(
        spec, rounds, dim=args.dim, seed=args.seed, drop_prob=args.drop, dtype=args.dtype or "float32",
        rule=args.rule or gossip.get("rule", "mean"),
        trim=_pick(args.trim, gossip.get("trim", 1)),
        byzantine_weight=_pick(args.byzantine_weight, gossip.get("byzantine_weight", 0.25)),
        local_steps=args.steps, lr=args.lr, noise=args.noise,
        faults=_with_flags(faults, args, parse_topology(spec)),
        workers=args.workers, round_timeout_s=float(gossip.get("round_timeout_s", 30.0)),
        deadline=_pick(args.deadline, gossip.get("deadline", "adaptive")),
        overlap=bool(_pick(args.overlap, gossip.get("overlap", False))),
        compression=_pick(args.compression, gossip.get("compression", "none")),
        compression_step=float(_pick(args.compression_step, gossip.get("compression_step", 1.0))),
        keyframe_every=int(gossip.get("keyframe_every", 50)),
    )  # fmt: skip


def _with_flags(faults: Faults, args: argparse.Namespace, topology: Topology) -> Faults:
    """The scenario's faults plus the ones given as flags (a bad flag value names the flag).

    Each flag's fault gets the checks of a scenario file's (``check_faults``).
    """
    from p2pfm.lab.scenario import Attack, Crash, Drop, Faults, Slow, check_faults  # noqa: PLC0415

    fields = {"--attack": "attack", "--crash": "crash", "--slow": "slow", "--drop-link": "drop"}

    def build(flag: str, values: list[str], counts: tuple[int, ...], make: Any) -> list[Any]:
        out = []
        for text in values:
            parts = text.split(":")
            if len(parts) not in counts:
                expected = " or ".join(map(str, counts))
                raise ConfigError(flag, f"expected {expected} fields separated by ':', got {text!r}")
            try:
                fault = make(*parts)
            except ValueError as exc:
                raise ConfigError(flag, f"{text!r}: {exc}") from None
            try:
                check_faults(Faults(**{fields[flag]: (fault,)}), topology)
            except ConfigError as exc:
                raise ConfigError(flag, f"{text!r}: {exc.field.split('.')[-1]} {exc.problem}") from None
            out.append(fault)
        return out

    def attack(node: str, kind: str, factor: str | None = None) -> Attack:
        return Attack(node=int(node), kind=kind, factor=None if factor is None else float(factor))  # type: ignore[arg-type]

    def crash(node: str, round_: str, restart_s: str = "5") -> Crash:
        return Crash(node=int(node), round=int(round_), restart_after_s=float(restart_s))

    def slow(node: str, factor: str) -> Slow:
        return Slow(node=int(node), factor=float(factor))

    def drop(a: str, b: str, prob: str) -> Drop:
        return Drop(prob=float(prob), link=(int(a), int(b)))

    return Faults(
        attack=(*faults.attack, *build("--attack", args.attack, (2, 3), attack)),
        crash=(*faults.crash, *build("--crash", args.crash, (2, 3), crash)),
        slow=(*faults.slow, *build("--slow", args.slow, (2,), slow)),
        drop=(*faults.drop, *build("--drop-link", args.drop_link, (3,), drop)),
    )


def _print_nodes(console: Console, result: SimResult) -> None:
    nodes = result.node_results
    honest = [n for n in nodes if not n.attack]
    if len(nodes) <= _MAX_NODE_ROWS and (len(honest) < len(nodes) or any(n.crashes for n in nodes)):
        table = Table(title="nodes")
        for column in ("node", "attack", "distance", "rounds trained", "crashes", "rejected", "banned"):
            table.add_column(column)
        for n in nodes:
            rejected = ", ".join(f"{k} {v}" for k, v in sorted(n.rejected.items())) or "-"
            table.add_row(
                n.name, n.attack or "-", f"{n.distance:.3e}", f"{n.rounds_trained}/{n.rounds_completed}",
                str(n.crashes), rejected, ", ".join(n.banned) or "-",
            )  # fmt: skip
        console.print(table)
    if honest:
        distances = [n.distance for n in honest]
        console.print(
            f"honest nodes: distance to the optimum mean {sum(distances) / len(distances):.3e}, "
            f"worst {max(distances):.3e}; virtual time {result.virtual_time_s:.1f} s"
        )


def _pick(flag: Any, default: Any) -> Any:
    return default if flag is None else flag


def run_overlay(args: argparse.Namespace) -> int:
    """``p2pfm simulate overlay``: an open network whose neighbours come from membership."""
    from p2pfm.lab.overlay_sim import OverlayConfig, simulate_overlay  # noqa: PLC0415

    if args.nodes is None or args.rounds is None:
        args.simulate_parser.error("overlay needs --nodes and --rounds")
    if len(args.crash) > 1:
        raise ConfigError("--crash", "overlay takes one FRACTION@ROUND")
    try:
        config = OverlayConfig(
            nodes=args.nodes, rounds=args.rounds, degree=args.degree, bootstrap_only=args.bootstrap_only,
            crash=_at("--crash", args.crash[0], float) if args.crash else None,
            join=_at("--join", args.join, int), leave=_at("--leave", args.leave, int),
            seed=args.seed, dim=args.dim, dtype=args.dtype or "float64",
            attacks=_overlay_attacks(args.attack), rule=args.rule or "mean", trim=_pick(args.trim, 1),
            byzantine_weight=_pick(args.byzantine_weight, 0.25),
        )  # fmt: skip
    except LocalProtocolError as exc:
        raise ConfigError("simulate overlay", str(exc)) from None
    result = simulate_overlay(config)
    if args.json:
        print(json.dumps(result.as_json()))
        return 0
    console = Console()
    table = Table(title=f"open network: {config.nodes} nodes, degree {config.degree} (virtual time)")
    for column in ("round", "members", "components", "min view", "mean view", "consensus distance"):
        table.add_column(column, justify="right")
    for row in result.rounds:
        cells = (
            row.round, row.members, row.components, row.min_active_view, f"{row.mean_active_view:.2f}",
            f"{row.consensus_distance:.3e}",
        )  # fmt: skip
        table.add_row(*(str(cell) for cell in cells))
    console.print(table)
    console.print(f"control messages sent: {dict(sorted(result.control_sent.items()))}")
    console.print(f"view changes: {dict(sorted(result.view_changes.items()))}")
    if config.attacks:
        console.print(
            f"honest drift (how far the attackers moved the honest average): {result.honest_drift:.3e}"
        )
    if result.control_rejected or result.rejected:
        console.print(f"refused: control {result.control_rejected}, updates {result.rejected}")
    return 0


def _overlay_attacks(values: list[str]) -> tuple[tuple[int, str, float | None], ...]:
    out = []
    for text in values:
        parts = text.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError("expected NODE:KIND[:FACTOR]")
            out.append((int(parts[0]), parts[1], float(parts[2]) if len(parts) == 3 else None))
        except ValueError as exc:
            raise ConfigError("--attack", f"{text!r}: {exc}") from None
    return tuple(out)


def _at(flag: str, text: str | None, kind: type[Any]) -> tuple[Any, int] | None:
    """``AMOUNT@ROUND`` -> (amount, round); a bad value names the flag."""
    if text is None:
        return None
    amount, sep, round_ = text.partition("@")
    try:
        if not sep:
            raise ValueError("expected AMOUNT@ROUND")
        return kind(amount), int(round_)
    except ValueError:
        raise ConfigError(flag, f"expected AMOUNT@ROUND (e.g. 0.5@20 or 64@30), got {text!r}") from None
