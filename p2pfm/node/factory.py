"""Build a node from its config: keys, learner, protocol, transport, faults, strategy, store.

Everything the config decides is decided here, once; the node loop
(p2pfm/node/loop.py) only runs the rounds. Faults are wrappers (a lossy
transport, a slow learner) and an attack is a publishing strategy, so the
loop has no branch for either.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from p2pfm.config.node_config import FaultSettings, GossipSettings, NodeConfig, Peer
from p2pfm.core.compression import NeighbourEstimates, OwnEstimate, delta_encoding, keyframe_encoding
from p2pfm.core.errors import ConfigError, LocalProtocolError
from p2pfm.core.fingerprint import fingerprint as fingerprint_of
from p2pfm.core.identity import Identity, PeerId, load_key_file
from p2pfm.core.logs import node_logger
from p2pfm.core.membership import Membership, MembershipConfig
from p2pfm.core.protocol import GossipProtocol, MixSettings, ProtocolConfig
from p2pfm.core.records import PeerRecord
from p2pfm.core.wire import TensorSpec, WireLimits, limits_for_schema
from p2pfm.learn.algorithm import RoundAlgorithm
from p2pfm.learn.learner import Learner
from p2pfm.net.link import ControlTransport, Transport
from p2pfm.net.zmq_transport import ZmqTransport, raise_open_files_limit
from p2pfm.node.attacks import Attacker
from p2pfm.node.clock import Clock, SystemClock
from p2pfm.node.faults import LossyTransport, SlowLearner
from p2pfm.node.loop import Compressed, Node, RoundPlan
from p2pfm.node.open_network import kept_records, own_record, ports, resolve_bootstrap, roster_of
from p2pfm.node.overlay import JoinSettings, Overlay
from p2pfm.node.publishing import Honest, Publisher
from p2pfm.node.store import DiskStore, NodeStore

if TYPE_CHECKING:
    from p2pfm.core.logs import NodeLogger


def build_node(
    config: NodeConfig,
    *,
    resume: bool = False,
    nodes_on_machine: int = 1,
    stop: threading.Event | None = None,
    transport: Transport | None = None,
    learner: Learner | None = None,
) -> Node:
    """The node ``config`` describes, on real time, keeping its files in ``node.out``.

    ``transport`` replaces the ZeroMQ one built from the config (e.g. a
    ``p2pfm.net.memory.MemoryTransport`` to run the node in-process); the
    node closes it when it finishes. ``learner`` replaces the model the
    config describes (e.g. a ``p2pfm.learn.learner.QuadraticLearner``).
    """
    identity = load_key_file(config.node.key)
    if config.roster is not None and identity.peer_id not in config.roster.ids:
        me = identity.peer_id.short
        raise ConfigError("node.key", f"this node ({me}) is not in the roster {config.node.roster}")
    name = config.node.name or identity.peer_id.short
    stop = stop or threading.Event()
    log = node_logger(__name__, name)
    store = DiskStore(config.node.out, name=name, common={"node": name, "peer": identity.peer_id.hex})
    open_files_limit = raise_open_files_limit()[0]
    if learner is None:
        from p2pfm.learn.adapter_learner import AdapterLearner  # noqa: PLC0415  torch only when a model runs

        log.info(f"loading the model from {config.model.path} (the first round starts when it is ready)")
        loading_s = time.monotonic()
        learner = AdapterLearner(config, nodes_on_machine=nodes_on_machine)
        log.info(
            f"model ready in {time.monotonic() - loading_s:.1f} s ({len(learner.schema)} adapter tensors)"
        )
    members = None if config.roster is None else config.roster.ids
    network_parts = None if config.membership is None else _open_network(config, identity, store, stop, log)
    if network_parts is not None:
        members = network_parts.admitted

    def zmq_transport(limits: WireLimits) -> Transport:
        if config.transport.insecure:
            log.warning(
                "transport.insecure = true: links are PLAINTEXT and "
                "unauthenticated; anyone on the path can read them. Debugging only."
            )
        extra: dict[str, Any] = {}
        if network_parts is not None:
            extra = {
                "control_listen": network_parts.control_listen, "hello_listen": network_parts.hello_listen,
                "record": network_parts.membership.record.signed,
                "max_control_bytes": network_parts.membership.config.limits.max_control_bytes,
            }  # fmt: skip
        return ZmqTransport(
            config.node.listen,
            {peer.id: peer.address for peer in config.peers},
            config.transport,
            identity=identity,
            allowed=members,
            max_message_bytes=limits.max_message_bytes,
            **extra,
        )

    node = assemble_node(
        identity=identity,
        name=name,
        network=config.node.network,
        peers=config.peers,
        members=members,
        gossip=config.gossip,
        faults=config.faults,
        plan=RoundPlan(
            rounds=config.gossip.rounds + config.gossip.consensus_rounds,
            consensus_rounds=config.gossip.consensus_rounds,
            local_steps=config.train.local_steps,
            samples_per_round=config.train.local_steps * config.train.batch_size,
            eval_every=config.gossip.eval_every,
            snapshot_every=config.gossip.snapshot_every,
            partners=config.partners,
            overlap=config.gossip.overlap,
        ),
        learner=learner,
        transport=transport if transport is not None else zmq_transport,
        clock=SystemClock(stop),
        store=store,
        seed=config.shard.shard,
        resume=resume,
        stop=stop,
        facts={"open_files_limit": open_files_limit, "insecure": config.transport.insecure},
        membership=None if network_parts is None else network_parts.membership,
        contacts=() if network_parts is None else network_parts.contacts,
    )
    if config.node.metrics_address:
        try:
            node.on_close.append(_serve_metrics(config.node.metrics_address, store, name, identity))
        except BaseException:
            node.close()
            raise
    return node


def _serve_metrics(address: str, store: DiskStore, name: str, identity: Identity) -> Callable[[], None]:
    """Serve Prometheus /metrics at ``address`` from the records ``store`` writes; returns its close."""
    from p2pfm.node.prometheus import MetricsServer, RecordMetrics  # noqa: PLC0415  only when asked for

    exporter = RecordMetrics(node=name, peer=identity.peer_id.hex)
    server = MetricsServer(address, exporter)
    store.observers.append(exporter.observe)
    return server.close


@dataclass(frozen=True)
class _OpenNetwork:
    membership: Membership
    contacts: tuple[PeerRecord, ...]
    admitted: frozenset[PeerId]
    control_listen: str
    hello_listen: str


def _open_network(
    config: NodeConfig,
    identity: Identity,
    store: NodeStore,
    stop: threading.Event,
    log: NodeLogger,
) -> _OpenNetwork:
    """The membership of a node with a ``[membership]`` section (p2pfm/node/open_network.py)."""
    settings = config.membership
    assert settings is not None
    roster = roster_of(config, identity)
    if not roster.admits(identity.peer_id):
        raise ConfigError("node.key", f"this node ({identity.peer_id.short}) is not in the network's roster")
    if roster.open:
        raise ConfigError(
            "membership.roster", "open rosters are not supported over ZeroMQ yet (docs/security.md)"
        )
    if config.transport.insecure:
        raise ConfigError("transport.insecure", "an open network needs authenticated links; set it to false")
    _, control, hello, _ = ports(config.node.listen)
    wall_ms = int(time.time() * 1000)
    record = own_record(config, identity, wall_ms)
    kept = kept_records(store.load_peers(), config.node.network, roster, identity)
    if settings.bootstrap:
        log.info(
            f"asking {', '.join(settings.bootstrap)} for the network's contacts "
            f"(up to {settings.join_timeout_s:g} s each)"
        )
    contacts = resolve_bootstrap(
        settings.bootstrap, config.node.network, roster, timeout_s=settings.join_timeout_s, stop=stop, log=log
    )
    if settings.bootstrap and not contacts and not kept:
        raise ConfigError(
            "membership.bootstrap",
            f"none of {', '.join(settings.bootstrap)} answered within {settings.join_timeout_s:g} s "
            "(membership.join_timeout_s) and no peers are kept from an earlier run; is the network up?",
        )
    if settings.bootstrap and not contacts:
        log.warning(
            f"no bootstrap address answered: rejoining through the {len(kept)} peers kept in node.out"
        )
    membership = Membership(
        identity,
        MembershipConfig(
            network=config.node.network, degree=settings.degree, passive_size=settings.passive_size,
            suspect_rounds=settings.suspect_rounds,
        ),
        roster, record, seed=int.from_bytes(os.urandom(8), "little"), seq_start=wall_ms * 1000,
    )  # fmt: skip
    membership.seed_views([], kept)
    return _OpenNetwork(
        membership=membership,
        contacts=tuple(contacts or kept[:8]),
        admitted=roster.members | roster.admins,
        control_listen=control,
        hello_listen=hello,
    )


def assemble_node(
    *,
    identity: Identity,
    name: str,
    network: str,
    peers: Sequence[Peer],
    gossip: GossipSettings,
    faults: FaultSettings,
    plan: RoundPlan,
    learner: Learner,
    transport: Transport | Callable[[WireLimits], Transport],
    clock: Clock,
    store: NodeStore,
    seed: int,
    members: Collection[PeerId] | None = None,
    resume: bool = False,
    stop: threading.Event | None = None,
    facts: Mapping[str, Any] | None = None,
    membership: Membership | None = None,
    contacts: Sequence[PeerRecord] = (),
    join: JoinSettings | None = None,
) -> Node:
    """A node from explicit parts: what ``build_node`` and the simulator share.

    ``transport`` is a transport, or a function that builds one for the
    derived wire limits (the ZeroMQ one bounds its inbound frames by them);
    it is not used when ``gossip.mix`` is false. ``seed`` seeds the node's
    fault and attack randomness. ``membership`` makes the neighbours its
    active view (an open network; ``peers`` are then its seeded neighbours),
    joining through ``contacts``; the transport must carry control messages.
    """
    if faults.slow_factor > 1.0:
        learner = SlowLearner(learner, faults.slow_factor, clock)
    # gossip.wire_dtype is what float32 tensors travel as; others (a float64
    # simulation) travel as they are.
    wire_dtypes = {spec.name: gossip.wire_dtype for spec in learner.schema if spec.dtype == "float32"}
    schema = tuple(
        dataclasses.replace(spec, dtype=wire_dtypes.get(spec.name, spec.dtype)) for spec in learner.schema
    )
    compressed = _compressed(gossip, learner, plan, peers, fresh=not resume and membership is None)
    if compressed is not None:  # keyframes and differences travel in their encodings
        encodings = {keyframe_encoding(gossip.compression), delta_encoding(gossip.compression)}
        schema = tuple(
            dataclasses.replace(spec, dtype=e) for spec in learner.schema for e in sorted(encodings)
        )
    # Bounds from the largest legitimate message of this schema: nobody makes
    # us buffer more than that per connection (docs/security.md). The float32
    # schema's bound too: a node with another wire dtype is then refused as
    # schema_mismatch (counted), not cut off by size.
    limits = max(
        (limits_for_schema(specs, network=network) for specs in _schemas(schema, learner.schema)),
        key=lambda lim: lim.max_message_bytes,
    )
    protocol = GossipProtocol(
        identity,
        [peer.id for peer in peers],
        ProtocolConfig(
            network=network,
            fingerprint=_chain_fingerprint(learner.fingerprint, gossip)
            if compressed is not None and _shares_start(learner)
            else learner.fingerprint,
            round_timeout_s=gossip.round_timeout_s,
            limits=limits,
            schema=schema,
            max_rounds_ahead=gossip.max_rounds_ahead,
            adaptive_deadline=gossip.deadline == "adaptive",
            deadline_margin_s=gossip.deadline_margin_s,
            members=None if members is None else frozenset(members),
            pace_floor=membership is not None,
        ),
    )
    link: Transport | None = None
    if gossip.mix:
        link = transport(limits) if callable(transport) else transport
        by_name = {peer.name: peer.id for peer in peers}
        loss = {by_name[n]: p for n, p in faults.drop.items() if n in by_name and p > 0.0}
        if loss:
            link = LossyTransport(link, [peer.id for peer in peers], loss, seed=seed)
    elif not callable(transport):
        transport.close()  # given but never used: the node owns it
    overlay = None
    if membership is not None and link is not None:
        if not isinstance(link, ControlTransport):
            raise LocalProtocolError("open membership needs a transport with a control channel")
        overlay = Overlay(membership, protocol, link, contacts=contacts, join=join)
    publisher: Publisher = (
        Honest(wire_dtypes)
        if compressed is None
        else Honest(wire_dtypes, compressed.own, compressed.neighbours)
    )
    if faults.attack:
        # Its attacks travel as the network's states do (a compressing network's keyframes).
        keyframes = {name: keyframe_encoding(gossip.compression) for name in wire_dtypes}
        publisher = Attacker(
            faults.attack, faults.attack_factor, seed, keyframes if compressed else wire_dtypes
        )
        node_logger(__name__, name).info(f"ATTACKER: sends {faults.attack} updates (fault injection)")
    return Node(
        name=name,
        protocol=protocol,
        learner=learner,
        transport=link,
        publisher=publisher,
        mix_settings=MixSettings(gossip.rule, trim=gossip.trim, byzantine_weight=gossip.byzantine_weight),
        plan=plan,
        store=store,
        clock=clock,
        peer_names={peer.id: peer.name for peer in peers},
        resume=resume,
        stop=stop,
        facts={
            **learner.describe(),
            "neighbours": sorted(peer.name for peer in peers),
            "adapter_bytes": sum(spec.nbytes for spec in learner.schema),
            "max_message_bytes": limits.max_message_bytes,
            "attack": faults.attack,
            "algorithm": gossip.algorithm,
            **(facts or {}),
        },
        overlay=overlay,
        algorithm=RoundAlgorithm(gossip),
        compressed=compressed,
    )


def _compressed(
    gossip: GossipSettings, learner: Learner, plan: RoundPlan, peers: Sequence[Peer], *, fresh: bool
) -> Compressed | None:
    """The compression state of ``gossip.compression`` (None: full states travel).

    A fresh node with fixed neighbours whose learner starts where every node
    starts (``shared_start``) begins its chains, and its neighbours', at that
    start: no keyframe in round 1 (docs/protocol.md section 8.3).
    """
    if gossip.compression == "none":
        return None
    if plan.partners is not None:
        raise ConfigError(
            "gossip.compression",
            "needs the same neighbours every round: a time-varying topology sends each round to other "
            "partners, who would miss the differences in between; use 'none' or a fixed topology",
        )
    if any(spec.dtype != "float32" for spec in learner.schema):
        raise ConfigError("gossip.compression", "compresses float32 tensors only; this learner's are not")
    neighbours = NeighbourEstimates()
    if not (fresh and _shares_start(learner)):
        own = OwnEstimate(gossip.compression, keyframe_every=gossip.keyframe_every)
        return Compressed(own, neighbours, gossip.compression_step)
    start, ids = learner.get_state(), frozenset(peer.id for peer in peers)
    own = OwnEstimate(gossip.compression, keyframe_every=gossip.keyframe_every, start=start, audience=ids)
    neighbours.start(start, ids)
    return Compressed(own, neighbours, gossip.compression_step)


def _shares_start(learner: Learner) -> bool:
    """Whether the learner starts where every node with the same settings starts (the initial adapter)."""
    return bool(getattr(learner, "shared_start", False))


def _chain_fingerprint(fingerprint: bytes, gossip: GossipSettings) -> bytes:
    """Compressed chains that may start from the shared initial adapter bind its seed: nodes that would
    start elsewhere are refused as another model (fingerprint_mismatch), never mixed wrongly. Every
    node of such a network uses it, fresh or resumed (a resumed node's chain restarts with a keyframe)."""
    document = {"adapter": fingerprint.hex(), "compression": gossip.compression, "start_seed": gossip.seed}
    return fingerprint_of(document)


def _schemas(schema: tuple[TensorSpec, ...], plain: tuple[TensorSpec, ...]) -> list[tuple[TensorSpec, ...]]:
    """One schema per wire dtype a tensor may travel as, and the float32 one: the limits take the largest."""
    by_name: dict[str, list[TensorSpec]] = {}
    for spec in schema:
        by_name.setdefault(spec.name, []).append(spec)
    variants = max((len(specs) for specs in by_name.values()), default=1)
    out = [tuple(specs[min(i, len(specs) - 1)] for specs in by_name.values()) for i in range(variants)]
    return [*out, plain]
