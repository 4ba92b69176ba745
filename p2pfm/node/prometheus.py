"""Prometheus ``/metrics`` for one node, made from the records its metrics.jsonl gets.

``RecordMetrics`` is fed every record the node's store writes (``start``,
``round``, ``done``...; docs/node.md lists their fields) and turns the
newest ones into metric families when Prometheus scrapes: a counter is the
record's cumulative counter, a gauge the last round's value, so a scrape and
the file agree by construction (``p2pfm_last_record_time_seconds`` is the
``time_s`` of the record a scrape reflects). ``MetricsServer`` serves them
(``prometheus_client``'s HTTP server, on its own registry: many nodes may
live in one process) from ``node.metrics_address``; ``build_node`` starts it
and the node closes it when it ends. docs/operations.md lists every metric.

Label values never come from a peer: refusal, drop and I/O reasons are
checked against the sets the code defines, anything else is counted as
``other`` (a peer must not be able to create series).
"""

from __future__ import annotations

import bisect
import copy
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from p2pfm import __version__
from p2pfm.core.errors import ConfigError, RejectReason
from p2pfm.net.link import DROP_FAULT, DROP_QUEUE_FULL

PREFIX = "p2pfm_"
OTHER = "other"  # the label value of a reason the code does not define
REFUSAL_REASONS = frozenset(reason.value for reason in RejectReason)
DROP_REASONS = frozenset({DROP_QUEUE_FULL, DROP_FAULT})
IO_WRITES = frozenset({"checkpoint", "snapshot", "metrics", "sent_record", "evidence", "adapter", "peers"})
EVAL_METRICS = frozenset({"accuracy", "loss", "perplexity"})
#: Upper bounds (seconds) of the wait-per-round histogram's buckets.
WAIT_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Cumulative counters of round and done records (docs/node.md): record field -> (metric, help).
_COUNTERS = {
    "bytes_sent": ("sent_bytes_total", "Bytes of gossip messages sent (queued to neighbours)."),
    "bytes_received": ("received_bytes_total", "Bytes of gossip messages received."),
    "messages_sent": ("sent_messages_total", "Gossip messages sent (one per neighbour and update)."),
    "messages_received": ("received_messages_total", "Gossip messages received."),
    "refused_connections": (
        "refused_connections_total", "CurveZMQ handshakes refused: keys not admitted.",
    ),
    "internal_errors": ("internal_errors_total", "Messages whose handling raised (a bug; dropped)."),
}  # fmt: skip
# Counters by reason: record field -> (metric, help, label, the values it may take).
_BY_REASON = {
    "rejected": ("refused_total", "Messages refused, by reason (docs/protocol.md 6.2).", REFUSAL_REASONS),
    "dropped": ("dropped_total", "Messages dropped before sending, by reason.", DROP_REASONS),
    "control_rejected": (
        "control_refused_total", "Membership control messages refused, by reason.", REFUSAL_REASONS,
    ),
    "io_errors": ("io_errors_total", "The node's own failed writes, by what (each retried).", IO_WRITES),
}  # fmt: skip
# Gauges of the last round record: field -> (metric, help).
_ROUND_GAUGES = {
    "wait_s": ("last_round_wait_seconds", "Time the last round waited for its neighbours."),
    "train_s": ("last_round_train_seconds", "Time the last round's local steps took."),
    "round_s": ("last_round_seconds", "Duration of the last round (training and waiting)."),
    "members": ("membership_size", "The network's members as this node knows them (its roster)."),
    "aggregation_error": ("last_aggregation_error", "The LoRA aggregation error of the last mix."),
}


@dataclass
class _State:
    last_record_s: float | None = None
    round: int | None = None
    rounds_trained: int | None = None
    counters: dict[str, Any] = field(default_factory=dict)  # the newest record's that carries them
    gauges: dict[str, float] = field(default_factory=dict)
    active: int | None = None
    heard: int | None = None
    evaluation: dict[str, float] = field(default_factory=dict)
    eval_round: int | None = None
    timed_out_rounds: int = 0
    wait_counts: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS_S) + 1))
    wait_sum_s: float = 0.0
    done: bool = False


class RecordMetrics(Collector):
    """A collector fed the node's metrics records (``observe``); a scrape reads the newest state."""

    def __init__(self, *, node: str, peer: str, version: str = __version__) -> None:
        self.info = {"version": version, "node": node, "peer": peer}
        self._state = _State()
        self._lock = threading.Lock()

    def observe(self, record: Mapping[str, Any]) -> None:
        """Take one record (as written to metrics.jsonl); fields it lacks keep their last value."""
        with self._lock:
            self._observe(self._state, record)

    @staticmethod
    def _observe(state: _State, record: Mapping[str, Any]) -> None:
        event = record.get("event")
        time_s = _number(record.get("time_s"))
        if time_s is not None:
            state.last_record_s = time_s
        if "bytes_sent" in record:  # round and done records carry every counter
            state.counters = dict(record)
        trained = _number(record.get("rounds_trained"))
        if trained is not None:
            state.rounds_trained = int(trained)
        if event == "resume" and _number(record.get("round")) is not None:
            state.round = int(record["round"])
        if event == "done":
            state.done = True
        if event != "round":
            return
        round_ = _number(record.get("round"))
        if round_ is not None:
            state.round = int(round_)
        for name in _ROUND_GAUGES:
            value = _number(record.get(name))
            if value is not None:
                state.gauges[name] = value
            elif name in ("members", "aggregation_error"):  # null: nothing to report now
                state.gauges.pop(name, None)
        active = _number(record.get("neighbours_active"))
        if active is not None:
            state.active = int(active)
        if isinstance(record.get("heard"), list):
            state.heard = len(record["heard"])
        evaluation = record.get("eval")
        if isinstance(evaluation, Mapping) and evaluation:
            state.evaluation = {k: v for k, v in evaluation.items() if _number(v) is not None}
            state.eval_round = state.round
        if record.get("timed_out") is True:
            state.timed_out_rounds += 1
        wait_s = _number(record.get("wait_s"))
        if wait_s is not None:
            state.wait_counts[bisect.bisect_left(WAIT_BUCKETS_S, wait_s)] += 1
            state.wait_sum_s += wait_s

    def describe(self) -> Iterable[Metric]:
        return []  # no fixed families to announce: registering must not call collect

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # a consistent copy: the node may write its next record while we render this one
            state = copy.deepcopy(self._state)
        info = GaugeMetricFamily(
            PREFIX + "info",
            "This node: p2pfm version, node name, peer id (always 1).",
            labels=list(self.info),
        )
        info.add_metric(list(self.info.values()), 1)
        yield info
        yield from _maybe_gauge(
            "last_record_time_seconds", "Unix time of the node's newest metrics record.", state.last_record_s
        )
        yield from _maybe_gauge(
            "round", "The last round this node completed (0: before training).", state.round
        )
        if state.rounds_trained is not None:
            yield CounterMetricFamily(
                PREFIX + "rounds_trained_total", "Rounds this node really ran (skipped ones are not).",
                value=state.rounds_trained,
            )  # fmt: skip
        yield GaugeMetricFamily(PREFIX + "done", "1 once the node wrote its done record.", value=state.done)
        neighbours = GaugeMetricFamily(
            PREFIX + "neighbours",
            "Neighbours: active (this node's now) and heard (counted in the last round).",
            labels=["state"],
        )
        for label, count in (("active", state.active), ("heard", state.heard)):
            if count is not None:
                neighbours.add_metric([label], count)
        yield neighbours
        for name, (metric, about) in _ROUND_GAUGES.items():
            yield from _maybe_gauge(metric, about, state.gauges.get(name))
        evaluation = GaugeMetricFamily(
            PREFIX + "eval", "The last evaluation on the test split, by metric.", labels=["metric"]
        )
        for name, value in sorted(state.evaluation.items()):
            if name in EVAL_METRICS:
                evaluation.add_metric([name], value)
        yield evaluation
        yield from _maybe_gauge("eval_round", "The round of the last evaluation.", state.eval_round)
        yield CounterMetricFamily(
            PREFIX + "timed_out_rounds_total", "Rounds the deadline ended (a neighbour missing).",
            value=state.timed_out_rounds,
        )  # fmt: skip
        buckets = []
        total = 0
        for bound, count in zip((*WAIT_BUCKETS_S, float("inf")), state.wait_counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        yield HistogramMetricFamily(
            PREFIX + "round_wait_seconds", "Time each round waited for its neighbours.",
            buckets=buckets, sum_value=state.wait_sum_s,
        )  # fmt: skip
        for name, (metric, about) in _COUNTERS.items():
            counted = _number(state.counters.get(name))
            if counted is not None:
                yield CounterMetricFamily(PREFIX + metric, about, value=counted)
        for name, (metric, about, known) in _BY_REASON.items():
            family = CounterMetricFamily(PREFIX + metric, about, labels=["reason"])
            if name in state.counters:  # every known reason, at 0 until it happens (rate() needs a start)
                counts = {reason: 0.0 for reason in known} | by_reason(state.counters[name], known)
                for reason, times in sorted(counts.items()):
                    family.add_metric([reason], times)
            yield family


def by_reason(counts: object, known: frozenset[str]) -> dict[str, float]:
    """A record's counts by reason for the reasons in ``known``; any other key is summed as ``other``."""
    out: dict[str, float] = {}
    if not isinstance(counts, Mapping):
        return out
    for reason, count in counts.items():
        value = _number(count)
        if value is not None:
            key = reason if reason in known else OTHER
            out[key] = out.get(key, 0.0) + value
    return out


def _maybe_gauge(metric: str, about: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(PREFIX + metric, about, value=value)


def _number(value: object) -> float | None:
    """An int or float field's value (a bool or anything else: None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``) -> (host, port); the config checked the form."""
    host, _, port = address.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


class MetricsServer:
    """``collector``'s metrics (and the process's: CPU, memory, open files) over HTTP at ``address``."""

    def __init__(self, address: str, collector: Collector) -> None:
        host, port = split_address(address)
        registry = CollectorRegistry()
        registry.register(collector)
        ProcessCollector(registry=registry)
        try:
            self._server, self._thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                "node.metrics_address",
                f"cannot serve /metrics on {address} ({exc.strerror or exc}); choose a free port or turn it "
                'off ("")',
            ) from None
        self.address = f"{host}:{self._server.server_port}"

    def close(self) -> None:
        """Stop serving (idempotent); a scrape in progress finishes first."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5.0)
        self._server.server_close()
