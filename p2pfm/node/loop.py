"""The node runtime: train -> publish -> collect -> mix -> evaluate -> checkpoint.

One round ``r`` on this node (adapt-then-combine D-PSGD):

1. train ``local_steps`` on the local shard (messages that arrive meanwhile
   wait in ZeroMQ's bounded queue);
2. ``protocol.start_round(r)`` arms the deadline; the adapter is encoded,
   signed and queued to every neighbour without blocking;
3. incoming messages are judged by the protocol until every present
   neighbour has delivered round >= r or the deadline passes;
4. Metropolis mixing (a missing neighbour's weight stays here), written
   back into the model in place;
5. evaluation on the global test split, checkpoint, metrics line.

A node that restarts with ``--resume`` reloads its checkpoint, listens for
up to one deadline to learn its neighbours' rounds, and jumps to the round a
strict majority of them confirm instead of making them wait (never past
``gossip.rounds``; skipped rounds are not counted as trained). Before it
sends an update it records the round and sequence number on disk, so that a
crash between sending and checkpointing resumes into a fresh round and never
signs a second, different update for a round it already sent (which its
neighbours would rightly take as equivocation).

The node's own I/O failing (disk full, no descriptors) is survived: a
checkpoint, snapshot or metrics write that fails is logged, counted under
``io_errors`` and tried again next round; training goes on.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.numpy

from p2pfm.config.node_config import NodeConfig
from p2pfm.core.errors import ConfigError
from p2pfm.core.evidence import encode_evidence, evidence_file_name
from p2pfm.core.identity import Identity, PeerId, load_key_file
from p2pfm.core.private_files import make_private_dir, write_private_file
from p2pfm.core.protocol import (
    EquivocationFound,
    GossipProtocol,
    MixSettings,
    ProtocolConfig,
    Rejected,
    RoundComplete,
)
from p2pfm.core.wire import limits_for_schema
from p2pfm.learn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from p2pfm.learn.learner import Learner
from p2pfm.net.link import Transport
from p2pfm.net.zmq_transport import ZmqTransport, raise_open_files_limit
from p2pfm.node.attacks import Attacker
from p2pfm.node.metrics import MetricsWriter

_POLL_S = 0.05  # receive granularity while waiting for neighbours
_PROOF_SENDS = 3  # rounds an equivocation proof is sent in (the receiver's inbox keeps only the newest)
_MAX_UNWRITTEN_RECORDS = 1000  # metrics records kept in memory while the disk refuses them
SENT_FILE = "sent.json"  # {"round": r, "seq": s} of the last update about to be sent


@dataclass
class _PendingProof:
    message: bytes
    to: list[PeerId]
    sends_left: int = _PROOF_SENDS


@dataclass(frozen=True)
class NodeResult:
    rounds_completed: int  # the last round this node reached (skipped rounds included)
    rounds_trained: int  # rounds it actually ran (trained, exchanged, mixed)
    final_eval: dict[str, float]
    stopped: bool  # True when a signal stopped the node before the last round
    adapter_saved: bool = True  # False: the final adapter could not be written (the checkpoint holds it)


class Node:
    """One gossip participant. ``run`` blocks until the last round or ``stop``."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        resume: bool = False,
        nodes_on_machine: int = 1,
        stop: threading.Event | None = None,
        log: Callable[[str], None] = print,
        transport: Transport | None = None,
        learner: Learner | None = None,
    ) -> None:
        """``transport`` replaces the ZeroMQ one built from the config (e.g. a
        ``p2pfm.net.memory.MemoryTransport`` to run the node in-process); the node
        closes it when it finishes. ``learner`` replaces the model the config
        describes (e.g. a ``p2pfm.learn.learner.QuadraticLearner`` to simulate
        without one)."""
        self.config = config
        self.resume = resume
        self.stop = stop or threading.Event()
        self.log = log
        self.identity: Identity = load_key_file(config.node.key)
        if config.roster is not None and self.identity.peer_id not in config.roster.ids:
            me = self.identity.peer_id.short
            raise ConfigError("node.key", f"this node ({me}) is not in the roster {config.node.roster}")
        self.name = config.node.name or self.identity.peer_id.short
        make_private_dir(config.node.out)
        self.open_files_limit = raise_open_files_limit()[0]
        if learner is None:
            from p2pfm.learn.adapter_learner import AdapterLearner  # noqa: PLC0415  torch only when a model runs

            learner = AdapterLearner(config, nodes_on_machine=nodes_on_machine)
        self.learner: Learner = learner
        wire_dtype = config.gossip.wire_dtype
        self.wire_dtypes = {spec.name: wire_dtype for spec in learner.schema}
        schema = tuple(dataclasses.replace(spec, dtype=wire_dtype) for spec in learner.schema)
        # Bounds from the largest legitimate message of this schema: nobody
        # makes us buffer more than that per connection (docs/security.md).
        # The float32 schema's bound too: a node with another wire dtype is
        # then refused as schema_mismatch (counted), not cut off by size.
        limits = max(
            (limits_for_schema(specs, network=config.node.network) for specs in (schema, learner.schema)),
            key=lambda lim: lim.max_message_bytes,
        )
        peers = {peer.id: peer.address for peer in config.peers}
        self.peer_names = {peer.id: peer.name for peer in config.peers}
        self.protocol = GossipProtocol(
            self.identity,
            peers,
            ProtocolConfig(
                network=config.node.network,
                fingerprint=learner.fingerprint,
                round_timeout_s=config.gossip.round_timeout_s,
                limits=limits,
                schema=schema,
                max_rounds_ahead=config.gossip.max_rounds_ahead,
                members=None if config.roster is None else frozenset(config.roster.ids),
            ),
        )
        self.mix_settings = MixSettings(
            config.gossip.rule, trim=config.gossip.trim, byzantine_weight=config.gossip.byzantine_weight
        )
        by_name = {peer.name: peer.id for peer in config.peers}
        self.transport: Transport | None = transport if config.gossip.mix else None
        if config.gossip.mix and transport is None:
            if config.transport.insecure:
                self.log(
                    f"[{self.name}] WARNING: transport.insecure = true: links are PLAINTEXT and "
                    "unauthenticated; anyone on the path can read them. Debugging only."
                )
            self.transport = ZmqTransport(
                config.node.listen,
                peers,
                config.transport,
                identity=self.identity,
                allowed=None if config.roster is None else config.roster.ids,
                max_message_bytes=limits.max_message_bytes,
                link_drop_prob={by_name[n]: p for n, p in config.faults.drop.items() if n in by_name},
                seed=config.shard.shard,
            )
        self.metrics = MetricsWriter(
            config.node.out / "metrics.jsonl", node=self.name, peer=self.identity.peer_id.hex
        )
        self._logged_rejections: set[tuple[str, str]] = set()
        self._internal_errors = 0  # messages whose handling raised (a bug, counted, never fatal)
        self._io_errors: Counter[str] = Counter()  # our own failed writes, by what; each retried
        self._proofs: list[_PendingProof] = []
        self._unwritten: list[tuple[str, dict[str, Any]]] = []  # metrics records not yet on disk
        self.rounds_trained = 0
        faults = config.faults
        self.attacker = (
            Attacker(faults.attack, faults.attack_factor, config.shard.shard) if faults.attack else None
        )
        if self.attacker is not None:
            self.log(f"[{self.name}] ATTACKER: sends {faults.attack} updates (fault injection)")

    # ------------------------------------------------------------------ run

    def run(self) -> NodeResult:
        try:
            return self._run()
        finally:
            if self.transport is not None:
                self.transport.close()
            self.metrics.close()

    def _run(self) -> NodeResult:
        gossip = self.config.gossip
        next_round = self._start()
        last_eval: dict[str, float] = {}
        completed = min(next_round - 1, gossip.rounds)
        while next_round <= gossip.rounds and not self.stop.is_set():
            last_eval = self._round(next_round)
            completed = next_round
            next_round = self._catch_up(next_round + 1)
        stopped = completed < gossip.rounds
        saved = stopped or self._save_adapter()
        self._write(
            "done", rounds_completed=completed, rounds_trained=self.rounds_trained, stopped=stopped,
            adapter_saved=saved and not stopped, **self._counters(),
        )  # fmt: skip
        self.log(
            f"[{self.name}] {'stopped' if stopped else 'done'} after round {completed} "
            f"({self.rounds_trained} rounds trained)"
        )
        return NodeResult(completed, self.rounds_trained, last_eval, stopped, adapter_saved=saved)

    def _save_adapter(self, attempts: int = 3) -> bool:
        """Write the final adapter; a failing disk gets a few tries, a second apart."""
        for attempt in range(attempts):
            if self._guard("adapter", self.learner.save, self.config.node.out / "adapter"):
                return True
            if attempt + 1 < attempts:
                time.sleep(1.0)
        self.log(
            f"[{self.name}] ERROR: could not write the final adapter to {self.config.node.out / 'adapter'}; "
            f"the checkpoint in {self.config.checkpoint_dir} holds it"
        )
        return False

    def _start(self) -> int:
        checkpoint = load_checkpoint(self.config.checkpoint_dir) if self.resume else None
        common = {
            **self.learner.describe(),
            "neighbours": sorted(self.peer_names.values()),
            "adapter_bytes": sum(spec.nbytes for spec in self.learner.schema),
            "max_message_bytes": self.protocol.config.limits.max_message_bytes,
            "open_files_limit": self.open_files_limit,
            "insecure": self.config.transport.insecure,
            "attack": self.config.faults.attack,
        }
        sent = _read_sent(self.config.node.out / SENT_FILE) if self.resume else None
        if checkpoint is None and sent is None:
            self._write("start", **common)
            if self.config.gossip.eval_every == 1:
                evaluation = self.learner.evaluate()
                self._write("round", round=0, eval=evaluation, train_loss=None, **self._counters())
                self.log(f"[{self.name}] round 0 (before training): {_fmt(evaluation)}")
            return 1
        last_round, last_seq = (checkpoint.round, checkpoint.seq) if checkpoint else (0, 0)
        if checkpoint is not None:
            self.learner.set_state(checkpoint.adapter)
            self.learner.load_state_dict(checkpoint.trainer)
            self.rounds_trained = checkpoint.rounds_trained
        if sent is not None and sent > (last_round, last_seq):
            # We sent round sent[0] and crashed before its checkpoint: that
            # round is spoken for; resume into the next one.
            self.log(f"[{self.name}] round {sent[0]} was sent but not checkpointed: resuming after it")
            last_round, last_seq = max(last_round, sent[0]), max(last_seq, sent[1])
        self.protocol.restore(last_round, last_seq)
        next_round = last_round + 1
        # Listen up to one deadline: neighbours that moved on tell us their round.
        deadline = time.monotonic() + self.config.gossip.round_timeout_s
        majority = len(self.protocol.neighbours) // 2 + 1
        while self.transport is not None and time.monotonic() < deadline and not self.stop.is_set():
            self._receive(_POLL_S)
            heard = self.protocol.heard_claims(time.monotonic())
            if len(heard) >= len(self.protocol.neighbours) or (
                len(heard) >= majority
                and self.protocol.catch_up_target(next_round, time.monotonic()) > next_round
            ):
                break
        self._write("resume", round=last_round, **common)
        self.log(f"[{self.name}] resumed after round {last_round}")
        return self._catch_up(next_round)

    def _catch_up(self, next_round: int) -> int:
        if not self.config.gossip.mix:
            return next_round
        target = min(self.protocol.catch_up_target(next_round, time.monotonic()), self.config.gossip.rounds)
        if target > next_round:
            self._write("caught_up", from_round=next_round, to_round=target, skipped=target - next_round)
            self.log(
                f"[{self.name}] a majority of neighbours are at round {target}: skipping from {next_round}"
            )
            return target
        return next_round

    def _round(self, round_: int) -> dict[str, float]:
        gossip, train = self.config.gossip, self.config.train
        started = time.monotonic()
        loss = self.learner.train_steps(train.local_steps)
        train_s = time.monotonic() - started
        if self.config.faults.slow_factor > 1.0:
            self.stop.wait((self.config.faults.slow_factor - 1.0) * train_s)
        self.rounds_trained += 1
        wait_s = 0.0
        heard: list[str] = []
        missing: list[str] = []
        timed_out = False
        if gossip.mix:
            self._receive(0.0)  # judge what arrived while we trained
            self.protocol.start_round(round_, time.monotonic())
            state = self.learner.get_state()
            self._publish(state)
            waited = time.monotonic()
            done = self._collect()
            wait_s = time.monotonic() - waited
            mixed = done.mix(state, self.mix_settings)
            self.learner.set_state(mixed)
            self._send_proofs()
            heard = sorted(self.peer_names[p] for p in done.updates)
            missing = sorted(self.peer_names[p] for p in done.missing)
            timed_out = done.timed_out
        evaluation: dict[str, float] = {}
        if round_ % gossip.eval_every == 0 or round_ == gossip.rounds:
            evaluation = self.learner.evaluate()
        adapter = self.learner.get_state()  # after mixing: what the checkpoint and snapshot keep
        self._save(round_, adapter)
        round_s = time.monotonic() - started
        counters = self._counters()
        self._write(
            "round", round=round_, rounds_trained=self.rounds_trained, train_loss=loss, eval=evaluation,
            heard=heard, missing=missing, timed_out=timed_out, train_s=train_s, wait_s=wait_s,
            round_s=round_s, **counters,
        )  # fmt: skip
        self.log(
            f"[{self.name}] round {round_}/{gossip.rounds} "
            f"{'' if loss is None else f'loss {loss:.3f} '}{_fmt(evaluation)} "
            f"heard {len(heard)}/{len(self.peer_names)} sent {counters['bytes_sent'] / 1e6:.2f} MB "
            f"recv {counters['bytes_received'] / 1e6:.2f} MB {round_s:.1f} s"
        )
        return evaluation

    def _publish(self, state: dict[str, Any]) -> None:
        """Record what we are about to send, then send it (see the module docstring)."""
        train = self.config.train
        samples, now_ms = train.local_steps * train.batch_size, int(time.time() * 1000)
        if self.attacker is not None:
            messages = self.attacker.messages(self.protocol, state, samples=samples, wall_time_ms=now_ms)
        else:
            messages = [
                self.protocol.make_update(
                    state, samples=samples, wall_time_ms=now_ms, wire_dtypes=self.wire_dtypes
                )
            ]
        sent = {"round": self.protocol.round, "seq": self.protocol.seq}
        if not self._guard("sent_record", write_private_file, self.config.node.out / SENT_FILE,
                           json.dumps(sent).encode()):  # fmt: skip
            # Unrecorded, a crash now could make us sign a second update for
            # this round after the restart: better to stay silent this round.
            self.log(f"[{self.name}] cannot record round {sent['round']} as sent: not sending it")
            return
        assert self.transport is not None
        for i, message in enumerate(messages):
            if i:  # an equivocating attacker: give the receivers time to read the first version
                self.stop.wait(0.3)
            self.transport.send(message)

    def _save(self, round_: int, adapter: dict[str, Any]) -> None:
        checkpoint = Checkpoint(
            round_, self.protocol.seq, adapter, self.learner.state_dict(), rounds_trained=self.rounds_trained
        )
        self._guard("checkpoint", save_checkpoint, self.config.checkpoint_dir, checkpoint)
        every = self.config.gossip.snapshot_every
        if every and round_ % every == 0:
            snapshots = self.config.node.out / "snapshots"
            self._guard("snapshot", _save_snapshot, snapshots, round_, adapter)

    def _guard(self, what: str, write: Callable[..., object], *args: Any) -> bool:
        """Run one of our own writes; an OSError is logged and counted, never fatal."""
        try:
            write(*args)
        except OSError as exc:
            self._io_failed(what, exc)
            return False
        return True

    def _io_failed(self, what: str, exc: OSError) -> None:
        """Count a failed write; log the 1st, 10th, 100th and every 1000th (no log floods)."""
        self._io_errors[what] += 1
        count = self._io_errors[what]
        if count in (1, 10, 100) or count % 1000 == 0:
            self.log(
                f"[{self.name}] ERROR: {what} write failed ({exc}); "
                f"{count} so far, retried later, training goes on"
            )

    def _write(self, event: str, **fields: Any) -> None:
        """Append a metrics record; records that fail to write are kept (bounded) and retried first."""
        self._unwritten.append((event, {"time_s": time.time(), **fields}))
        while self._unwritten:
            pending_event, pending_fields = self._unwritten[0]
            try:
                self.metrics.write(pending_event, **pending_fields)
            except OSError as exc:
                self._io_failed("metrics", exc)
                del self._unwritten[:-_MAX_UNWRITTEN_RECORDS]  # keep the newest
                return
            self._unwritten.pop(0)

    def _collect(self) -> RoundComplete:
        while True:
            event = self.protocol.poll(time.monotonic())
            if event is not None:
                return event
            if self.stop.is_set():  # shutting down: finish the round with what we have
                event = self.protocol.poll(self.protocol.deadline_s)
                assert event is not None
                return event
            wait_s = max(0.0, min(_POLL_S, self.protocol.deadline_s - time.monotonic()))
            self._receive(wait_s)

    def _receive(self, timeout_s: float) -> None:
        if self.transport is None:
            return
        for received in self.transport.receive(timeout_s):
            try:
                event = self.protocol.receive(
                    received.message, time.monotonic(), int(time.time() * 1000), link=received.link
                )
                if isinstance(event, EquivocationFound):
                    self._on_equivocation(event)
            except Exception as exc:  # noqa: BLE001  a bug must not let one message stop a node
                self._internal_errors += 1
                self.log(f"[{self.name}] BUG: a message raised {exc!r}; dropped it and carried on")
                continue
            if isinstance(event, Rejected):
                sender = event.sender.short if event.sender else "?"
                key = (sender, event.reason.value)
                if key not in self._logged_rejections:  # once per sender and reason: no log floods
                    self._logged_rejections.add(key)
                    reason = event.reason.value
                    self.log(f"[{self.name}] rejected a message from {sender}: {reason} ({event.detail})")

    def _on_equivocation(self, event: EquivocationFound) -> None:
        if not event.new:
            return
        accused = self.peer_names.get(event.accused, event.accused.short)
        via = (
            "seen here"
            if event.reporter is None
            else f"proof from {self.peer_names.get(event.reporter, '?')}"
        )
        path = self.config.node.out / "evidence" / evidence_file_name(event.accused.hex, event.round)
        self.log(
            f"[{self.name}] EQUIVOCATION by {accused} in round {event.round} ({via}): banned; proof in {path}"
        )
        proof_file = encode_evidence(self.config.node.network, event.evidence)
        self._guard("evidence", _write_evidence, path, proof_file)
        to = [p for p in self.protocol.neighbours if p not in (event.accused, event.reporter)]
        self._proofs.append(_PendingProof(self.protocol.make_proof(event.evidence), to))
        self._send_proofs()

    def _send_proofs(self) -> None:
        """Pass proofs on, in a few rounds: a receiver's inbox keeps only its newest message per link."""
        if self.transport is None:
            return
        for proof in self._proofs:
            self.transport.send(proof.message, proof.to)
            proof.sends_left -= 1
        self._proofs = [p for p in self._proofs if p.sends_left > 0]

    def _counters(self) -> dict[str, Any]:
        stats = self.transport.stats if self.transport else None
        return {
            "bytes_sent": stats.bytes_sent if stats else 0,
            "bytes_received": stats.bytes_received if stats else 0,
            "messages_sent": stats.messages_sent if stats else 0,
            "messages_received": stats.messages_received if stats else 0,
            "dropped": dict(stats.dropped) if stats else {},
            "refused_connections": stats.refused_connections if stats else 0,
            "connections_accepted": stats.connections_accepted if stats else 0,
            "handshake_failures": dict(stats.handshake_failures) if stats else {},
            "rejected": {reason.value: n for reason, n in self.protocol.rejections.items()},
            "banned": sorted(self.peer_names.get(p, p.short) for p in self.protocol.banned),
            "internal_errors": self._internal_errors,
            "io_errors": dict(self._io_errors),
        }


def _read_sent(path: Path) -> tuple[int, int] | None:
    """The (round, seq) of the last update this node recorded before sending; None if none."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return int(doc["round"]), int(doc["seq"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("node.out", f"{path} is unreadable ({exc}); remove it to start over") from None


def _save_snapshot(folder: Path, round_: int, adapter: dict[str, Any]) -> None:
    make_private_dir(folder)
    write_private_file(folder / f"round_{round_:05d}.safetensors", safetensors.numpy.save(adapter))


def _write_evidence(path: Path, data: bytes) -> None:
    make_private_dir(path.parent)
    write_private_file(path, data)


def _fmt(evaluation: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in evaluation.items())
