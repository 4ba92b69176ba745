"""Several hosts: one node per network namespace, joined by veth links through a bridge.

Needs root and iproute2 (`ip netns`); skips with the reason otherwise. The
addresses (198.18.0.0/24, the RFC 2544 benchmarking range) exist only inside
the namespaces this test creates and deletes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.numpy
import tomli_w

from p2pfm.config.roster import Member, Roster, save_roster
from p2pfm.core.consensus import consensus_distance
from p2pfm.core.identity import Identity, write_key_file
from p2pfm.lab import netns
from p2pfm.lab.netns import Host, NetnsUnavailable
from p2pfm.node.metrics import read_metrics
from tests.conftest import topic_examples, write_jsonl

pytestmark = pytest.mark.slow  # starts node processes (each imports torch)

HOSTS = 3
PORT = 5550
ROUNDS = 12


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    try:
        with netns.hosts(HOSTS) as made:
            yield made
    except NetnsUnavailable as exc:
        pytest.skip(f"cannot create network namespaces here: {exc}")


def _impair(host: Host) -> str:
    try:
        return netns.impair(host)
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))


def _run_network(tmp_path: Path, model_dir: Path, namespaces: list[Host], drop: float) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(300, seed=1))
    ids = [Identity.generate() for _ in namespaces]
    docs = []
    for i in range(len(namespaces)):
        folder = tmp_path / f"host{i}"
        folder.mkdir()
        write_key_file(ids[i], folder / "node.key")
        # A path 0 - 1 - 2: lambda2 = 2/3 with Metropolis weights, so mixing takes a few rounds.
        neighbours = [j for j in (i - 1, i + 1) if 0 <= j < len(namespaces)]
        listen = f"tcp://{namespaces[i].address}:{PORT}"
        peers = [
            {"id": ids[j].peer_id.hex, "address": f"tcp://{namespaces[j].address}:{PORT}", "name": f"host{j}"}
            for j in neighbours
        ]
        gossip = {"rounds": ROUNDS, "round_timeout_s": 4.0, "seed": i, "snapshot_every": 1}
        node = {"key": "node.key", "listen": listen, "network": "netns", "out": "out", "name": f"host{i}"}
        doc = {
            "node": node,
            "peers": peers,
            "model": {"path": str(model_dir), "task": "classification", "num_labels": 2},
            "lora": {"rank": 4, "target_modules": ["query", "value"]},
            "data": {"source": str(data), "partition": "iid", "shard": i, "shards": len(namespaces)},
            "train": {"local_steps": 0, "threads": 1, "max_length": 16},
            "gossip": {**gossip, "eval_every": ROUNDS},
            "faults": {"drop": {f"host{j}": drop for j in neighbours if {i, j} == {0, 1}}},
        }  # fmt: skip
        docs.append(doc)
    _run_hosts(tmp_path, namespaces, docs, [[] for _ in namespaces])
    return tmp_path


def _run_hosts(root: Path, namespaces: list[Host], docs: list[dict[str, Any]], args: list[list[str]]) -> None:
    """One `p2pfm node` per namespace (config ``docs[i]``, extra ``args[i]``), each stopped by pid."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, host in enumerate(namespaces):
            folder = root / f"host{i}"
            (folder / "node.toml").write_text(tomli_w.dumps(docs[i]))
            command = host.command(sys.executable, "-m", "p2pfm", "node", "--config", "node.toml")
            log = (folder / "log.txt").open("wb")
            procs.append(
                subprocess.Popen([*command, *args[i]], cwd=folder, stdout=log, stderr=subprocess.STDOUT)
            )
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert all(p.poll() == 0 for p in procs), [
            (root / f"host{i}" / "log.txt").read_text()[-2000:] for i in range(len(procs))
        ]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=20)


def _distances(root: Path, hosts: int, rounds: int) -> list[float]:
    def snapshot(host: int, round_: int) -> dict[str, Any]:
        path = root / f"host{host}" / "out" / "snapshots" / f"round_{round_:05d}.safetensors"
        return dict(safetensors.numpy.load_file(str(path)))

    return [consensus_distance([snapshot(i, r) for i in range(hosts)]) for r in range(1, rounds + 1)]


def test_nodes_on_separate_hosts_reach_consensus(
    tmp_path: Path, tiny_bert_dir: Path, hosts: list[Host]
) -> None:
    # Loss on the host0-host1 link from p2pfm's own fault injection (works on any kernel).
    root = _run_network(tmp_path, tiny_bert_dir, hosts, drop=0.2)
    distances = _distances(root, len(hosts), ROUNDS)
    # Without loss the disagreement would shrink by lambda2^2 = 4/9 per round (1e-4 over 11 rounds).
    assert distances[-1] < 1e-2 * distances[0], distances
    records = list(read_metrics(root / "host1" / "out" / "metrics.jsonl"))
    assert records[-1]["event"] == "done" and records[-1]["rounds_completed"] == ROUNDS
    assert records[-1]["bytes_received"] > 0


def test_consensus_over_an_impaired_link(tmp_path: Path, tiny_bert_dir: Path, hosts: list[Host]) -> None:
    applied = _impair(hosts[0])
    print(f"host0's link: {applied}")
    root = _run_network(tmp_path, tiny_bert_dir, hosts, drop=0.0)
    distances = _distances(root, len(hosts), ROUNDS)
    assert distances[-1] < 1e-2 * distances[0], distances
    # The impairment was real: host1 waited noticeably for host0's updates.
    waits = [r["wait_s"] for r in read_metrics(root / "host1" / "out" / "metrics.jsonl") if r.get("wait_s")]
    assert sum(waits) / len(waits) > 0.05, waits


def test_a_node_joins_across_hosts_with_only_a_bootstrap_address(
    tmp_path: Path, tiny_bert_dir: Path, hosts: list[Host]
) -> None:
    """host0 starts the network; host1 and host2 know nothing but host0's address (docs/membership.md)."""
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(300, seed=1))
    ids = [Identity.generate() for _ in hosts]
    roster = Roster("netns-open", tuple(Member(f"host{i}", ids[i].peer_id) for i in range(len(hosts))))
    save_roster(roster, tmp_path / "roster.toml")
    docs = []
    for i in range(len(hosts)):
        folder = tmp_path / f"host{i}"
        folder.mkdir()
        write_key_file(ids[i], folder / "node.key")
        node = {
            "key": "node.key", "listen": f"tcp://{hosts[i].address}:{PORT}", "network": "netns-open",
            "out": "out", "name": f"host{i}", "roster": str(tmp_path / "roster.toml"),
        }  # fmt: skip
        doc = {
            "node": node,
            "membership": {"degree": 2, "join_timeout_s": 60.0},
            "model": {"path": str(tiny_bert_dir), "task": "classification", "num_labels": 2},
            "lora": {"rank": 4, "target_modules": ["query", "value"]},
            "data": {"source": str(data), "partition": "iid", "shard": i, "shards": len(hosts)},
            "train": {"local_steps": 0, "threads": 1, "max_length": 16},
            "gossip": {"rounds": ROUNDS, "round_timeout_s": 4.0, "eval_every": ROUNDS},
        }  # fmt: skip
        docs.append(doc)
    bootstrap = ["--bootstrap", f"tcp://{hosts[0].address}:{PORT}"]
    _run_hosts(tmp_path, hosts, docs, [[] if i == 0 else bootstrap for i in range(len(hosts))])
    for i in range(1, len(hosts)):
        records = list(read_metrics(tmp_path / f"host{i}" / "out" / "metrics.jsonl"))
        assert any(r["event"] == "joined" for r in records)
        done = records[-1]
        assert done["event"] == "done" and done["rounds_completed"] == ROUNDS and done["bytes_received"] > 0
        rounds = [r for r in records if r["event"] == "round" and r["round"] > 0]
        assert any(r["active_view"] for r in rounds), f"host{i} never had a neighbour"
