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
up to one deadline to learn its neighbours' round, and jumps to it instead
of making them wait; whenever a neighbour shows a round ahead of ours, we
jump to it at the end of the round.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import safetensors.numpy

from p2pfm.adapter import AdapterModel, build_adapter_model, get_state, save_adapter, set_state
from p2pfm.attacks import Attacker
from p2pfm.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from p2pfm.config import NodeConfig
from p2pfm.consensus import metropolis_weights, robust_mix
from p2pfm.errors import ConfigError
from p2pfm.identity import Identity, load_key_file
from p2pfm.metrics import MetricsWriter
from p2pfm.protocol import GossipProtocol, ProtocolConfig, Rejected, RoundComplete
from p2pfm.train import Trainer
from p2pfm.transport import Transport

_POLL_S = 0.05  # receive granularity while waiting for neighbours


@dataclass(frozen=True)
class NodeResult:
    rounds_completed: int
    final_eval: dict[str, float]
    stopped: bool  # True when a signal stopped the node before the last round


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
    ) -> None:
        self.config = config
        self.resume = resume
        self.stop = stop or threading.Event()
        self.log = log
        self.identity: Identity = load_key_file(config.node.key)
        if config.roster is not None and self.identity.peer_id not in config.roster.ids:
            me = self.identity.peer_id.short
            raise ConfigError("node.key", f"this node ({me}) is not in the roster {config.node.roster}")
        self.name = config.node.name or self.identity.peer_id.short
        self.am: AdapterModel = build_adapter_model(config.model, config.lora, seed=config.gossip.seed)
        test, shards = config.data.node_shards(config.shard.shards)
        labels = test.label_names
        if config.model.task == "classification" and config.model.num_labels != len(labels):
            raise ConfigError(
                "model.num_labels",
                f"the data has {len(labels)} labels ({', '.join(labels)}); set num_labels = {len(labels)}",
            )
        self.test = test.examples
        self.shard = shards[config.shard.shard]
        self.trainer = Trainer(
            self.am,
            self.shard.examples,
            config.train,
            seed=config.gossip.seed * 100_003 + config.shard.shard,
            nodes_on_machine=nodes_on_machine,
        )
        wire_dtype = config.gossip.wire_dtype
        self.wire_dtypes = {spec.name: wire_dtype for spec in self.am.schema}
        schema = tuple(dataclasses.replace(spec, dtype=wire_dtype) for spec in self.am.schema)
        peers = {peer.id: peer.address for peer in config.peers}
        self.peer_names = {peer.id: peer.name for peer in config.peers}
        self.protocol = GossipProtocol(
            self.identity,
            peers,
            ProtocolConfig(
                network=config.node.network,
                fingerprint=self.am.fingerprint,
                round_timeout_s=config.gossip.round_timeout_s,
                schema=schema,
            ),
        )
        by_name = {peer.name: peer.id for peer in config.peers}
        self.transport: Transport | None = None
        if config.gossip.mix:
            if config.transport.insecure:
                self.log(
                    f"[{self.name}] WARNING: transport.insecure = true: links are PLAINTEXT and "
                    "unauthenticated; anyone on the path can read them. Debugging only."
                )
            self.transport = Transport(
                config.node.listen,
                peers,
                config.transport,
                identity=self.identity,
                allowed=None if config.roster is None else config.roster.ids,
                link_drop_prob={by_name[n]: p for n, p in config.faults.drop.items() if n in by_name},
                seed=config.shard.shard,
            )
        self.metrics = MetricsWriter(
            config.node.out / "metrics.jsonl", node=self.name, peer=self.identity.peer_id.hex
        )
        self._logged_rejections: set[tuple[str, str]] = set()
        self._internal_errors = 0  # messages whose handling raised (a bug, counted, never fatal)
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
        completed = next_round - 1
        while next_round <= gossip.rounds and not self.stop.is_set():
            last_eval = self._round(next_round)
            completed = next_round
            next_round = self._catch_up(next_round + 1)
        stopped = completed < gossip.rounds
        if not stopped:
            save_adapter(self.am, self.config.node.out / "adapter")
        self.metrics.write("done", rounds_completed=completed, stopped=stopped, **self._counters())
        self.log(f"[{self.name}] {'stopped' if stopped else 'done'} after round {completed}")
        return NodeResult(completed, last_eval, stopped)

    def _start(self) -> int:
        checkpoint = load_checkpoint(self.config.checkpoint_dir) if self.resume else None
        common = {
            "shard_examples": len(self.shard),
            "test_examples": len(self.test),
            "device": str(self.trainer.device),
            "autocast": str(self.trainer.autocast_dtype or "fp32"),
            "neighbours": sorted(self.peer_names.values()),
            "adapter_bytes": sum(spec.nbytes for spec in self.am.schema),
            "insecure": self.config.transport.insecure,
            "attack": self.config.faults.attack,
        }
        if checkpoint is None:
            self.metrics.write("start", **common)
            if self.config.gossip.eval_every == 1:
                evaluation = self.trainer.evaluate(self.test)
                self.metrics.write("round", round=0, eval=evaluation, train_loss=None, **self._counters())
                self.log(f"[{self.name}] round 0 (before training): {_fmt(evaluation)}")
            return 1
        set_state(self.am, checkpoint.adapter)
        self.trainer.load_state_dict(checkpoint.trainer)
        self.protocol.restore(checkpoint.round, checkpoint.seq)
        next_round = checkpoint.round + 1
        # Listen up to one deadline: neighbours that moved on tell us their round.
        deadline = time.monotonic() + self.config.gossip.round_timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            self._receive(_POLL_S)
            if self.protocol.highest_peer_round >= next_round:
                break
        self.metrics.write("resume", round=checkpoint.round, **common)
        self.log(f"[{self.name}] resumed after round {checkpoint.round}")
        return self._catch_up(next_round)

    def _catch_up(self, next_round: int) -> int:
        ahead = self.protocol.highest_peer_round
        if ahead > next_round and self.config.gossip.mix:
            self.metrics.write("caught_up", from_round=next_round, to_round=ahead)
            self.log(f"[{self.name}] neighbours are at round {ahead}: jumping from {next_round}")
            return ahead
        return next_round

    def _round(self, round_: int) -> dict[str, float]:
        gossip, train = self.config.gossip, self.config.train
        started = time.monotonic()
        loss = self.trainer.train_steps(train.local_steps) if train.local_steps else None
        train_s = time.monotonic() - started
        if self.config.faults.slow_factor > 1.0:
            self.stop.wait((self.config.faults.slow_factor - 1.0) * train_s)
        wait_s = 0.0
        heard: list[str] = []
        missing: list[str] = []
        timed_out = False
        if gossip.mix:
            self._receive(0.0)  # judge what arrived while we trained
            self.protocol.start_round(round_, time.monotonic())
            state = get_state(self.am)
            samples, now_ms = train.local_steps * train.batch_size, int(time.time() * 1000)
            if self.attacker is not None:
                frames = self.attacker.frames(self.protocol, state, samples=samples, wall_time_ms=now_ms)
            else:
                frames = self.protocol.make_update(
                    state, samples=samples, wall_time_ms=now_ms, wire_dtypes=self.wire_dtypes
                )
            assert self.transport is not None
            self.transport.send(frames)
            waited = time.monotonic()
            done = self._collect()
            wait_s = time.monotonic() - waited
            weights = metropolis_weights(
                len(self.protocol.neighbours), {p: u.degree for p, u in done.updates.items()}
            )
            mixed = robust_mix(
                gossip.rule,
                state,
                {p: u.tensors for p, u in done.updates.items()},
                weights,
                trim=gossip.trim,
                byzantine_weight=gossip.byzantine_weight,
            )
            set_state(self.am, mixed)
            heard = sorted(self.peer_names[p] for p in done.updates)
            missing = sorted(self.peer_names[p] for p in done.missing)
            timed_out = done.timed_out
        evaluation: dict[str, float] = {}
        if round_ % gossip.eval_every == 0 or round_ == gossip.rounds:
            evaluation = self.trainer.evaluate(self.test)
        adapter = get_state(self.am)  # after mixing: what the checkpoint and snapshot keep
        save_checkpoint(
            self.config.checkpoint_dir,
            Checkpoint(round_, self.protocol.seq, adapter, self.trainer.state_dict()),
        )
        every = gossip.snapshot_every
        if every and round_ % every == 0:
            snapshots = self.config.node.out / "snapshots"
            snapshots.mkdir(exist_ok=True)
            safetensors.numpy.save_file(adapter, str(snapshots / f"round_{round_:05d}.safetensors"))
        round_s = time.monotonic() - started
        counters = self._counters()
        self.metrics.write(
            "round", round=round_, train_loss=loss, eval=evaluation, heard=heard, missing=missing,
            timed_out=timed_out, train_s=train_s, wait_s=wait_s, round_s=round_s, **counters,
        )  # fmt: skip
        self.log(
            f"[{self.name}] round {round_}/{gossip.rounds} "
            f"{'' if loss is None else f'loss {loss:.3f} '}{_fmt(evaluation)} "
            f"heard {len(heard)}/{len(self.peer_names)} sent {counters['bytes_sent'] / 1e6:.2f} MB "
            f"recv {counters['bytes_received'] / 1e6:.2f} MB {round_s:.1f} s"
        )
        return evaluation

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
        for frames in self.transport.receive(timeout_s):
            try:
                event = self.protocol.receive(frames, time.monotonic(), int(time.time() * 1000))
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

    def _counters(self) -> dict[str, Any]:
        stats = self.transport.stats if self.transport else None
        return {
            "bytes_sent": stats.bytes_sent if stats else 0,
            "bytes_received": stats.bytes_received if stats else 0,
            "messages_sent": stats.messages_sent if stats else 0,
            "messages_received": stats.messages_received if stats else 0,
            "dropped": dict(stats.dropped) if stats else {},
            "refused_connections": stats.refused_connections if stats else 0,
            "rejected": {reason.value: n for reason, n in self.protocol.rejections.items()},
            "internal_errors": self._internal_errors,
        }


def _fmt(evaluation: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in evaluation.items())
