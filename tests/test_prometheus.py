"""Prometheus /metrics (p2pfm/node/prometheus.py): the config field, the mapping from records, live nodes.

The slow tests run real ``p2pfm node`` processes (a 2-node scenario on the
tiny BERT): one scrapes a node while it trains and checks every value
against the metrics.jsonl records it reflects; one points a real Prometheus
server (/usr/bin/prometheus, Debian's package) at the scenario's
prometheus.yml and runs docs/operations.md's queries through its HTTP API.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import tomllib
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from p2pfm.config.schema import decode
from p2pfm.config.settings import NodeSection
from p2pfm.core.errors import ConfigError
from p2pfm.lab.scenario import (
    load_scenario,
    run_scenario,
    stop_processes,
    write_baseline_configs,
    write_node_configs,
)
from p2pfm.lab.summary import Summary
from p2pfm.node.metrics import read_metrics
from p2pfm.node.prometheus import MetricsServer, RecordMetrics
from p2pfm.node.store import DiskStore
from tests.conftest import tiny_classifier_toml, topic_examples, write_jsonl

PEER = "ab" * 32
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _scrape_collector(collector: RecordMetrics) -> Samples:
    registry = CollectorRegistry()
    registry.register(collector)
    return _samples(generate_latest(registry).decode())


def _get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# ------------------------------------------------------------------ config


def _node_section(address: object) -> NodeSection:
    table = {
        "key": "/k",
        "listen": "tcp://127.0.0.1:5550",
        "network": "n",
        "out": "/o",
        "metrics_address": address,
    }
    return decode(NodeSection, table, "node")


@pytest.mark.parametrize("address", ["", "127.0.0.1:9464", "0.0.0.0:1", "localhost:65535", "[::1]:9464"])
def test_metrics_address_accepts_host_port_or_empty(address: str) -> None:
    assert _node_section(address).metrics_address == address


def test_metrics_address_is_off_by_default() -> None:
    table = {"key": "/k", "listen": "tcp://127.0.0.1:5550", "network": "n", "out": "/o"}
    assert decode(NodeSection, table, "node").metrics_address == ""


@pytest.mark.parametrize(
    "address", ["9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "http://127.0.0.1:9464", "a b:1", 9464]
)
def test_metrics_address_refuses_anything_else_naming_the_field_and_the_fix(address: object) -> None:
    with pytest.raises(ConfigError) as caught:
        _node_section(address)
    message = str(caught.value)
    assert "node.metrics_address" in message and "HOST:PORT" in message and "1..65535" in message


# ----------------------------------------------------------- the mapping


def _round(round_: int, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event": "round", "time_s": 1000.0 + round_, "round": round_, "rounds_trained": round_,
        "train_loss": 0.5, "eval": {"accuracy": 0.75, "loss": 0.5}, "heard": ["node1"], "missing": ["node2"],
        "timed_out": True, "train_s": 1.5, "wait_s": 0.3, "round_s": 1.8, "neighbours_active": 2,
        "members": 3, "aggregation_error": 0.01, "bytes_sent": 1000 * round_, "bytes_received": 900 * round_,
        "messages_sent": 2 * round_, "messages_received": 2 * round_, "dropped": {"send_queue_full": 1},
        "refused_connections": 4, "rejected": {"stale_round": 2}, "internal_errors": 0, "io_errors": {},
    }  # fmt: skip
    return record | fields


def test_each_value_is_the_newest_records() -> None:
    metrics = RecordMetrics(node="node0", peer=PEER, version="9.9")
    metrics.observe({"event": "start", "time_s": 999.5, "neighbours": ["node1", "node2"]})
    metrics.observe(_round(1, wait_s=0.05))
    metrics.observe(_round(2, eval={}, timed_out=False, heard=[]))
    got = _scrape_collector(metrics)
    assert _get(got, "p2pfm_info", node="node0", peer=PEER, version="9.9") == 1
    assert _get(got, "p2pfm_last_record_time_seconds") == 1002.0
    assert _get(got, "p2pfm_round") == 2 and _get(got, "p2pfm_rounds_trained_total") == 2
    assert _get(got, "p2pfm_sent_bytes_total") == 2000 and _get(got, "p2pfm_received_bytes_total") == 1800
    assert _get(got, "p2pfm_sent_messages_total") == 4 and _get(got, "p2pfm_received_messages_total") == 4
    assert (
        _get(got, "p2pfm_neighbours", state="active") == 2
        and _get(got, "p2pfm_neighbours", state="heard") == 0
    )
    assert _get(got, "p2pfm_membership_size") == 3
    assert _get(got, "p2pfm_refused_total", reason="stale_round") == 2
    assert _get(got, "p2pfm_refused_total", reason="bad_signature") == 0  # known reasons start at 0
    assert _get(got, "p2pfm_dropped_total", reason="send_queue_full") == 1
    assert _get(got, "p2pfm_dropped_total", reason="fault_injected") == 0
    assert _get(got, "p2pfm_refused_connections_total") == 4
    # The last evaluation stays until the next one (round 2 did not evaluate).
    assert _get(got, "p2pfm_eval", metric="accuracy") == 0.75 and _get(got, "p2pfm_eval_round") == 1
    assert _get(got, "p2pfm_last_round_wait_seconds") == 0.3 and _get(got, "p2pfm_last_round_seconds") == 1.8
    assert _get(got, "p2pfm_timed_out_rounds_total") == 1
    # The wait histogram has both rounds: 0.05 s and 0.3 s.
    assert _get(got, "p2pfm_round_wait_seconds_bucket", le="0.1") == 1
    assert _get(got, "p2pfm_round_wait_seconds_bucket", le="0.5") == 2
    assert _get(got, "p2pfm_round_wait_seconds_count") == 2
    assert math.isclose(_get(got, "p2pfm_round_wait_seconds_sum") or 0, 0.35)
    assert _get(got, "p2pfm_done") == 0
    metrics.observe(
        {"event": "done", "time_s": 1003.0, **{k: v for k, v in _round(3).items() if k != "event"}}
    )
    assert _get(_scrape_collector(metrics), "p2pfm_done") == 1


def test_label_values_never_come_from_a_peer() -> None:
    """Reasons and metric names outside the code's own sets are summed as 'other' or left out."""
    metrics = RecordMetrics(node="node0", peer=PEER)
    metrics.observe(
        _round(
            1,
            rejected={"stale_round": 1, "made-up-by-a-peer": 5, "another": 2},
            dropped={"invented": 3},
            eval={"accuracy": 0.5, "attacker_label": 1.0},
        )
    )
    got = _scrape_collector(metrics)
    assert _get(got, "p2pfm_refused_total", reason="other") == 7
    assert _get(got, "p2pfm_dropped_total", reason="other") == 3
    labels = {dict(labels).get(key) for (_, labels) in got for key in ("reason", "metric")}
    assert not labels & {"made-up-by-a-peer", "another", "invented", "attacker_label"}
    assert _get(got, "p2pfm_eval", metric="accuracy") == 0.5


def test_a_resume_sets_the_round_until_the_next_round_record() -> None:
    metrics = RecordMetrics(node="node0", peer=PEER)
    metrics.observe({"event": "resume", "time_s": 5.0, "round": 7})
    assert _get(_scrape_collector(metrics), "p2pfm_round") == 7
    metrics.observe(_round(9))
    assert _get(_scrape_collector(metrics), "p2pfm_round") == 9


def test_the_store_feeds_observers_the_records_the_file_gets(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "out", name="node0", common={"node": "node0", "peer": PEER})
    seen: list[Mapping[str, Any]] = []
    store.observers.append(seen.append)
    store.observers.append(lambda record: 1 / 0)  # a broken observer costs nothing but a log line
    store.write("start", neighbours=["node1"])
    store.write("round", round=1, bytes_sent=10)
    store.close()
    written = list(read_metrics(tmp_path / "out" / "metrics.jsonl"))
    assert [dict(r) for r in seen] == [
        {k: v for k, v in r.items() if k not in ("node", "peer")} for r in written
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_server_serves_and_a_taken_port_is_a_config_error() -> None:
    metrics = RecordMetrics(node="node0", peer=PEER)
    metrics.observe(_round(3))
    server = MetricsServer(f"127.0.0.1:{_free_port()}", metrics)
    try:
        with urllib.request.urlopen(f"http://{server.address}/metrics", timeout=5) as response:
            got = _samples(response.read().decode())
        assert _get(got, "p2pfm_round") == 3
        assert any(name == "process_cpu_seconds_total" for name, _ in got)
        with pytest.raises(ConfigError, match=r"node\.metrics_address.*choose a free port"):
            MetricsServer(server.address, metrics)
    finally:
        server.close()
        server.close()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{server.address}/metrics", timeout=2)


# ------------------------------------------------------------- scenarios


def _scenario(
    tmp_path: Path, model_dir: Path, rounds: int, local_steps: int, slow_factor: float = 1.0
) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(200, seed=3))
    path = tmp_path / "scenario.toml"
    path.write_text(
        f"""
name = "prom"
topology = "complete:2"
timeout_s = 240

{tiny_classifier_toml(model_dir, data)}

[train]
batch_size = 8
max_length = 16
local_steps = {local_steps}
threads = 1

[gossip]
rounds = {rounds}
round_timeout_s = 10.0
snapshot_every = 0

[[faults.slow]]
node = 0
factor = {slow_factor}

[[faults.slow]]
node = 1
factor = {slow_factor}
"""
    )
    return path


def test_a_scenario_gives_each_node_a_metrics_port_and_writes_prometheus_yml(tmp_path: Path) -> None:
    path = _scenario(tmp_path, tmp_path / "model", rounds=2, local_steps=1)  # no model is loaded
    path.write_text(path.read_text().replace("timeout_s = 240", 'timeout_s = 240\nbaselines = ["local"]'))
    out = tmp_path / "run"
    procs = write_node_configs(load_scenario(path), out)
    configs = [tomllib.loads(p.config.read_text()) for p in procs]
    addresses = [c["node"]["metrics_address"] for c in configs]
    listens = {c["node"]["listen"].removeprefix("tcp://") for c in configs}
    assert len(set(addresses)) == 2 and not set(addresses) & listens
    text = (out / "prometheus.yml").read_text()
    for proc, address in zip(procs, addresses, strict=True):
        assert f'- targets: ["{address}"]' in text and f'node: "{proc.name}"' in text
    assert "scrape_interval: 1s" in text
    baselines = write_baseline_configs(load_scenario(path), out, procs)
    assert all("metrics_address" not in tomllib.loads(b.config.read_text())["node"] for b in baselines)


def _run_in_background(scenario: Path, out: Path) -> tuple[threading.Thread, dict[str, Summary]]:
    result: dict[str, Summary] = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_scenario(scenario, out)), daemon=True)
    runner.start()
    return runner, result


def _wait_for(path: Path, runner: threading.Thread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} never appeared"


def _expected(records: list[dict[str, Any]], upto: float) -> dict[str, float]:
    """What a scrape must show after the records written up to ``time_s == upto``, from the records alone."""
    shown = [r for r in records if r["time_s"] <= upto]
    rounds = [r for r in shown if r["event"] == "round"]
    counted = [r for r in shown if "bytes_sent" in r][-1]
    last = rounds[-1]
    expected = {
        "p2pfm_round": last["round"],
        "p2pfm_sent_bytes_total": counted["bytes_sent"],
        "p2pfm_received_bytes_total": counted["bytes_received"],
        "p2pfm_sent_messages_total": counted["messages_sent"],
        "p2pfm_received_messages_total": counted["messages_received"],
        "p2pfm_neighbours/active": last["neighbours_active"],
        "p2pfm_timed_out_rounds_total": sum(1 for r in rounds if r.get("timed_out")),
        "p2pfm_round_wait_seconds_count": sum(1 for r in rounds if "wait_s" in r),
    }
    # Fields a record lacks keep the value of the last record that had them.
    for field, key in (
        ("rounds_trained", "p2pfm_rounds_trained_total"),
        ("wait_s", "p2pfm_last_round_wait_seconds"),
    ):
        having = [r for r in shown if field in r]
        if having:
            expected[key] = having[-1][field]
    heard = [r for r in rounds if "heard" in r]
    if heard:
        expected["p2pfm_neighbours/heard"] = len(heard[-1]["heard"])
    evaluated = [r for r in rounds if r["eval"]]
    if evaluated:
        expected["p2pfm_eval/accuracy"] = evaluated[-1]["eval"]["accuracy"]
        expected["p2pfm_eval/loss"] = evaluated[-1]["eval"]["loss"]
    for reason, count in counted["rejected"].items():
        expected[f"p2pfm_refused_total/{reason}"] = count
    for reason, count in counted["dropped"].items():
        expected[f"p2pfm_dropped_total/{reason}"] = count
    return expected


def _value(samples: Samples, key: str) -> float | None:
    name, _, label = key.partition("/")
    label_name = {"p2pfm_neighbours": "state", "p2pfm_eval": "metric"}.get(name, "reason")
    return _get(samples, name, **({label_name: label} if label else {}))


@pytest.mark.slow  # starts node processes (each imports torch)
def test_a_live_nodes_metrics_equal_its_metrics_jsonl(tmp_path: Path, tiny_bert_dir: Path) -> None:
    out = tmp_path / "run"
    runner, result = _run_in_background(_scenario(tmp_path, tiny_bert_dir, rounds=6, local_steps=10), out)
    config = out / "nodes" / "node0" / "node.toml"
    _wait_for(config, runner, 60)
    address = tomllib.loads(config.read_text())["node"]["metrics_address"]
    scrapes: list[Samples] = []
    deadline = time.monotonic() + 180
    for _ in range(5000):  # bounded: every 50 ms while the node runs
        if not runner.is_alive() or time.monotonic() > deadline:
            break
        try:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=2) as response:
                scrapes.append(_samples(response.read().decode()))
        except OSError:
            pass  # not up yet, or gone
        time.sleep(0.05)
    runner.join(timeout=60)
    assert not runner.is_alive() and result["summary"].ok
    records = list(read_metrics(out / "nodes" / "node0" / "metrics.jsonl"))
    by_time = {r["time_s"]: r for r in records}
    compared = set()
    for scrape in scrapes:
        info = [labels for name, labels in scrape if name == "p2pfm_info"]
        assert info and dict(info[0])["node"] == "node0" and dict(info[0])["peer"] == records[0]["peer"]
        when = _get(scrape, "p2pfm_last_record_time_seconds")
        if when is None or not any(r["event"] == "round" and r["time_s"] <= when for r in records):
            continue
        assert when in by_time, f"a scrape reflects a record metrics.jsonl does not have ({when})"
        for key, value in _expected(records, when).items():
            assert _value(scrape, key) == value, (key, by_time[when]["event"], by_time[when].get("round"))
        compared.add(_get(scrape, "p2pfm_round"))
    # Scrapes during training, of several rounds with bytes on the wire, were compared value by value.
    assert len(compared - {0.0}) >= 2, compared
    assert max(compared) >= 3


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        pytest.skip("no prometheus binary (Debian's prometheus package; .ci/run installs it)")
    return found


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts; each is stopped by its pid at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    stop_processes(procs)


# docs/operations.md's queries, each run against the live scenario below.
LAG = "scalar(max(p2pfm_round)) - p2pfm_round"
LAG_PER_NETWORK = "max by (scenario) (p2pfm_round) - on (scenario) group_right p2pfm_round"
BYTES_PER_ROUND = "increase(p2pfm_sent_bytes_total[5m]) / increase(p2pfm_rounds_trained_total[5m])"
REFUSALS = "sum by (node, reason) (increase(p2pfm_refused_total[1h]))"
OPERATOR_QUERIES = (
    "p2pfm_round",
    LAG,
    LAG_PER_NETWORK,
    "changes(p2pfm_round[2m]) == 0 and p2pfm_done == 0",
    "time() - p2pfm_last_record_time_seconds > 120",
    'up{job="p2pfm"} == 0',
    "sum by (node, reason) (rate(p2pfm_refused_total[5m])) > 0",
    REFUSALS,
    "sum by (node, reason) (increase(p2pfm_dropped_total[1h])) > 0",
    BYTES_PER_ROUND,
    "rate(p2pfm_received_bytes_total[5m])",
    "p2pfm_last_round_wait_seconds",
    "histogram_quantile(0.9, sum by (node, le) (rate(p2pfm_round_wait_seconds_bucket[5m])))",
    "increase(p2pfm_timed_out_rounds_total[15m]) > 0",
    'p2pfm_neighbours{state="heard"} < p2pfm_neighbours{state="active"}',
    'p2pfm_eval{metric="accuracy"}',
)


@pytest.mark.slow  # starts node processes and a Prometheus server
def test_a_real_prometheus_scrapes_a_running_scenario(
    tmp_path: Path, tiny_bert_dir: Path, prometheus_binary: str, started: list[subprocess.Popen[bytes]]
) -> None:
    out = tmp_path / "run"
    runner, result = _run_in_background(
        # Rounds of the tiny model take ~0.05 s: slowed 30x, the run outlasts Prometheus's start-up
        # (seconds on a loaded machine), so its scrapes see the nodes while they train.
        _scenario(tmp_path, tiny_bert_dir, rounds=12, local_steps=10, slow_factor=30.0),
        out,
    )
    _wait_for(out / "prometheus.yml", runner, 60)
    port = _free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        started.append(
            subprocess.Popen(
                [
                    prometheus_binary, f"--config.file={out / 'prometheus.yml'}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    rounds: dict[str, float] = {}
    deadline = time.monotonic() + 120
    for _ in range(600):  # bounded: every 0.2 s until both nodes are past round 2 and scraped in 2 rounds
        if time.monotonic() > deadline or started[0].poll() is not None:
            break
        try:
            found = _query(base, "p2pfm_round")
            per_round = _query(base, BYTES_PER_ROUND)
        except OSError:
            found = per_round = []  # Prometheus still starting
        rounds = {r["metric"]["node"]: float(r["value"][1]) for r in found}
        if len(rounds) == 2 and min(rounds.values()) >= 2 and len(per_round) == 2:
            break
        time.sleep(0.2)
    assert set(rounds) == {"node0", "node1"} and min(rounds.values()) >= 2, (
        rounds, (tmp_path / "prometheus.log").read_text()[-2000:],
    )  # fmt: skip
    for promql in OPERATOR_QUERIES:
        _query(base, promql)  # each is valid PromQL over these series
    info = _query(base, "p2pfm_info")
    assert {r["metric"]["node"] for r in info} == {"node0", "node1"}
    assert all(r["metric"]["job"] == "p2pfm" and r["metric"]["scenario"] == "prom" for r in info)
    per_round = _query(base, BYTES_PER_ROUND)
    assert {r["metric"]["node"] for r in per_round} == {"node0", "node1"}
    assert all(float(r["value"][1]) > 0 for r in per_round)
    assert {r["metric"]["node"] for r in _query(base, LAG)} == {"node0", "node1"}
    assert {r["metric"]["node"] for r in _query(base, LAG_PER_NETWORK)} == {"node0", "node1"}
    assert {(r["metric"]["node"], r["metric"]["reason"]) for r in _query(base, REFUSALS)} >= {
        ("node0", "stale_round"), ("node1", "bad_signature"),
    }  # fmt: skip
    runner.join(timeout=180)
    assert not runner.is_alive() and result["summary"].ok
