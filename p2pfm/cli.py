"""The ``p2pfm`` command: argument parsing and display, nothing else.

Every operator mistake surfaces as a :class:`UserInputError` (or a
:class:`LocalProtocolError` for a nonsensical numeric option); ``main``
prints it on one line as ``p2pfm: error: ...`` and exits with status 1,
never with a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from p2pfm import __version__, cli_roster, cli_simulate
from p2pfm.core.errors import LocalProtocolError, UserInputError

if TYPE_CHECKING:
    from p2pfm.lab.summary import Summary

EXIT_ERROR = 1


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pfm",
        description="Serverless peer-to-peer co-training of foundation models.",
    )
    parser.add_argument("--version", action="version", version=f"p2pfm {__version__}")
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
    return parser


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
    try:
        code: int = args.run(args)
    except (UserInputError, LocalProtocolError) as exc:
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
        print(f"p2pfm: {signal.Signals(signum).name} received, stopping at the end of this round", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    node = build_node(config, resume=args.resume, stop=stop, log=lambda line: print(line, flush=True))
    result = node.run()
    if not result.adapter_saved:
        return EXIT_ERROR
    return 0 if not result.stopped else 130


def _cmd_run(args: argparse.Namespace) -> int:
    from p2pfm.lab.scenario import run_scenario

    summary = run_scenario(args.scenario, args.out, log=lambda line: print(line, flush=True))
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
