"""Live progress of a local run: what every node process is doing, read from its metrics as they grow.

The runner (p2pfm/lab/scenario.py) owns the processes; this module only
reads each node's ``metrics.jsonl`` incrementally (:class:`MetricsTail`),
keeps one :class:`NodeStatus` per process, and hands them to a view:

- :class:`LineView`: one log line per node and round, and one per change of
  state (started, loading done, exited), for logs and pipes;
- :class:`LiveView`: a table redrawn in place on a terminal (rich).

Everything shown is what the node itself recorded (docs/node.md lists the
fields); the runner adds only the process states it alone knows (waiting to
start, crashed, restarting, exited with a status).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.live import Live
from rich.table import Table

_logger = logging.getLogger(__name__)
_MAX_LINE_BYTES = 1 << 20  # a metrics line longer than this is not a record this runner wrote


class MetricsTail:
    """The records appended to a JSON-lines file since the last call; a torn last line waits for its end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_records(self) -> Iterator[dict[str, Any]]:
        try:
            with self.path.open("rb") as handle:
                if os.fstat(handle.fileno()).st_size < self._offset:  # replaced by a new file: start over
                    self._offset, self._partial = 0, b""
                handle.seek(self._offset)
                chunk = handle.read()
        except FileNotFoundError:
            return
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _MAX_LINE_BYTES:
            self._partial = b""
        for line in lines:
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict):
                yield record


@dataclass
class NodeStatus:
    """One node process as the run sees it; ``state`` is one of :data:`STATES`."""

    name: str
    rounds: int  # planned
    state: str = "waiting"
    round: int = -1  # the last round it completed (0: the evaluation before training)
    loss: float | None = None  # the last round's mean training loss
    evaluation: dict[str, float] = field(default_factory=dict)  # the last evaluation
    heard: int = 0  # neighbours counted in the last round
    neighbours: int = 0  # neighbours it had in the last round
    bytes_sent: int = 0
    bytes_received: int = 0
    refused: int = 0  # messages its protocol refused, all reasons
    detail: str = ""  # why it is in this state (an exit status, a restart delay)

    def absorb(self, record: Mapping[str, Any]) -> bool:
        """Take one metrics record; True when it completed a round (worth a line)."""
        event = record.get("event")
        if event in ("start", "resume"):
            self.state, self.detail = "training", ""
            return False
        if event == "removed":
            self.state = "removed"
            return False
        if event == "done":
            self.state = "stopped" if record.get("stopped") else "done"
            return False
        if event != "round" or not isinstance(record.get("round"), int):
            return False
        self.round = int(record["round"])
        loss = record.get("train_loss")
        self.loss = float(loss) if isinstance(loss, (int, float)) else self.loss
        evaluation = record.get("eval")
        if isinstance(evaluation, dict) and evaluation:
            self.evaluation = {k: float(v) for k, v in evaluation.items() if isinstance(v, (int, float))}
        heard, missing = record.get("heard"), record.get("missing")
        if isinstance(heard, list) and isinstance(missing, list):
            self.heard, self.neighbours = len(heard), len(heard) + len(missing)
        self.bytes_sent = _int(record.get("bytes_sent"), self.bytes_sent)
        self.bytes_received = _int(record.get("bytes_received"), self.bytes_received)
        rejected = record.get("rejected")
        if isinstance(rejected, dict):
            self.refused = sum(v for v in rejected.values() if isinstance(v, int))
        return True

    def line(self) -> str:
        """The node's last round on one line."""
        parts = [f"{self.name} round {self.round}/{self.rounds}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        parts += [f"test {k} {v:.3f}" for k, v in self.evaluation.items()]
        if self.neighbours:
            parts.append(f"heard {self.heard}/{self.neighbours}")
        parts.append(f"sent {self.bytes_sent / 1e6:.2f} MB")
        if self.refused:
            parts.append(f"refused {self.refused}")
        return " ".join(parts)


def _int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class ProgressView(Protocol):
    """Where a run shows its nodes' progress."""

    def round_done(self, status: NodeStatus) -> None: ...

    def state_changed(self, status: NodeStatus) -> None: ...

    def refresh(self, statuses: Sequence[NodeStatus]) -> None: ...

    def close(self) -> None: ...


class LineView:
    """One log line per node and round, and one per change of state (logs, pipes, CI)."""

    def round_done(self, status: NodeStatus) -> None:
        _logger.info(status.line())

    def state_changed(self, status: NodeStatus) -> None:
        detail = f" ({status.detail})" if status.detail else ""
        _logger.info(f"{status.name}: {status.state}{detail}")

    def refresh(self, statuses: Sequence[NodeStatus]) -> None:
        pass

    def close(self) -> None:
        pass


class LiveView:
    """A table of every node redrawn in place (a terminal); log lines scroll above it."""

    def __init__(self, console: Console, title: str) -> None:
        self._title = title
        self._live = Live(console=console, refresh_per_second=4, transient=False)
        self._live.start()

    def round_done(self, status: NodeStatus) -> None:
        pass

    def state_changed(self, status: NodeStatus) -> None:
        if status.state in ("failed", "crashed"):
            self._live.console.print(f"{status.name}: {status.state} ({status.detail})")

    def refresh(self, statuses: Sequence[NodeStatus]) -> None:
        self._live.update(status_table(statuses, self._title))

    def close(self) -> None:
        self._live.stop()


def status_table(statuses: Sequence[NodeStatus], title: str) -> Table:
    """The live table: one row per node."""
    metrics = sorted({k for s in statuses for k in s.evaluation})
    table = Table(title=title)
    for name, justify in (("node", "left"), ("state", "left"), ("round", "right"), ("train loss", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for metric in metrics:
        table.add_column(f"test {metric}", justify="right")
    for name in ("heard", "MB sent", "MB recv", "refused"):
        table.add_column(name, justify="right")
    for s in statuses:
        table.add_row(
            s.name,
            s.state + (f" ({s.detail})" if s.detail else ""),
            f"{max(s.round, 0)}/{s.rounds}",
            "" if s.loss is None else f"{s.loss:.3f}",
            *(f"{s.evaluation[m]:.3f}" if m in s.evaluation else "" for m in metrics),
            f"{s.heard}/{s.neighbours}" if s.neighbours else "",
            f"{s.bytes_sent / 1e6:.2f}",
            f"{s.bytes_received / 1e6:.2f}",
            str(s.refused),
        )
    return table


def last_error_line(log: Path, max_bytes: int = 64 * 1024) -> str:
    """The last non-empty line of a node's log (a traceback's last line names the error)."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - max_bytes))
            tail = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""
