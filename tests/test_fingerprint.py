"""Fingerprints: BLAKE3-256 of the canonical JSON that docs/protocol.md section 7 specifies."""

from __future__ import annotations

from typing import Any

import blake3
import pytest

from p2pfm.core.fingerprint import fingerprint, schema_document
from p2pfm.core.wire import TensorSpec


def _digest(canonical: str) -> bytes:
    return blake3.blake3(canonical.encode("utf-8")).digest()


@pytest.mark.parametrize(
    ("document", "canonical"),
    [
        ({"b": 1, "a": [1, 2]}, '{"a":[1,2],"b":1}'),  # keys sorted, no whitespace
        ({"outer": {"z": None, "y": True}}, '{"outer":{"y":true,"z":null}}'),  # nested keys too
        ({"alpha": 16.0, "dropout": 0.05, "lr": 1e-05}, '{"alpha":16.0,"dropout":0.05,"lr":1e-05}'),
        ({"name": "Zürich ✓"}, '{"name":"Zürich ✓"}'),  # UTF-8 as is, not \u-escaped
    ],
)
def test_the_canonical_form_is_the_documented_one(document: dict[str, Any], canonical: str) -> None:
    assert fingerprint(document) == _digest(canonical)
    assert len(fingerprint(document)) == 32


def test_key_order_does_not_matter_and_any_value_does() -> None:
    first = {"task": "classification", "lora": {"rank": 4, "alpha": 16.0}}
    second = {"lora": {"alpha": 16.0, "rank": 4}, "task": "classification"}
    assert fingerprint(first) == fingerprint(second)
    for changed in (
        {**first, "task": "causal-lm"},
        {**first, "lora": {"rank": 4, "alpha": 16}},  # the int 16 is not the float 16.0
        {**first, "lora": {"rank": 8, "alpha": 16.0}},
    ):
        assert fingerprint(changed) != fingerprint(first), changed


def test_the_schema_document_is_sorted_by_name_whatever_the_order_given() -> None:
    specs = [TensorSpec("b.weight", "float32", (4, 2)), TensorSpec("a.weight", "float16", (3,))]
    document = schema_document(specs)
    assert document == [["a.weight", "float16", [3]], ["b.weight", "float32", [4, 2]]]
    assert schema_document(reversed(specs)) == document
    reshaped = [TensorSpec("b.weight", "float32", (2, 4)), specs[1]]
    assert fingerprint({"schema": schema_document(reshaped)}) != fingerprint({"schema": document})
