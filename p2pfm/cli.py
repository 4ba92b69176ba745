"""The ``p2pfm`` command: argument parsing, logging set-up and display, nothing else.

Every operator mistake surfaces as a :class:`UserInputError` (or a
:class:`LocalProtocolError` for a nonsensical numeric option); ``main``
prints it on one line as ``p2pfm: error: ...`` and exits with status 1,
never with a traceback. A local run whose node failed
(:class:`NodeFailedError`) ends the same way, naming the node and its log.

Messages go through stdlib ``logging`` (one logger per module, the node's
name in the records of node code, p2pfm/core/logs.py); ``-v`` and ``-q``
(before or after the subcommand) set how much of it is shown.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from p2pfm import __version__, cli_launch, cli_roster, cli_simulate
from p2pfm.core.errors import LocalProtocolError, NodeFailedError, UserInputError

if TYPE_CHECKING:
    from p2pfm.lab.summary import Summary

EXIT_ERROR = 1
_LEVELS = (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)
#: Commands whose INFO messages are per simulated node and round: quiet unless -v.
_QUIET_BY_DEFAULT = frozenset({"simulate"})
#: One example per subcommand, shown by its --help (cli_simulate, cli_roster and cli_launch keep theirs).
_EXAMPLES = {
    "keygen": "p2pfm keygen --out keys/alice.key",
    "peer-id": "p2pfm peer-id keys/alice.key",
    "evidence check": "p2pfm evidence check runs/attack-ring-mean-*/nodes/node0/evidence/*.msgpack",
    "roster init": "p2pfm roster init roster.toml --network my-network",
    "roster add": "p2pfm roster add roster.toml --name alice --key keys/alice.key "
    "--address tcp://203.0.113.7:5550",
    "roster remove": "p2pfm roster remove roster.toml alice",
    "roster check": "p2pfm roster check roster.toml",
    "roster show": "p2pfm roster show roster.signed --network my-network",
    "topology show": "p2pfm topology show torus:4x4 --png torus.png",
    "node": "p2pfm node --config node.toml --bootstrap tcp://203.0.113.7:5550",
    "run": "p2pfm run scenarios/faults.toml --out runs/faults",
    "demo": "p2pfm demo -q",
    "report": "p2pfm report runs/quickstart-20261207-101500",
    "simulate": "p2pfm simulate ring:16 --rounds 30 --attack 3:scale:10 --rule clip",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfm",
        description="Serverless peer-to-peer co-training of foundation models.",
    )
    parser.add_argument("--version", action="version", version=f"p2pfm {__version__}")
    _add_verbosity(parser, default=0)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="create an Ed25519 key file and print its peer id")
    keygen.add_argument("--out", type=Path, required=True, help="key file to create (mode 0600)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key file")
    keygen.set_defaults(run=_cmd_keygen)

    peer_id = commands.add_parser("peer-id", help="check a key file and print its peer id")
    peer_id.add_argument("key", type=Path, help="key file written by `p2pfm keygen`")
    peer_id.set_defaults(run=_cmd_peer_id)

    _add_roster_commands(commands)

    topology = commands.add_parser("topology", help="inspect topologies")
    topo_commands = topology.add_subparsers(dest="topology_command", required=True, metavar="COMMAND")
    show = topo_commands.add_parser("show", help="print size, degrees and spectral gap of a topology")
    show.add_argument("spec", help="e.g. ring:8, torus:4x4, exp:16, or a .graphml/.json/edge-list file")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.add_argument("--png", type=Path, metavar="FILE", help="also draw the graph to FILE")
    show.set_defaults(run=_cmd_topology_show)

    node = commands.add_parser("node", help="run one gossip node from a config file")
    node.add_argument("--config", type=Path, required=True, help="node TOML file (docs/node.md)")
    node.add_argument("--resume", action="store_true", help="continue from the node's last checkpoint")
    node.add_argument(
        "--bootstrap", action="append", default=[], metavar="tcp://HOST:PORT",
        help="join an open network through this member's node.listen address (repeatable; adds to "
        "membership.bootstrap; docs/membership.md)",
    )  # fmt: skip
    node.set_defaults(run=_cmd_node)

    run = commands.add_parser("run", help="run a local multi-node scenario and write its report")
    run.add_argument("scenario", type=Path, help="scenario TOML file (docs/scenarios.md)")
    run.add_argument("--out", type=Path, help="output folder (default runs/NAME-TIMESTAMP)")
    run.set_defaults(run=_cmd_run)

    demo = commands.add_parser("demo", help="run scenarios/quickstart.toml (4 nodes, MiniLM, BBC News)")
    demo.add_argument("--out", type=Path, help="output folder (default runs/quickstart-TIMESTAMP)")
    demo.set_defaults(run=_cmd_demo)

    report = commands.add_parser("report", help="print a run's results, redraw report.md from summary.json")
    report.add_argument("folder", type=Path, metavar="RUN", help="output folder of `p2pfm run` / `demo`")
    report.set_defaults(run=_cmd_report)

    cli_simulate.add_parser(commands)
    cli_launch.add_parser(commands)
    _finish_subcommands(parser, (), set())
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    """-v / -q; a subcommand's copies default to SUPPRESS so they never reset what the top level got."""
    parser.add_argument(
        "-v", "--verbose", action="count", default=default, help="show more (-vv: debug messages)"
    )
    parser.add_argument(
        "-q", "--quiet", action="count", default=default, help="show only warnings and errors"
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text" if default == 0 else default,
        help="text lines, or one JSON object per record (for log collectors); default text",
    )  # fmt: skip


def _finish_subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...], seen: set[int]) -> None:
    """Give every subcommand -v / -q and its example (shown by --help), walking the whole tree."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a subcommand already finished
                continue
            seen.add(id(sub))
            here = (*path, name)
            _add_verbosity(sub, default=argparse.SUPPRESS)
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            if not sub.epilog and " ".join(here) in _EXAMPLES:
                sub.epilog = f"example:\n  {_EXAMPLES[' '.join(here)]}"
            _finish_subcommands(sub, here, seen)


def configure_logging(verbosity: int, console: Console | None = None, *, json_lines: bool = False) -> None:
    """Show p2pfm's log records at the level ``verbosity`` asks for (0 = INFO, 1 = DEBUG, -1 = WARNING).

    On ``console`` (a terminal with a live table) through rich; otherwise as
    plain timestamped lines on stderr, or with ``json_lines`` one JSON object
    per record (``time_s``, ``level``, ``logger``, ``node``, ``message``).
    Other libraries' loggers are left alone.
    """
    logger = logging.getLogger("p2pfm")
    logger.setLevel(_LEVELS[max(0, min(len(_LEVELS) - 1, verbosity + 2))])
    for old in list(logger.handlers):
        if not isinstance(old, logging.NullHandler):
            logger.removeHandler(old)
    handler: logging.Handler
    if console is not None:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(node_prefix)s%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            _JsonLines()
            if json_lines
            else logging.Formatter(
                "%(asctime)s %(levelname)s %(node_prefix)s%(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    handler.addFilter(_node_prefix)
    logger.addHandler(handler)


class _JsonLines(logging.Formatter):
    """One JSON object per record, for log collectors (``--log-format json``)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time_s": record.created,
            "level": record.levelname,
            "logger": record.name,
            "node": getattr(record, "node", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _node_prefix(record: logging.LogRecord) -> bool:
    """Show the node a record is about (``record.node``, set by p2pfm.core.logs.node_logger)."""
    node = getattr(record, "node", None)
    record.node_prefix = f"[{node}] " if node else ""
    return True


def _verbosity(args: argparse.Namespace) -> int:
    base = -1 if args.command in _QUIET_BY_DEFAULT else 0
    return base + int(getattr(args, "verbose", 0) or 0) - int(getattr(args, "quiet", 0) or 0)


def _add_roster_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evidence = commands.add_parser("evidence", help="verify proofs that a peer equivocated")
    evidence_commands = evidence.add_subparsers(dest="evidence_command", required=True, metavar="ACTION")
    check_proof = evidence_commands.add_parser(
        "check", help="verify a proof file from a node's evidence/ folder"
    )
    check_proof.add_argument("file", type=Path, nargs="+", help="equivocation-*.msgpack file(s)")
    check_proof.set_defaults(run=_cmd_evidence_check)

    roster = commands.add_parser("roster", help="create, edit and check a network's member roster")
    roster_commands = roster.add_subparsers(dest="roster_command", required=True, metavar="COMMAND")
    init = roster_commands.add_parser("init", help="start an empty roster for a network")
    init.add_argument("file", type=Path)
    init.add_argument("--network", required=True, help="network id (node.network of every member)")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.set_defaults(run=_cmd_roster_init)
    add = roster_commands.add_parser("add", help="add a member by key file or peer id")
    add.add_argument("file", type=Path)
    add.add_argument("--name", required=True)
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--key", type=Path, help="the member's key file (only its public key is used)")
    who.add_argument("--id", help="the member's peer id (64 hex digits)")
    add.add_argument("--address", help="where the member listens, e.g. tcp://203.0.113.7:5550")
    add.set_defaults(run=_cmd_roster_add)
    remove = roster_commands.add_parser("remove", help="remove a member by name")
    remove.add_argument("file", type=Path)
    remove.add_argument("name")
    remove.set_defaults(run=_cmd_roster_remove)
    check = roster_commands.add_parser("check", help="validate a roster and list its members")
    check.add_argument("file", type=Path)
    check.set_defaults(run=_cmd_roster_check)
    cli_roster.add_parsers(roster_commands)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    args.verbosity = _verbosity(args)
    if args.command not in ("run", "demo"):  # those pick their handler with their display
        configure_logging(args.verbosity, json_lines=args.log_format == "json")
    try:
        code: int = args.run(args)
    except (UserInputError, LocalProtocolError, NodeFailedError) as exc:
        print(f"p2pfm: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return code


def _cmd_keygen(args: argparse.Namespace) -> int:
    from p2pfm.core.identity import Identity, write_key_file

    identity = Identity.generate()
    write_key_file(identity, args.out, force=args.force)
    print(identity.peer_id.hex)
    return 0


def _cmd_peer_id(args: argparse.Namespace) -> int:
    from p2pfm.core.identity import load_key_file

    print(load_key_file(args.key).peer_id.hex)
    return 0


def _cmd_evidence_check(args: argparse.Namespace) -> int:
    from p2pfm.core.evidence import check_evidence_file

    for path in args.file:
        facts = check_evidence_file(path)
        print(
            f"{path}: valid proof: peer {facts.accused.hex} signed two different updates "
            f"for round {facts.round} of network {facts.network!r}"
        )
    return 0


def _cmd_roster_init(args: argparse.Namespace) -> int:
    from p2pfm.config.roster import Roster, save_roster
    from p2pfm.core.errors import ConfigError

    if args.file.exists() and not args.force:
        raise ConfigError("roster", f"{args.file} already exists; pass --force to overwrite it")
    save_roster(Roster(args.network), args.file)
    print(f"created {args.file} for network {args.network!r} (no members yet)")
    return 0


def _cmd_roster_add(args: argparse.Namespace) -> int:
    from p2pfm.config.roster import Member, load_roster, save_roster
    from p2pfm.config.schema import check_address
    from p2pfm.core.errors import ConfigError
    from p2pfm.core.identity import PeerId, load_key_file

    roster = load_roster(args.file)
    if args.key is not None:
        peer = load_key_file(args.key).peer_id
    else:
        try:
            peer = PeerId.from_hex(args.id)
        except ValueError as exc:
            raise ConfigError("--id", str(exc)) from None
    address = None if args.address is None else check_address("--address", args.address)
    save_roster(roster.with_member(Member(args.name, peer, address)), args.file)
    print(f"added {args.name} ({peer.hex}) to {args.file}")
    return 0


def _cmd_roster_remove(args: argparse.Namespace) -> int:
    from p2pfm.config.roster import load_roster, save_roster

    save_roster(load_roster(args.file).without(args.name), args.file)
    print(f"removed {args.name} from {args.file}")
    return 0


def _cmd_roster_check(args: argparse.Namespace) -> int:
    from p2pfm.config.roster import load_roster

    roster = load_roster(args.file)
    print(f"{args.file}: network {roster.network!r}, {len(roster.members)} members, valid")
    width = max((len(m.name) for m in roster.members), default=0)
    for member in roster.members:  # plain lines: peer ids must never be truncated
        print(f"  {member.name:<{width}}  {member.id.hex}  {member.address or '-'}")
    return 0


def _cmd_topology_show(args: argparse.Namespace) -> int:
    from p2pfm.core.schedule import schedule_stats
    from p2pfm.core.topology import parse_topology, spectral_stats
    from p2pfm.lab.plots import draw_png

    topology = parse_topology(args.spec)
    doc: dict[str, object] = dict(spectral_stats(topology).as_json())
    if topology.schedule is not None:
        doc.update(schedule_stats(topology.schedule))
    if args.png is not None:
        draw_png(topology, args.png)
    if args.json:
        print(json.dumps(doc))
        return 0
    table = Table(title=f"topology {args.spec}", show_header=False)
    for key, value in doc.items():
        table.add_row(key, f"{value:.6f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if args.png is not None:
        print(f"drew {args.png}")
    return 0


def _cmd_node(args: argparse.Namespace) -> int:
    import signal
    import threading

    from p2pfm.config.node_config import load_node_config, with_bootstrap
    from p2pfm.node.factory import build_node

    config = with_bootstrap(load_node_config(args.config), args.bootstrap)
    stop = threading.Event()

    def _request_stop(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info(
            f"{signal.Signals(signum).name} received, stopping at the end of this round"
        )
        stop.set()

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    node = build_node(config, resume=args.resume, stop=stop)
    result = node.run()
    if not result.adapter_saved:
        return EXIT_ERROR
    return 0 if not result.stopped else 130


def _cmd_run(args: argparse.Namespace) -> int:
    from p2pfm.lab.progress import LineView, LiveView, ProgressView
    from p2pfm.lab.scenario import run_scenario

    console = Console()
    view: ProgressView
    if console.is_terminal and args.verbosity >= 0 and args.log_format == "text":
        configure_logging(args.verbosity, console)
        view = LiveView(console, f"{args.scenario.stem}: nodes")
    else:
        configure_logging(args.verbosity, json_lines=args.log_format == "json")
        view = LineView()
    try:
        summary = run_scenario(args.scenario, args.out, view=view)
    finally:
        view.close()
    _print_summary(summary)
    return 0 if summary.ok else EXIT_ERROR


def _cmd_demo(args: argparse.Namespace) -> int:
    from p2pfm.lab.scenario import QUICKSTART

    args.scenario = QUICKSTART
    return _cmd_run(args)


def _cmd_report(args: argparse.Namespace) -> int:
    from p2pfm.lab.report import write_report
    from p2pfm.lab.summary import read_summary

    summary = read_summary(args.folder / "summary.json")
    write_report(args.folder, summary)
    _print_summary(summary)
    print(f"report: {args.folder / 'report.md'}")
    return 0


def _print_summary(summary: Summary) -> None:
    metric = summary.metric
    table = Table(title=f"scenario {summary.scenario}: final {metric}")
    table.add_column("node")
    table.add_column(f"gossip {metric}", justify="right")
    local = (summary.baselines.local_per_node if summary.baselines else None) or {}
    if local:
        table.add_column(f"local-only {metric}", justify="right")
    for node in summary.nodes:
        row = [node.name, _num(node.final)]
        if local:
            row.append(_num(local.get(node.name)))
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(f"mean gossip {metric}: {_num(summary.mean_final)}")
    if summary.baselines is not None:
        for name, value in (("local", summary.baselines.local), ("pooled", summary.baselines.pooled)):
            if value is not None:
                console.print(f"{name} baseline: {_num(value)}")


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
