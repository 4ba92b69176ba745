"""Where a node keeps what outlives a round: checkpoint, sent record, snapshots, evidence, metrics.

``DiskStore`` is the node's out folder (docs/node.md lists its files).
Its own I/O failing (disk full, no descriptors) is survived: a write that
fails is logged, counted in ``io_errors`` by what it was, and tried again the
next time (metrics records are kept, bounded, and written first when the disk
takes them again). ``MemoryStore`` keeps the same things in memory, for
simulations of many nodes in one process.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import msgpack
import safetensors.numpy

from p2pfm.core.errors import ConfigError
from p2pfm.core.evidence import evidence_file_name
from p2pfm.core.logs import node_logger
from p2pfm.core.private_files import make_private_dir, write_private_file
from p2pfm.learn.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from p2pfm.learn.learner import Array, Learner
from p2pfm.node.metrics import MetricsWriter

SENT_FILE = "sent.json"  # {"round": r, "seq": s} of the last update about to be sent
PEERS_FILE = "peers.msgpack"  # the signed peer records an open network's node knew last (to rejoin)
_MAX_PEERS_FILE_BYTES = 4 * 2**20
_MAX_UNWRITTEN_RECORDS = 1000  # metrics records kept in memory while the disk refuses them
_FINAL_ATTEMPTS = 3  # the final adapter gets a few tries, a second apart


class NodeStore(Protocol):
    io_errors: Counter[str]  # failed writes by what (each retried later)

    def load(self) -> tuple[Checkpoint | None, tuple[int, int] | None]:
        """The last checkpoint and the last (round, seq) recorded as sent, each None when there is none."""
        ...

    def record_sent(self, round_: int, seq: int) -> bool:
        """Durably note that round ``round_`` (sequence ``seq``) is about to be sent; False if that failed."""
        ...

    def save_round(self, checkpoint: Checkpoint, *, snapshot: bool) -> None: ...

    def save_evidence(self, accused_hex: str, round_: int, data: bytes) -> str:
        """Keep an equivocation proof; returns where (for the log)."""
        ...

    def save_final(self, learner: Learner) -> bool: ...

    def save_peers(self, records: list[bytes]) -> None:
        """Keep the signed peer records this node knows (an open network's node rejoins from them)."""
        ...

    def load_peers(self) -> list[bytes]:
        """The records ``save_peers`` kept (unchecked: the caller verifies each), or none."""
        ...

    def write(self, event: str, **fields: Any) -> None:
        """Append one metrics record."""
        ...

    def close(self) -> None: ...


class DiskStore:
    """A node's out folder (0700; files 0600)."""

    def __init__(self, out: Path, *, name: str, common: dict[str, Any]) -> None:
        self.out = out
        self.checkpoint_dir = out / "checkpoint"
        self.name = name
        self.log = node_logger(__name__, name)
        make_private_dir(out)
        self.metrics = MetricsWriter(out / "metrics.jsonl", **common)
        self.io_errors: Counter[str] = Counter()
        self._unwritten: list[tuple[str, dict[str, Any]]] = []
        # Fed every record as the node writes it (the /metrics exporter, p2pfm/node/prometheus.py), also
        # while the disk refuses it: the same dict, time_s included, that metrics.jsonl gets.
        self.observers: list[Callable[[Mapping[str, Any]], None]] = []
        self._observer_errors = 0

    def load(self) -> tuple[Checkpoint | None, tuple[int, int] | None]:
        return load_checkpoint(self.checkpoint_dir), _read_sent(self.out / SENT_FILE)

    def record_sent(self, round_: int, seq: int) -> bool:
        record = json.dumps({"round": round_, "seq": seq}).encode()
        return self._guard("sent_record", write_private_file, self.out / SENT_FILE, record)

    def save_round(self, checkpoint: Checkpoint, *, snapshot: bool) -> None:
        self._guard("checkpoint", save_checkpoint, self.checkpoint_dir, checkpoint)
        if snapshot:
            self._guard(
                "snapshot", _save_snapshot, self.out / "snapshots", checkpoint.round, checkpoint.adapter
            )

    def save_evidence(self, accused_hex: str, round_: int, data: bytes) -> str:
        path = self.out / "evidence" / evidence_file_name(accused_hex, round_)
        self._guard("evidence", _write_file, path, data)
        return str(path)

    def save_peers(self, records: list[bytes]) -> None:
        self._guard("peers", _write_file, self.out / PEERS_FILE, msgpack.packb(records, use_bin_type=True))

    def load_peers(self) -> list[bytes]:
        path = self.out / PEERS_FILE
        try:
            if path.stat().st_size > _MAX_PEERS_FILE_BYTES:
                return []
            value = msgpack.unpackb(path.read_bytes(), raw=False, max_array_len=4096, max_bin_len=4096)
        except (OSError, ValueError, msgpack.UnpackException):
            return []  # unreadable: start from the bootstrap addresses alone
        return [v for v in value if isinstance(v, bytes)] if isinstance(value, list) else []

    def save_final(self, learner: Learner) -> bool:
        folder = self.out / "adapter"
        for attempt in range(_FINAL_ATTEMPTS):
            if self._guard("adapter", learner.save, folder):
                return True
            if attempt + 1 < _FINAL_ATTEMPTS:
                time.sleep(1.0)
        self.log.error(
            f"could not write the final adapter to {folder}; the checkpoint in {self.checkpoint_dir} holds it"
        )
        return False

    def write(self, event: str, **fields: Any) -> None:
        stamped = {"time_s": time.time(), **fields}
        self._unwritten.append((event, stamped))
        self._observe({"event": event, **stamped})
        while self._unwritten:
            pending_event, pending_fields = self._unwritten[0]
            try:
                self.metrics.write(pending_event, **pending_fields)
            except OSError as exc:
                self._io_failed("metrics", exc)
                del self._unwritten[:-_MAX_UNWRITTEN_RECORDS]  # keep the newest
                return
            self._unwritten.pop(0)

    def close(self) -> None:
        self.metrics.close()

    def _observe(self, record: Mapping[str, Any]) -> None:
        for observe in self.observers:
            try:
                observe(record)
            except Exception as exc:  # noqa: BLE001  a bug in an exporter must not stop a node
                self._observer_errors += 1
                if self._observer_errors == 1:  # once: no log floods
                    self.log.error(f"BUG: a metrics observer raised {exc!r}; metrics.jsonl has the records")

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
        self.io_errors[what] += 1
        count = self.io_errors[what]
        if count in (1, 10, 100) or count % 1000 == 0:
            self.log.error(f"{what} write failed ({exc}); {count} so far, retried later, training goes on")


class MemoryStore:
    """The same in memory: the newest checkpoint and sent record, every metrics record, no files."""

    def __init__(self, **common: Any) -> None:
        self.common = common
        self.io_errors: Counter[str] = Counter()
        self.checkpoint: Checkpoint | None = None
        self.sent: tuple[int, int] | None = None
        self.records: list[dict[str, Any]] = []
        self.evidence: dict[str, bytes] = {}
        self.final: dict[str, Array] | None = None
        self.peers: list[bytes] = []

    def save_peers(self, records: list[bytes]) -> None:
        self.peers = list(records)

    def load_peers(self) -> list[bytes]:
        return list(self.peers)

    def load(self) -> tuple[Checkpoint | None, tuple[int, int] | None]:
        return self.checkpoint, self.sent

    def record_sent(self, round_: int, seq: int) -> bool:
        self.sent = (round_, seq)
        return True

    def save_round(self, checkpoint: Checkpoint, *, snapshot: bool) -> None:
        self.checkpoint = checkpoint

    def save_evidence(self, accused_hex: str, round_: int, data: bytes) -> str:
        name = evidence_file_name(accused_hex, round_)
        self.evidence[name] = data
        return f"memory:{name}"

    def save_final(self, learner: Learner) -> bool:
        self.final = learner.get_state()
        return True

    def write(self, event: str, **fields: Any) -> None:
        self.records.append({"event": event, **self.common, **fields})

    def close(self) -> None:
        pass


def _read_sent(path: Path) -> tuple[int, int] | None:
    """The (round, seq) of the last update this node recorded before sending; None if none."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return int(doc["round"]), int(doc["seq"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("node.out", f"{path} is unreadable ({exc}); remove it to start over") from None


def _save_snapshot(folder: Path, round_: int, adapter: dict[str, Array]) -> None:
    make_private_dir(folder)
    write_private_file(folder / f"round_{round_:05d}.safetensors", safetensors.numpy.save(adapter))


def _write_file(path: Path, data: bytes) -> None:
    make_private_dir(path.parent)
    write_private_file(path, data)
