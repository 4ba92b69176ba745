"""``p2pfm roster sign | show | publish``: an open network's signed, versioned roster (docs/membership.md).

``sign`` turns a roster file (``p2pfm roster init/add/remove``) into a roster
document signed by an admin key, with a version; ``show`` checks one and
lists it; ``publish`` hands a newer one to any running member, which passes
it on to every other member within a few rounds. Nobody restarts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pfm.core.errors import ConfigError, RemoteProtocolError


def add_parsers(roster_commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sign = roster_commands.add_parser(
        "sign", help="sign a roster file as a version of the network's roster document",
        epilog="example: p2pfm roster sign roster.toml --key admin.key --version 2 --out roster.signed",
    )  # fmt: skip
    sign.add_argument("file", type=Path, help="roster file (p2pfm roster init/add/remove)")
    sign.add_argument(
        "--key", type=Path, required=True, help="an admin's key file (of the version members hold)"
    )
    sign.add_argument("--version", type=int, required=True, help="higher than the version members hold")
    sign.add_argument(
        "--admin", action="append", default=[], metavar="PEER_ID",
        help="a key that may sign the next version (repeatable; default: the signer's)",
    )  # fmt: skip
    sign.add_argument("--out", type=Path, help="output file (default: FILE with suffix .signed)")
    sign.set_defaults(run=_cmd_sign)
    show = roster_commands.add_parser("show", help="check a signed roster document and list it")
    show.add_argument("file", type=Path)
    show.add_argument("--network", required=True, help="the network id it must be for")
    show.set_defaults(run=_cmd_show)
    publish = roster_commands.add_parser(
        "publish", help="hand a newer signed roster to a running member (it reaches every member)",
        epilog="example: p2pfm roster publish roster.signed --to tcp://203.0.113.7:5550 --key admin.key",
    )  # fmt: skip
    publish.add_argument("file", type=Path)
    publish.add_argument(
        "--to", required=True, metavar="tcp://HOST:PORT", help="a member's node.listen address"
    )
    publish.add_argument(
        "--key", type=Path, required=True, help="the admin key that signed it (or another admin)"
    )
    publish.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to reach the member (default 10)"
    )
    publish.set_defaults(run=_cmd_publish)


def _cmd_sign(args: argparse.Namespace) -> int:
    from p2pfm.config.roster import load_roster  # noqa: PLC0415
    from p2pfm.core.identity import PeerId, load_key_file  # noqa: PLC0415
    from p2pfm.core.records import make_roster_document  # noqa: PLC0415

    roster = load_roster(args.file)
    admin = load_key_file(args.key)
    if args.version < 1:
        raise ConfigError(
            "--version", f"must be >= 1 (version 0 is the unsigned static roster), got {args.version}"
        )
    try:
        admins = [PeerId.from_hex(text) for text in args.admin] or [admin.peer_id]
    except ValueError as exc:
        raise ConfigError("--admin", str(exc)) from None
    document = make_roster_document(
        admin, network=roster.network, version=args.version, members=roster.ids, admins=admins
    )
    out = args.out or args.file.with_suffix(".signed")
    out.write_bytes(document.signed)
    print(
        f"{out}: roster version {document.version} of {roster.network!r}, {len(document.members)} members, "
        f"{len(document.admins)} admins, signed by {admin.peer_id.short}"
    )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from p2pfm.core.records import open_roster_document  # noqa: PLC0415

    try:
        document = open_roster_document(_read(args.file), args.network)
    except RemoteProtocolError as exc:
        raise ConfigError(
            "roster", f"{args.file} is not a valid signed roster for {args.network!r}: {exc}"
        ) from None
    print(f"{args.file}: version {document.version} of {document.network!r}, signed by {document.signer.hex}")
    print(f"open: {document.open}")
    for kind, keys in (("admin", document.admins), ("member", document.members)):
        for peer in sorted(keys, key=lambda p: p.hex):
            print(f"{kind:<7} {peer.hex}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from p2pfm.config.schema import check_address  # noqa: PLC0415
    from p2pfm.core.identity import load_key_file  # noqa: PLC0415
    from p2pfm.core.records import RosterDocument, open_roster_document  # noqa: PLC0415
    from p2pfm.net.zmq_control import publish_roster  # noqa: PLC0415
    from p2pfm.node.open_network import ports  # noqa: PLC0415

    address = check_address("--to", args.to)
    data = _read(args.file)
    admin = load_key_file(args.key)
    try:
        _, _, hello, _ = ports(address)  # the member's hello endpoint (port + 2)
    except ConfigError as exc:
        raise ConfigError("--to", exc.problem) from None
    try:
        document: RosterDocument = open_roster_document(data, None)  # the member checks the network
    except RemoteProtocolError as exc:
        raise ConfigError("roster", f"{args.file} is not a valid signed roster: {exc}") from None
    try:
        record = publish_roster(
            data, hello, admin, document.network, roster_version=document.version, timeout_s=args.timeout
        )
    except (TimeoutError, RemoteProtocolError) as exc:
        raise ConfigError("--to", f"could not hand the roster to {address}: {exc}") from None
    print(f"roster version {document.version} handed to {record.peer.short} at {record.address}")
    return 0


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError("roster", f"cannot read {path}: {exc}") from None
