"""Fingerprints: 32-byte digests that say "we are training the same thing".

Every update carries the sender's fingerprint; a receiver refuses updates
whose fingerprint differs from its own, so that tensors of a different base
model, LoRA setting or tensor layout are never averaged together (hivemind's
schema-hash gate). The fingerprint is BLAKE3-256 over canonical JSON
(sorted keys, no whitespace, UTF-8) of a document that describes the model;
the adapter layer builds that document from the base model and LoRA config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import blake3

from p2pfm.core.wire import TensorSpec


def fingerprint(document: Mapping[str, Any]) -> bytes:
    """BLAKE3-256 of the canonical JSON of ``document``."""
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return blake3.blake3(canonical.encode("utf-8")).digest()


def schema_document(specs: Iterable[TensorSpec]) -> list[list[Any]]:
    """The tensor layout as JSON-ready ``[name, dtype, shape]`` triples, sorted by name."""
    return [[s.name, s.dtype, list(s.shape)] for s in sorted(specs, key=lambda s: s.name)]
