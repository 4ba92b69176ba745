"""What a networked node needs to join an open network: its roster, its record, its ports, its contacts.

``build_node`` (p2pfm/node/factory.py) calls these when the config has a
``[membership]`` section. The conventions (docs/membership.md):

- a node receives updates on ``node.listen`` (port P), control messages on
  port P + 1 and serves its signed peer record ("hello") on port P + 2;
- its record lists ``tcp://ADVERTISE:P+1`` (control) then
  ``tcp://ADVERTISE:P`` (updates), with a ``seq`` from the wall clock, so a
  restarted node's newer record replaces the old one everywhere;
- a bootstrap address is a member's ``node.listen``: its hello at P + 2
  tells its peer id, which is believed only with a valid signature and when
  the roster admits it;
- the roster is a signed document (``membership.roster``), or the static
  roster file (``node.roster``) as the simplest case: version 0 with no
  admins, which no newer version can replace.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from p2pfm.config.node_config import NodeConfig
from p2pfm.config.settings import OPEN_NODE_PORTS
from p2pfm.core.errors import ConfigError, RemoteProtocolError
from p2pfm.core.identity import Identity
from p2pfm.core.records import (
    PeerRecord,
    RecordLimits,
    RosterDocument,
    make_peer_record,
    make_roster_document,
    open_peer_record,
    open_roster_document,
)
from p2pfm.net.zmq_control import fetch_record

_TCP = re.compile(r"\Atcp://(?P<host>.+):(?P<port>\d+)\Z")
_WILDCARDS = {"*", "0.0.0.0", "::", "[::]"}

if TYPE_CHECKING:
    from p2pfm.core.logs import NodeLogger


def roster_of(config: NodeConfig, identity: Identity) -> RosterDocument:
    """The roster this node trusts first: the signed document, or the static roster as version 0."""
    membership = config.membership
    assert membership is not None
    if membership.roster is not None:
        try:
            data = membership.roster.read_bytes()
        except OSError as exc:
            raise ConfigError("membership.roster", f"cannot read {membership.roster}: {exc}") from None
        try:
            return open_roster_document(data, config.node.network)
        except RemoteProtocolError as exc:
            raise ConfigError(
                "membership.roster", f"{membership.roster} is not a valid signed roster: {exc}"
            ) from None
    assert config.roster is not None  # node_config checks that one of the two is given
    # The operator's own file is the trust anchor: signed here only to have the document's form.
    return make_roster_document(
        identity, network=config.node.network, version=0, members=config.roster.ids, admins=()
    )


def ports(listen: str) -> tuple[str, str, str, int]:
    """(host, control address, hello address, port) for a node listening on ``listen``."""
    match = _TCP.match(listen)
    if match is None or int(match["port"]) == 0 or int(match["port"]) + OPEN_NODE_PORTS - 1 > 65535:
        raise ConfigError(
            "node.listen", f"an open network needs tcp://HOST:PORT with PORT <= 65533, got {listen}"
        )
    host, port = match["host"], int(match["port"])
    return host, f"tcp://{host}:{port + 1}", f"tcp://{host}:{port + 2}", port


def own_record(config: NodeConfig, identity: Identity, wall_ms: int) -> PeerRecord:
    membership = config.membership
    assert membership is not None
    host, _, _, port = ports(config.node.listen)
    advertise = membership.advertise_host or host
    if advertise in _WILDCARDS:
        raise ConfigError(
            "membership.advertise_host", f"node.listen is {config.node.listen}: say which host others reach"
        )
    return make_peer_record(
        identity,
        config.node.network,
        wall_ms * 1000,
        [f"tcp://{advertise}:{port + 1}", f"tcp://{advertise}:{port}"],
    )


def kept_records(
    data: Iterable[bytes], network: str, roster: RosterDocument, me: Identity
) -> list[PeerRecord]:
    """The records a node saved last time (``NodeStore.load_peers``), each checked again."""
    out = []
    for item in data:
        try:
            record = open_peer_record(item, network, RecordLimits())
        except RemoteProtocolError:
            continue
        if record.peer != me.peer_id and roster.admits(record.peer):
            out.append(record)
    return out


def resolve_bootstrap(
    addresses: Iterable[str],
    network: str,
    roster: RosterDocument,
    *,
    timeout_s: float,
    stop: threading.Event,
    log: NodeLogger,
) -> list[PeerRecord]:
    """Each bootstrap address's signed record, asked from its hello endpoint until ``timeout_s``.

    Addresses that never answer, or answer with a record the roster does not
    admit, are left out (logged); the node then joins through the others.
    """
    records: list[PeerRecord] = []
    for address in addresses:
        _, _, hello, _ = ports(address)
        deadline_s = time.monotonic() + timeout_s
        while not stop.is_set():
            try:
                record = fetch_record(
                    hello, network, timeout_s=min(2.0, max(0.1, deadline_s - time.monotonic()))
                )
            except TimeoutError:
                if time.monotonic() >= deadline_s:
                    log.warning(
                        f"bootstrap {address}: no answer from {hello} within {timeout_s:g} s; skipped"
                    )
                    break
                continue
            except RemoteProtocolError as exc:
                log.warning(f"bootstrap {address}: refused its answer ({exc.reason.value}: {exc}); skipped")
                break
            if not roster.admits(record.peer):
                log.warning(f"bootstrap {address}: {record.peer.short} is not in the roster; skipped")
                break
            records.append(record)
            break
    return records
