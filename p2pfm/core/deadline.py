"""Adaptive round deadlines: wait for neighbours as long as they actually take, not a fixed timeout.

For each neighbour the protocol keeps the delays of its last updates, each
measured from the moment this node entered the round to the moment the
neighbour's update of that round was accepted (0 when it was there first).
A round then waits until

    min(round_timeout_s, max(2 * slowest, slowest + margin_s))

after it starts, where ``slowest`` is the largest, over the neighbours the
round expects, of ``median + 4 * 1.4826 * MAD`` of that neighbour's delays
(1.4826 MAD estimates a standard deviation; median and MAD ignore the odd
outlier). So:

- a dead neighbour costs about twice what the slowest live one takes, not
  ``round_timeout_s`` (after that it is *absent* and not waited for);
- a neighbour that is merely slow is still heard: its own history sets the
  wait, however far it is from the others;
- a neighbour with fewer than ``MIN_SAMPLES`` delays on record (a newcomer, or one
  heard again after it missed a deadline: it may be out of phase) gets the full
  ``round_timeout_s``: nothing is assumed about it.

Delays are measured from this node's own round start, so while it is the
slowest of its neighbourhood they all read about 0; should it become the
fastest (a neighbour's machine got busier), a wait of ``margin_s`` would
then miss everyone, and a node that misses every neighbour runs ahead alone.
How far ahead it can get is as large as its own pace varies: so in an open
network (``ProtocolConfig.pace_floor``, set when membership keeps the views) a round
also waits at least 4 sigma (by MAD) of this node's own recent round
durations (:class:`RoundPace`). Steady rounds (a quiet machine) add
nothing; on a machine whose rounds swing by seconds (shared cores), the
wait grows with the swing.

Pure arithmetic on numbers the node measured itself (no peer-sent value
steers it); bounded: ``HISTORY`` delays per neighbour, ``HISTORY`` round
durations.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

HISTORY = 16  # delays kept per neighbour
MIN_SAMPLES = 3  # below this, a neighbour gets the full round_timeout_s
_SIGMAS = 4.0  # how many (MAD-estimated) standard deviations above the median a live neighbour may be
_MAD_TO_SIGMA = 1.4826

K = TypeVar("K")


class ArrivalTracker(Generic[K]):
    """Recent arrival delays per neighbour, and the wait they justify."""

    def __init__(self, *, margin_s: float) -> None:
        if not margin_s >= 0.0:
            raise ValueError(f"margin_s must be >= 0, got {margin_s}")
        self.margin_s = margin_s
        self._delays: dict[K, deque[float]] = {}

    def record(self, peer: K, delay_s: float) -> None:
        self._delays.setdefault(peer, deque(maxlen=HISTORY)).append(max(0.0, delay_s))

    def forget(self, peer: K) -> None:
        self._delays.pop(peer, None)

    def expected_s(self, peer: K) -> float | None:
        """``median + 4 sigma`` of the neighbour's delays; None with too few samples."""
        delays = self._delays.get(peer)
        if delays is None or len(delays) < MIN_SAMPLES:
            return None
        median = statistics.median(delays)
        mad = statistics.median(abs(d - median) for d in delays)
        return median + _SIGMAS * _MAD_TO_SIGMA * mad

    def wait_s(self, peers: Iterable[K], round_timeout_s: float) -> float:
        """How long a round expecting ``peers`` waits (module docstring); ``round_timeout_s`` at most."""
        slowest = 0.0
        for peer in peers:
            expected = self.expected_s(peer)
            if expected is None:
                return round_timeout_s
            slowest = max(slowest, expected)
        return min(round_timeout_s, max(2.0 * slowest, slowest + self.margin_s))


class RoundPace:
    """This node's own recent round durations (start to start of consecutive rounds)."""

    def __init__(self) -> None:
        self._durations: deque[float] = deque(maxlen=HISTORY)
        self._last: tuple[int, float] | None = None  # (round, start time) of the latest round

    def started(self, round_: int, now_s: float) -> None:
        if self._last is not None and round_ == self._last[0] + 1:
            self._durations.append(max(0.0, now_s - self._last[1]))
        self._last = (round_, now_s)

    def floor_s(self) -> float:
        """4 sigma (MAD-estimated) of the durations; 0 with fewer than ``MIN_SAMPLES`` rounds on record."""
        if len(self._durations) < MIN_SAMPLES:
            return 0.0
        median = statistics.median(self._durations)
        mad = statistics.median(abs(d - median) for d in self._durations)
        return _SIGMAS * _MAD_TO_SIGMA * mad
