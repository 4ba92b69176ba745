"""Metrics as JSON lines: one object per event, appended and flushed.

Events a node writes (docs/node.md lists every field):
``start``, ``resume``, ``round`` (one per completed round, round 0 being the
evaluation before training), ``caught_up`` and ``done``. Readers (the
scenario report) must ignore unknown events and fields.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2pfm.core.errors import UnsafePathError
from p2pfm.core.private_files import PRIVATE_FILE_MODE, make_private_dir


class MetricsWriter:
    """Appends one JSON line per event to ``path``, flushed at once (a reader may tail the file).

    The folder (a node's out folder, which also holds its checkpoint) is made
    private (0700) and the file is 0600 from its creation. A symlink at ``path``
    is refused, never followed: a planted link must not make the node append to
    (and chmod) another file.
    """

    def __init__(self, path: Path, **common: Any) -> None:
        make_private_dir(path.parent)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, PRIVATE_FILE_MODE)
        except OSError:
            if os.path.islink(path):
                raise UnsafePathError(
                    path, "is a symbolic link; remove it (metrics are never written through one)"
                ) from None
            raise
        # A file from an older run may be world-readable; O_CREAT's mode only applies to a new one.
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, PRIVATE_FILE_MODE)
        self.path = path
        self._common = common
        self._handle = os.fdopen(fd, "a", encoding="utf-8")

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
