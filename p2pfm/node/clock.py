"""Where a node's time comes from: the system clock on a network, a virtual one in the simulator.

The node never calls ``time`` itself. Its deadlines, timestamps and waits
(the slow fault, an equivocating attacker's pause) go through a ``Clock``,
so that the simulator can run the same node loop on virtual time.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now_s(self) -> float:
        """Monotonic seconds (deadlines, rates)."""
        ...

    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch (the timestamp an update carries)."""
        ...

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass; may return early when the node is asked to stop."""
        ...


class SystemClock:
    """Real time; ``sleep`` returns at once when ``stop`` is set."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def now_s(self) -> float:
        return time.monotonic()

    def wall_ms(self) -> int:
        return int(time.time() * 1000)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.stop.wait(seconds)


class VirtualClock:
    """Time that moves only when told: the simulator sets it to the node it is stepping.

    ``sleep`` advances it, so a slow node's extra training time and an
    attacker's pause cost virtual seconds, not real ones.
    """

    EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: wall time of virtual second 0

    def __init__(self, start_s: float = 0.0) -> None:
        self.t_s = start_s

    def now_s(self) -> float:
        return self.t_s

    def wall_ms(self) -> int:
        return self.EPOCH_MS + int(self.t_s * 1000)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.t_s += seconds
