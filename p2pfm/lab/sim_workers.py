"""The simulator over several processes: one part of the graph per worker, in lock-stepped windows.

Every link is at least ``latency_s`` long, so a message sent at virtual time
t arrives no earlier than t + latency_s. The coordinator (this process)
therefore lets every worker run all its events before ``T + latency_s``,
where T is the earliest pending event anywhere; the messages those events
send to other parts arrive at or after the window's end, and are handed to
their receivers' workers before the next window starts. Nothing arrives in
a worker's past, and the run equals the single-process one.

A message for several receivers in one other part crosses the pipe once.
The workers are forked processes, stopped by the coordinator whatever
happens (terminated, then killed, by their handle).
"""

from __future__ import annotations

import math
import multiprocessing
import traceback
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from typing import Any

from p2pfm.core.errors import LocalProtocolError
from p2pfm.core.identity import PeerId
from p2pfm.lab.virtual import NodeOutcome, RoundTally, VirtualScheduler
from p2pfm.net.memory import Forward

# Builds the scheduler of one part: (node indices, forward) -> scheduler (p2pfm.lab.sim.build_part, bound).
PartBuilder = Callable[[list[int], Forward], VirtualScheduler]

# One message for one part: its bytes and each (sender, receiver, deliver_at_s) that carries it.
Batch = tuple[bytes, list[tuple[PeerId, PeerId, float]]]
_JOIN_S = 10.0


def run_parts(
    build: PartBuilder, parts: list[list[int]], peers: Mapping[PeerId, int], *, latency_s: float
) -> tuple[list[NodeOutcome], dict[int, RoundTally]]:
    """Run the simulation with one worker process per part; merge what they saw.

    ``peers`` maps every node's peer id to its index; ``latency_s`` is the
    shortest link (the length of a window).
    """
    context = multiprocessing.get_context("fork")  # the workers share this process's imports
    part_of = {i: k for k, part in enumerate(parts) for i in part}
    owner = {peer: part_of[i] for peer, i in peers.items()}
    pipes: list[Connection] = []
    processes = []
    try:
        for k, part in enumerate(parts):
            parent_end, child_end = context.Pipe()
            process = context.Process(
                target=_worker, args=(child_end, build, part, owner), name=f"p2pfm-sim-{k}"
            )
            process.start()
            child_end.close()
            pipes.append(parent_end)
            processes.append(process)
        next_s = [_reply(pipe)[0] for pipe in pipes]
        pending: list[list[Batch]] = [[] for _ in parts]
        while True:
            arriving = [at for batches in pending for _, routes in batches for *_, at in routes]
            start_s = min([*next_s, *arriving], default=math.inf)
            if start_s == math.inf:
                break
            end_s = start_s + latency_s
            for k, pipe in enumerate(pipes):
                pipe.send(("run", end_s, pending[k]))
                pending[k] = []
            for k, pipe in enumerate(pipes):
                next_s[k], outgoing = _reply(pipe)
                for target, batches in outgoing.items():
                    pending[target].extend(batches)
        outcomes: list[NodeOutcome] = []
        tallies: dict[int, RoundTally] = {}
        for pipe in pipes:
            pipe.send(("end", 0.0, []))
            part_outcomes, part_tallies = _reply(pipe)
            outcomes.extend(part_outcomes)
            for round_, tally in part_tallies.items():
                tallies.setdefault(round_, RoundTally()).merge(tally)
        return outcomes, tallies
    finally:
        for pipe in pipes:
            pipe.close()
        for process in processes:
            process.join(_JOIN_S)
            if process.is_alive():
                process.terminate()
                process.join(_JOIN_S)
            if process.is_alive():
                process.kill()
                process.join()


def _reply(pipe: Connection) -> Any:
    kind, body = pipe.recv()
    if kind == "error":
        raise LocalProtocolError(f"a simulator worker failed:\n{body}")
    return body


def _worker(pipe: Connection, build: PartBuilder, part: list[int], owner: Mapping[PeerId, int]) -> None:
    try:
        outgoing: dict[int, dict[int, Batch]] = {}

        def forward(sender: PeerId, receiver: PeerId, deliver_at_s: float, message: bytes) -> None:
            # One entry per message object: MemoryTransport.send hands every receiver the same bytes.
            batches = outgoing.setdefault(owner[receiver], {})
            batches.setdefault(id(message), (message, []))[1].append((sender, receiver, deliver_at_s))

        scheduler = build(part, forward)
        pipe.send(("ok", (scheduler.next_event_s(), {})))
        while True:
            command, end_s, batches = pipe.recv()
            if command == "end":
                pipe.send(("ok", (scheduler.outcomes(), scheduler.tallies)))
                return
            for message, routes in batches:
                for sender, receiver, deliver_at_s in routes:
                    scheduler.network.inject(sender, receiver, deliver_at_s, message)
            scheduler.run_until(end_s)
            sent = {target: list(by_id.values()) for target, by_id in outgoing.items()}
            outgoing.clear()
            pipe.send(("ok", (scheduler.next_event_s(), sent)))
    except Exception:  # noqa: BLE001  reported to the coordinator, which raises it
        pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()
