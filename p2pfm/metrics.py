"""Metrics as JSON lines: one object per event, appended and flushed.

Events a node writes (docs/node.md lists every field):
``start``, ``resume``, ``round`` (one per completed round, round 0 being the
evaluation before training), ``caught_up`` and ``done``. Readers (the
scenario report) must ignore unknown events and fields.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class MetricsWriter:
    def __init__(self, path: Path, **common: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._common = common
        self._handle = path.open("a", encoding="utf-8")

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time_s": time.time(), **self._common, **fields}
        self._handle.write(json.dumps(record, sort_keys=False) + "\n")
        self._handle.flush()
        return record

    def close(self) -> None:
        self._handle.close()


def read_metrics(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a metrics file; a torn last line (killed writer) is skipped."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record
