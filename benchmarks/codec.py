"""Lossy wire encodings (p2pfm/core/codec.py): encode and decode times, and sizes.

Run::

    python benchmarks/codec.py [--mib 0.3 64] [--repeats 5] [--json]

For each size, one float32 tensor of that many MiB (standard normal
values, seed 0) is encoded and decoded in every encoding; the figures are
the medians of ``--repeats`` runs after one warm-up, with
``time.perf_counter``. Sizes are the payload bytes and the ratio to raw
float32. ``wire`` is the whole wire path of an update of that tensor
(encode_update + sign, then open_update) with float32 and with each
encoding, for comparison with benchmarks/wire.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from p2pfm.core import codec, wire
from p2pfm.core.identity import Identity

_IDENTITY = Identity(bytes(32))


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _wire_ms(x: np.ndarray[Any, Any], dtype: str, repeats: int) -> float:
    limits = wire.WireLimits(max_message_bytes=2**31, max_decoded_bytes=2**31)

    def once() -> None:
        body = wire.encode_update(
            network="bench", round=1, seq=1, ts_ms=0, fingerprint=bytes(32), degree=1, samples=1,
            tensors={"w": x}, wire_dtypes={"w": dtype},
        )  # fmt: skip
        wire.open_update(wire.sign(body, _IDENTITY), limits)

    return _median_ms(once, repeats)


def measure(mib: float, repeats: int) -> list[dict[str, Any]]:
    n = int(mib * 2**20) // 4
    x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    rows = [{"mib": mib, "elements": n, "encoding": "float32", "bytes": 4 * n, "ratio": 1.0,
             "wire_ms": round(_wire_ms(x, "float32", repeats), 2)}]  # fmt: skip
    for encoding in codec.ENCODINGS:
        payload = codec.encode(encoding, x)
        rows.append({
            "mib": mib, "elements": n, "encoding": encoding, "bytes": payload.nbytes,
            "ratio": round(4 * n / payload.nbytes, 2),
            "encode_ms": round(_median_ms(lambda e=encoding: codec.encode(e, x), repeats), 2),
            "decode_ms": round(_median_ms(lambda e=encoding, p=payload: codec.decode(e, (n,), p), repeats),
                               2),
            "wire_ms": round(_wire_ms(x, encoding, repeats), 2),
        })  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, nargs="+", default=[0.3, 64.0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = [row for mib in args.mib for row in measure(mib, args.repeats)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'MiB':>6} {'encoding':>10} {'bytes':>10} {'x smaller':>9} {'encode ms':>9} {'decode ms':>9} "
          f"{'wire ms':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['mib']:>6} {r['encoding']:>10} {r['bytes']:>10} {r['ratio']:>9} "
              f"{r.get('encode_ms', '-'):>9} {r.get('decode_ms', '-'):>9} {r['wire_ms']:>8}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
