"""Local multi-node scenarios: keys, one process per vertex, faults, a report.

``p2pfm run SCENARIO.toml`` turns a scenario file (docs/scenarios.md) into
one node config per topology vertex on 127.0.0.1, starts ``p2pfm node``
processes, injects the scenario's faults (crash + restart with --resume,
slow training, lossy links), optionally runs the ``local`` and ``pooled``
baselines, and writes the report. Every process it starts is stopped by
pid before it returns, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import networkx as nx
import tomli_w
from msgspec import Meta

from p2pfm.config.roster import Member, Roster, save_roster
from p2pfm.config.schema import AttackKind, Finite, NonEmpty, Schema, check_network_id, decode, number
from p2pfm.config.settings import OPEN_NODE_PORTS, GossipSettings, LoraSettings, TrainSettings
from p2pfm.config.toml import read_toml
from p2pfm.core.errors import ConfigError, NodeFailedError
from p2pfm.core.identity import Identity, load_key_file, write_key_file
from p2pfm.core.topology import Topology, parse_topology
from p2pfm.lab.prefork import Launcher, ProcessHandle, SubprocessLauncher, launcher
from p2pfm.lab.progress import LineView, MetricsTail, NodeStatus, ProgressView, last_error_line
from p2pfm.lab.report import Setup, report_run
from p2pfm.lab.roster_change import SIGNED_ROSTER, RosterBook
from p2pfm.lab.summary import Summary
from p2pfm.node.open_network import ports

_logger = logging.getLogger(__name__)
QUICKSTART = Path(__file__).resolve().parents[2] / "scenarios" / "quickstart.toml"
_TEMPLATE_SECTIONS = ("model", "lora", "data", "train", "gossip", "transport", "membership")
OPEN = "open:"  # topology = "open:N": N nodes whose neighbours come from membership (docs/membership.md)
_TICK_S = 0.2
EXIT_STOPPED = 130  # `p2pfm node` after SIGTERM: stopped before its last round (a graceful leave)


Baseline = Literal["local", "pooled"]


class NodeFault(Schema, frozen=True, kw_only=True):
    """A fault that hits one node, by its index in the topology."""

    node: int


class Crash(NodeFault, frozen=True, kw_only=True):
    round: Annotated[int, Meta(ge=0)]  # killed once it has completed this round
    restart_after_s: Annotated[float, number(ge=0)] = 5.0
    restart: bool = True  # false: it stays down (an open network replaces it)


class Join(NodeFault, frozen=True, kw_only=True):
    round: Annotated[int, Meta(ge=0)]  # started once the first node has completed this round (open networks)


class Leave(NodeFault, frozen=True, kw_only=True):
    round: Annotated[int, Meta(ge=0)]  # stopped (SIGTERM: a graceful leave) once it completed this round


class Slow(NodeFault, frozen=True, kw_only=True):
    factor: Annotated[float, number(ge=1.0)]  # as faults.slow_factor of a node config


class Drop(Schema, frozen=True, kw_only=True):
    prob: Annotated[float, Meta(ge=0, le=1)]
    link: tuple[int, ...] = ()  # two node ids; empty = every link


class Attack(NodeFault, frozen=True, kw_only=True):
    kind: AttackKind
    factor: Finite | None = None


class RosterChange(Schema, frozen=True, kw_only=True):
    """A newer signed roster, handed to one running member after ``round`` (open networks)."""

    round: Annotated[int, Meta(ge=0)]
    remove: tuple[int, ...] = ()  # nodes whose keys it drops: refused everywhere from then on
    add: tuple[int, ...] = ()  # nodes not in the first roster: started once it is out, they join


class Faults(Schema, frozen=True, kw_only=True):
    attack: tuple[Attack, ...] = ()
    crash: tuple[Crash, ...] = ()
    slow: tuple[Slow, ...] = ()
    drop: tuple[Drop, ...] = ()
    join: tuple[Join, ...] = ()
    leave: tuple[Leave, ...] = ()
    roster: tuple[RosterChange, ...] = ()


class ScenarioHeader(Schema, frozen=True, kw_only=True):
    """The scenario file's top-level keys (its sections are node-config templates and faults)."""

    name: NonEmpty
    topology: NonEmpty
    network: str = ""  # default: the name
    baselines: tuple[Baseline, ...] = ()
    timeout_s: Annotated[float, number(gt=0)] = 1800.0
    host: str = "127.0.0.1"
    # Give node i adapter seed i (consensus experiments); default: one shared seed.
    distinct_seeds: bool = False

    def __post_init__(self) -> None:
        check_network_id("scenario.network" if self.network else "scenario.name", self.network or self.name)


@dataclass(frozen=True)
class Scenario:
    header: ScenarioHeader
    topology: Topology
    faults: Faults
    templates: Mapping[str, Mapping[str, Any]]
    path: Path

    @property
    def open_network(self) -> bool:
        return self.header.topology.startswith(OPEN)


@dataclass
class _Proc:
    name: str
    config: Path
    log: Path
    metrics: Path
    rounds: int  # gossip.rounds of its config
    popen: ProcessHandle | None = None
    crashed_at: float | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)  # one per process run that ended by itself
    running: bool = False
    status: NodeStatus = field(init=False)
    tail: MetricsTail = field(init=False)

    def __post_init__(self) -> None:
        self.status = NodeStatus(self.name, self.rounds)
        self.tail = MetricsTail(self.metrics)

    @property
    def rounds_done(self) -> int:
        return self.status.round


def _planned_rounds(doc: Mapping[str, Any]) -> int:
    """The rounds a node of config ``doc`` plays: gossip.rounds, then gossip.consensus_rounds."""
    gossip, defaults = doc.get("gossip", {}), GossipSettings()
    return int(gossip.get("rounds", defaults.rounds)) + int(
        gossip.get("consensus_rounds", defaults.consensus_rounds)
    )


def load_scenario(path: Path) -> Scenario:
    doc = read_toml(path, "scenario")
    header_keys = {f.encode_name for f in msgspec.structs.fields(ScenarioHeader)}
    unknown = set(doc) - header_keys - set(_TEMPLATE_SECTIONS) - {"faults"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], "unknown scenario key or section")
    header = decode(ScenarioHeader, {k: v for k, v in doc.items() if k in header_keys}, "scenario")
    spec = header.topology
    if ":" not in spec and not Path(spec).is_absolute():
        spec = str((path.parent / spec).resolve())
    topology = _open_topology(spec) if spec.startswith(OPEN) else parse_topology(spec)
    faults = check_faults(doc.get("faults", {}), topology)
    if (faults.join or faults.leave or faults.roster) and not spec.startswith(OPEN):
        raise ConfigError("faults.join", f'join and leave faults need an open network (topology = "{OPEN}N")')
    if "membership" in doc and not spec.startswith(OPEN):
        raise ConfigError("membership", f'applies to open networks only (topology = "{OPEN}N")')
    # The templates are checked by each node when it loads its config; here they only need to be tables.
    templates = {k: decode(dict[str, Any], doc.get(k, {}), k) for k in _TEMPLATE_SECTIONS}
    for key in ("shard", "shards"):
        if key in templates["data"]:
            raise ConfigError(f"data.{key}", "is set per node by the scenario; remove it")
    return Scenario(header, topology, faults, templates, path)


def check_faults(faults: Faults | Mapping[str, Any], topology: Topology) -> Faults:
    """The faults, checked as a scenario file's are: the schema's bounds, nodes and links of ``topology``.

    Faults built in code (the simulator's flags) come through here too:
    a Struct's constructor does not check its constraints, decoding does.
    """
    table = msgspec.to_builtins(faults) if isinstance(faults, Faults) else faults
    checked = decode(Faults, table, "faults")
    n = topology.n_nodes
    for kind, items in (
        ("crash", checked.crash), ("slow", checked.slow), ("attack", checked.attack), ("join", checked.join),
        ("leave", checked.leave),
    ):  # fmt: skip
        for item in items:
            if not 0 <= item.node < n:
                raise ConfigError(f"faults.{kind}.node", f"node {item.node} is not in 0..{n - 1}")
    for drop in checked.drop:
        if drop.link and (len(drop.link) != 2 or not topology.graph.has_edge(*drop.link)):
            raise ConfigError("faults.drop.link", f"{list(drop.link)} is not an edge of {topology.spec}")
    return checked


def _open_topology(spec: str) -> Topology:
    try:
        n = int(spec[len(OPEN) :])
    except ValueError:
        raise ConfigError(
            "scenario.topology", f"{spec!r}: expected {OPEN}N with N a number of nodes"
        ) from None
    if not 2 <= n <= 256:
        raise ConfigError("scenario.topology", f"{spec!r}: an open network scenario runs 2..256 nodes")
    return Topology(nx.freeze(nx.empty_graph(n)), tuple(f"node{i}" for i in range(n)), spec)


def _free_port_runs(host: str, count: int, width: int) -> list[int]:
    """``count`` base ports P with P .. P + width - 1 all free (an open network's node uses 3).

    Taken below the kernel's ephemeral range when there is room: nodes that join later must still
    find their ports free, and outgoing connections take ephemeral ports meanwhile.
    """
    if width == 1:
        return _free_ports(host, count)
    low = _ephemeral_low()
    candidates = list(range(10000, low - width, width)) if low - 10000 >= 4 * count * width else []
    random.Random(os.getpid() ^ time.monotonic_ns()).shuffle(candidates)
    found: list[int] = []
    for base in candidates or (_free_ports(host, 1)[0] for _ in range(50 * count)):
        if len(found) == count:
            break
        if base + width > 65535 or any(abs(base - other) < width for other in found):
            continue
        if _bindable(host, range(base, base + width)):
            found.append(base)
    if len(found) < count:
        raise ConfigError("scenario.host", f"could not find {count} runs of {width} free ports on {host}")
    return found


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # the usual start of the ephemeral range


def _bindable(host: str, ports: range) -> bool:
    socks = []
    try:
        for port in ports:
            sock = socket.socket()
            socks.append(sock)
            sock.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for sock in socks:
            sock.close()


def _free_ports(host: str, count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def write_node_configs(scenario: Scenario, out: Path) -> list[_Proc]:
    """Keys and one node.toml per vertex; returns the processes to start."""
    topo, header = scenario.topology, scenario.header
    n = topo.n_nodes
    names = [f"node{i}" for i in range(n)]
    ports, metrics = _node_ports(scenario, out)
    identities = [Identity.generate() for _ in range(n)]
    (out / "keys").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // n)
    network = header.network or header.name
    roster = Roster(
        network,
        tuple(Member(names[i], identities[i].peer_id, f"tcp://{header.host}:{ports[i]}") for i in range(n)),
    )
    save_roster(roster, out / "roster.toml")
    if scenario.open_network:
        added = {i for change in scenario.faults.roster for i in change.add}
        RosterBook.create(out, network, [identities[i].peer_id for i in range(n) if i not in added])
    slow = {s.node: s.factor for s in scenario.faults.slow}
    procs = []
    for i in range(n):
        key = out / "keys" / f"{names[i]}.key"
        write_key_file(identities[i], key)
        node_dir = out / "nodes" / names[i]
        node_dir.mkdir(parents=True, exist_ok=True)
        doc: dict[str, Any] = {k: dict(v) for k, v in scenario.templates.items()}
        if not scenario.open_network:
            del doc["membership"]
        doc["node"] = {
            "key": str(key), "listen": f"tcp://{header.host}:{ports[i]}",
            "network": network, "out": str(node_dir), "name": names[i],
            "roster": str(out / "roster.toml"), "metrics_address": metrics[i],
        }  # fmt: skip
        addresses = {
            j: (identities[j].peer_id.hex, f"tcp://{header.host}:{ports[j]}") for j in topo.neighbours(i)
        }
        peer_name: dict[int, str] = {}
        if scenario.open_network:  # no neighbours given: every node but node0 joins through node0
            doc["membership"] = {**doc.get("membership", {}), "roster": str(out / SIGNED_ROSTER)}
            if i:
                doc["membership"]["bootstrap"] = [f"tcp://{header.host}:{ports[0]}"]
        elif topo.schedule is None:
            peer_name = {j: names[j] for j in addresses}
            doc["peers"] = [
                {"id": id_, "address": at, "name": names[j]} for j, (id_, at) in addresses.items()
            ]
        else:  # a time-varying topology: the node needs the spec to know each round's partner
            peer_name = {j: topo.names[j] for j in addresses}
            members = {topo.names[j]: {"id": id_, "address": at} for j, (id_, at) in addresses.items()}
            doc["topology"] = {"spec": topo.spec, "self": topo.names[i], "members": members}
        doc["data"].update(shard=i, shards=n)
        doc["train"].setdefault("threads", threads)
        doc["gossip"].setdefault("snapshot_every", 1)
        if header.distinct_seeds:
            doc["gossip"]["seed"] = i
        drops = {peer_name[j]: _link_drop(scenario.faults, i, j) for j in topo.neighbours(i)}
        doc["faults"] = {"slow_factor": slow.get(i, 1.0), "drop": {k: v for k, v in drops.items() if v > 0}}
        for attack in (a for a in scenario.faults.attack if a.node == i):
            doc["faults"]["attack"] = attack.kind
            if attack.factor is not None:
                doc["faults"]["attack_factor"] = attack.factor
        config = node_dir / "node.toml"
        config.write_text(tomli_w.dumps(doc))
        procs.append(
            _Proc(names[i], config, node_dir / "log.txt", node_dir / "metrics.jsonl", _planned_rounds(doc))
        )
    return procs


def _node_ports(scenario: Scenario, out: Path) -> tuple[list[int], list[str]]:
    """Each node's base port and /metrics address (the port after the node's); writes prometheus.yml."""
    host, n = scenario.header.host, scenario.topology.n_nodes
    width = OPEN_NODE_PORTS if scenario.open_network else 1
    ports = _free_port_runs(host, n, width + 1)
    metrics = [f"{host}:{port + width}" for port in ports]
    write_prometheus_config(out, scenario.header.name, [(f"node{i}", metrics[i]) for i in range(n)])
    return ports, metrics


def write_prometheus_config(out: Path, scenario: str, targets: Sequence[tuple[str, str]]) -> Path:
    """``out/prometheus.yml``: a Prometheus that scrapes each node's /metrics every second.

    One static target per node, labelled with its name; ``honor_labels`` keeps
    the ``node`` label of ``p2pfm_info`` as the node serves it (the same name).
    docs/operations.md says how to run it.
    """
    lines = [
        "# This scenario's nodes: prometheus --config.file=prometheus.yml (docs/operations.md)",
        "global:",
        "  scrape_interval: 1s",
        "  scrape_timeout: 1s",
        "  evaluation_interval: 1s",
        "scrape_configs:",
        '  - job_name: "p2pfm"',
        "    honor_labels: true",
        "    static_configs:",
    ]
    for name, address in targets:  # JSON strings are YAML strings
        lines += [
            f"      - targets: [{json.dumps(address)}]",
            f"        labels: {{node: {json.dumps(name)}, scenario: {json.dumps(scenario)}}}",
        ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "prometheus.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _link_drop(faults: Faults, i: int, j: int) -> float:
    prob = 0.0
    for drop in faults.drop:
        if not drop.link or set(drop.link) == {i, j}:
            prob = max(prob, drop.prob)
    return prob


def write_baseline_configs(scenario: Scenario, out: Path, gossip_procs: list[_Proc]) -> list[_Proc]:
    """Node configs for the baselines: no gossip, evaluated after the last round only.

    ``local``: every node trains its own shard alone for the same rounds and
    steps. ``pooled``: one model trains on the union of all shards for the
    same number of steps as each node (rounds x local_steps).
    """
    procs = []
    for kind in scenario.header.baselines:
        sources = gossip_procs if kind == "local" else gossip_procs[:1]
        for proc in sources:
            doc = read_toml(proc.config, "config")
            name = proc.name if kind == "local" else "pooled"
            folder = out / "baselines" / kind / name
            folder.mkdir(parents=True, exist_ok=True)
            rounds = doc["gossip"].get("rounds", 10)
            doc["gossip"].update(mix=False, eval_every=rounds, snapshot_every=0)
            doc["node"].update(out=str(folder), name=f"{kind}-{name}")
            doc["node"].pop("metrics_address", None)  # they run one per core: no /metrics ports to share
            doc["faults"] = {}
            doc["train"]["threads"] = 1  # they run one per core (run_scenario)
            if kind == "pooled":
                doc["data"].update(shard=0, shards=1)
                if doc["data"].get("partition") == "labels":  # one node holding every node's topics
                    every = [name for names in doc["data"].get("labels", []) for name in names]
                    doc["data"]["labels"] = [list(dict.fromkeys(every))]
                _strongest_pooled(doc)
            config = folder / "node.toml"
            config.write_text(tomli_w.dumps(doc))
            procs.append(
                _Proc(
                    f"{kind}-{name}",
                    config,
                    folder / "log.txt",
                    folder / "metrics.jsonl",
                    _planned_rounds(doc),
                )
            )
    return procs


def _strongest_pooled(doc: dict[str, Any]) -> None:
    """The pooled baseline trains centrally the way that trains best: AdamW, plain mixing-free rounds.

    Nodes may run an algorithm whose local optimizer is plain SGD (fedadam:
    its adaptivity is in the outer step over the network). Pooled with that
    SGD would be a weaker reference than pooled with AdamW (0.769 against
    0.961 validation accuracy on the demo's data, docs/training.md), so the
    pooled run keeps AdamW at the default learning rate and no outer step.
    """
    train = doc.setdefault("train", {})
    if train.get("optimizer", TrainSettings().optimizer) != "adamw":
        train.update(optimizer="adamw", lr=TrainSettings().lr)
    doc["gossip"]["algorithm"] = "dpsgd"


def _start(proc: _Proc, starter: Launcher, resume: bool = False) -> None:
    """``p2pfm node --config <its config>`` (``--resume`` after a crash), its output appended to its log."""
    args = []
    if logging.getLogger("p2pfm").isEnabledFor(logging.DEBUG):
        args.append("-v")  # the runner's -v reaches the nodes' logs
    args += ["node", "--config", str(proc.config)]
    if resume:
        args.append("--resume")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc.popen = starter.start(args, proc.log, env)
    proc.running = True
    proc.status.state, proc.status.detail = "starting", "loading the model"


def _stop_all(procs: list[_Proc]) -> None:
    stop_processes([p.popen for p in procs if p.popen is not None])


def stop_processes(popens: Sequence[ProcessHandle], grace_s: float = 10.0) -> None:
    """SIGTERM every process still running (by pid), wait up to ``grace_s``, then SIGKILL."""
    running = [popen for popen in popens if popen.poll() is None]
    for popen in running:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for popen in running:
        try:
            popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=10.0)


def run_processes(
    procs: list[_Proc],
    crashes: tuple[Crash, ...],
    timeout_s: float,
    view: ProgressView | None = None,
    max_parallel: int | None = None,
    *,
    joins: tuple[Join, ...] = (),
    leaves: tuple[Leave, ...] = (),
    roster_changes: Sequence[tuple[int, Callable[[], None], frozenset[int], frozenset[int]]] = (),
    starter: Launcher | None = None,
) -> bool:
    """Run ``procs`` to completion with crash, join and leave faults; True if all ended as planned in time.

    At most ``max_parallel`` run at once (all by default: gossip nodes must
    run together; independent baseline runs need not). A node that joins is
    started once the first node has completed the join's round; one that
    leaves gets SIGTERM once it completed its round and must then exit with
    status 130 (stopped); one that crashes without restart stays down.

    A process that exits in a way the plan did not ask for (a status other
    than 0, or 130 for a planned leave) ends the run at once: every other
    process is stopped by pid and :class:`NodeFailedError` names the node,
    its last log line and its log file. ``view`` is shown every node's
    progress (one log line per node and round by default). ``starter``
    starts the processes (p2pfm/lab/prefork.py; by default one made for
    this call: a prefork server where it works).
    """
    view = view or LineView()
    own_starter = starter is None
    if starter is None:
        starter = launcher(procs[0].log.with_name("prefork.log")) if procs else SubprocessLauncher()
    plan = _FaultPlan(
        {c.node: c for c in crashes}, {j.node: j.round for j in joins}, {v.node: v.round for v in leaves}
    )
    changes = sorted(roster_changes, key=lambda change: change[0])
    gated = {i for _, _, added, _ in changes for i in added}  # started once their roster is out
    limit = max_parallel or len(procs)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            _observe(procs, view)
            running = sum(1 for p in procs if p.running)
            furthest = max((p.rounds_done for p in procs if p.popen is not None), default=-1)
            while changes and furthest >= changes[0][0]:
                _, action, added, removed = changes.pop(0)
                action()
                gated -= added
                plan.left |= removed  # a node the roster removed stops by itself (status 130)
            for index, proc in enumerate(procs):
                startable = index not in gated and furthest >= plan.joins.get(index, -1)
                if proc.popen is None and running < limit and startable:
                    if index in plan.joins:
                        _logger.info(f"join fault: starting {proc.name} after round {plan.joins[index]}")
                    _start(proc, starter)
                    view.state_changed(proc.status)
                    running += 1
            alive = [_step(index, proc, plan, view, starter) for index, proc in enumerate(procs)]
            view.refresh([p.status for p in procs])
            if not any(alive):
                _observe(procs, view)  # the records written just before the last exit
                view.refresh([p.status for p in procs])
                return all(
                    i in plan.down
                    or (p.exit_codes and p.exit_codes[-1] == (EXIT_STOPPED if i in plan.left else 0))
                    for i, p in enumerate(procs)
                )
            time.sleep(_TICK_S)
        _logger.warning(f"timed out after {timeout_s:.0f} s; stopping every node")
        return False
    finally:
        _stop_all(procs)
        if own_starter:
            starter.close()
        view.refresh([p.status for p in procs])


def _observe(procs: Sequence[_Proc], view: ProgressView) -> None:
    """Read what every started node recorded since the last look."""
    for proc in procs:
        if proc.popen is None:
            continue
        for record in proc.tail.new_records():
            before = proc.status.state
            if proc.status.absorb(record):
                view.round_done(proc.status)
            if proc.status.state != before:
                view.state_changed(proc.status)


@dataclass
class _FaultPlan:
    crashes: dict[int, Crash]  # still to happen (or to restart from)
    joins: dict[int, int]  # node -> round after which it starts
    leaves: dict[int, int]  # node -> round after which it leaves
    left: set[int] = field(default_factory=set)
    down: set[int] = field(default_factory=set)  # crashed for good


def _step(index: int, proc: _Proc, plan: _FaultPlan, view: ProgressView, starter: Launcher) -> bool:
    """One look at one process: inject its faults; False once it is over for good."""
    if proc.popen is None:
        return True
    if index in plan.down:
        return False
    crash = plan.crashes.get(index)
    status = proc.status
    if proc.crashed_at is not None:
        if crash is not None and not crash.restart:
            plan.down.add(index)
            del plan.crashes[index]
            status.state, status.detail = "down", "crash fault, no restart"
            view.state_changed(status)
            return False
        if crash is not None and time.monotonic() - proc.crashed_at >= crash.restart_after_s:
            _logger.info(f"restarting {proc.name} with --resume")
            proc.crashed_at = None
            proc.restarts += 1
            del plan.crashes[index]
            _start(proc, starter, resume=True)
            view.state_changed(status)
        return True
    code = proc.popen.poll()
    if code is None:
        if index in plan.leaves and index not in plan.left and proc.rounds_done >= plan.leaves[index]:
            _logger.info(
                f"leave fault: SIGTERM {proc.name} (pid {proc.popen.pid}) after round {plan.leaves[index]}"
            )
            proc.popen.send_signal(signal.SIGTERM)
            plan.left.add(index)
        elif crash is not None and proc.rounds_done >= crash.round:
            _logger.info(f"crash fault: SIGKILL {proc.name} (pid {proc.popen.pid}) after round {crash.round}")
            proc.popen.kill()
            proc.popen.wait(timeout=10.0)
            proc.crashed_at = time.monotonic()
            status.state = "crashed"
            status.detail = f"restart in {crash.restart_after_s:g} s" if crash.restart else "no restart"
            view.state_changed(status)
        return True
    if proc.running:
        proc.running = False
        proc.exit_codes.append(code)
        expected = EXIT_STOPPED if index in plan.left else 0
        status.detail = f"exit status {code}"
        if code != expected:
            status.state = "failed"
            view.state_changed(status)
            raise NodeFailedError(proc.name, code, last_error_line(proc.log), proc.log)
        if status.state not in ("done", "stopped", "removed"):  # else its record already said so
            status.state = "exited"
            view.state_changed(status)
    return False


def _roster_actions(
    scenario: Scenario, out: Path, procs: list[_Proc]
) -> list[tuple[int, Callable[[], None], frozenset[int], frozenset[int]]]:
    """One action per ``[[faults.roster]]``: sign the next version, publish it to a running member."""
    if not scenario.faults.roster:
        return []
    ids = [load_key_file(out / "keys" / f"{p.name}.key").peer_id for p in procs]
    added = {i for change in scenario.faults.roster for i in change.add}
    network = scenario.header.network or scenario.header.name
    book = RosterBook(out, network, {ids[i] for i in range(len(ids)) if i not in added})
    actions: list[tuple[int, Callable[[], None], frozenset[int], frozenset[int]]] = []
    for change in scenario.faults.roster:

        def act(change: RosterChange = change) -> None:
            target = next(
                p for i, p in enumerate(procs) if p.running and p.popen is not None and i not in change.remove
            )
            _, _, hello, _ = ports(str(read_toml(target.config, "config")["node"]["listen"]))
            version = book.change(
                remove=[ids[i] for i in change.remove], add=[ids[i] for i in change.add], to=hello
            )
            _logger.info(
                f"roster fault: version {version} (removes {list(change.remove)}, adds {list(change.add)}) "
                f"handed to {target.name}"
            )
            for i in change.add:  # a new member is given the roster that admits it, as an operator would
                doc = dict(read_toml(procs[i].config, "config"))
                doc["membership"] = {**doc["membership"], "roster": str(book.path_of(version))}
                procs[i].config.write_text(tomli_w.dumps(doc))

        actions.append((change.round, act, frozenset(change.add), frozenset(change.remove)))
    return actions


def describe_faults(faults: Faults) -> tuple[str, ...]:
    """One sentence per injected fault, as the report lists them."""
    described = [
        f"crash node{c.node} after round {c.round}, "
        + (f"restart after {c.restart_after_s:g} s" if c.restart else "no restart")
        for c in faults.crash
    ]
    described += [f"node{j.node} joins after round {j.round}" for j in faults.join]
    described += [f"node{lv.node} leaves gracefully after round {lv.round}" for lv in faults.leave]
    described += [
        f"roster version {k + 2} after round {c.round}: removes {list(c.remove)}, adds {list(c.add)}"
        for k, c in enumerate(faults.roster)
    ]
    described += [f"node{s.node} trains {s.factor:g}x slower" for s in faults.slow]
    described += [f"drop p={d.prob:g} on {list(d.link) or 'every link'}" for d in faults.drop]
    described += [
        f"node{a.node} attacks: {a.kind}" + (f" x{a.factor:g}" if a.factor else "") for a in faults.attack
    ]
    return tuple(described)


def report_setup(scenario: Scenario) -> Setup:
    """What the report states about ``scenario``; a ConfigError if its ``model.task`` is unknown."""
    model = scenario.templates["model"]
    return Setup(
        scenario=scenario.header.name,
        topology=scenario.header.topology,
        model=str(model.get("path", "")),
        task=str(model.get("task", "classification")),  # the node's default (docs/node.md)
        faults=describe_faults(scenario.faults),
        baselines=scenario.header.baselines,
        algorithm=algorithm_facts(scenario.templates),
    )


def algorithm_facts(templates: Mapping[str, Any]) -> dict[str, str | float | bool]:
    """The learning algorithm a scenario's nodes run and the settings it depends on (defaults filled in)."""
    gossip = decode(GossipSettings, dict(templates.get("gossip", {})), "gossip")
    train = decode(TrainSettings, dict(templates.get("train", {})), "train")
    lora = decode(LoraSettings, dict(templates.get("lora", {})), "lora")
    facts: dict[str, str | float | bool] = {"algorithm": gossip.algorithm}
    if gossip.algorithm in ("diloco", "fedadam"):
        facts |= {"outer_lr": gossip.outer_lr, "outer_momentum": gossip.outer_momentum}
    if gossip.algorithm == "scaffold":
        facts["drift_beta"] = gossip.drift_beta
    return facts | {
        "rule": gossip.rule,
        "consensus_rounds": gossip.consensus_rounds,
        "optimizer": train.optimizer,
        "lr": train.lr,
        "logit_adjustment": train.logit_adjustment,
        "freeze_a": lora.freeze_a,
    }


def run_scenario(path: Path, out: Path | None = None, view: ProgressView | None = None) -> Summary:
    """Run a scenario end to end; write its summary.json, report.md and plots; return the Summary.

    Progress goes to ``view`` (one log line per node and round by default).
    A node that fails stops the run at once (:class:`NodeFailedError`): the
    other nodes are stopped, no baseline runs and no report is written.
    """
    scenario = load_scenario(path)
    setup = report_setup(scenario)  # before any process starts: an unknown task fails now
    if out is None:
        out = Path("runs") / f"{scenario.header.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out.resolve()  # node configs live in subfolders: give them absolute paths
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs = write_node_configs(scenario, out)
    _logger.info(
        f"scenario {scenario.header.name}: {len(procs)} nodes on {scenario.header.topology}, "
        f"{procs[0].rounds} rounds, output in {out}"
    )
    _logger.info("starting the nodes; each loads its model before its first round")
    faults = scenario.faults
    starter = launcher(out / "prefork.log")  # the libraries imported once for every node of the run
    try:
        ok = run_processes(
            procs, faults.crash, scenario.header.timeout_s, view, joins=faults.join, leaves=faults.leave,
            roster_changes=_roster_actions(scenario, out, procs), starter=starter,
        )  # fmt: skip
        wall_s = time.monotonic() - started
        baseline_ok = True
        if scenario.header.baselines:
            baseline_procs = write_baseline_configs(scenario, out, procs)
            # Independent runs: one per core at a time beats oversubscribing the cores.
            cores = os.cpu_count() or 1
            _logger.info(
                f"baselines: training {', '.join(scenario.header.baselines)} without gossip "
                f"({len(baseline_procs)} runs, {min(cores, len(baseline_procs))} at a time) "
                "to compare against"
            )
            baseline_ok = run_processes(
                baseline_procs, (), scenario.header.timeout_s, view, max_parallel=cores, starter=starter
            )
    finally:
        starter.close()
    _logger.info("writing the report")
    summary = report_run(out, setup, wall_s=wall_s, ok=ok and baseline_ok)
    _logger.info(f"report: {out / 'report.md'}")
    return summary
