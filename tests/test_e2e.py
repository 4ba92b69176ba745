"""End to end: real `p2pfm node` processes on loopback with a tiny model.

These start several Python processes (each imports torch), so they take tens
of seconds; every process is stopped by pid by the scenario runner.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import torch
import zmq
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
from zmq.utils import z85

from p2pfm.core.consensus import flatten
from p2pfm.core.identity import Identity, PeerId, curve_public_key, load_key_file
from p2pfm.lab.scenario import run_scenario
from p2pfm.lab.summary import Summary
from p2pfm.node.metrics import read_metrics
from tests.conftest import lm_examples, tiny_classifier_toml, topic_examples, write_jsonl

pytestmark = pytest.mark.slow  # starts node processes (each imports torch)

ROUNDS = 10
DIRICHLET = "dirichlet\nalpha = 0.5"


def _scenario(tmp_path: Path, model_dir: Path, extra: str, **gossip: Any) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(400, seed=3))
    gossip_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in gossip.items())
    path = tmp_path / "scenario.toml"
    path.write_text(
        f"""
name = "e2e"
topology = "ring:4"
{extra}

{tiny_classifier_toml(model_dir, data, DIRICHLET)}

[train]
batch_size = 8
max_length = 16
threads = 1

[gossip]
{gossip_lines}
"""
    )
    return path


def _rounds(folder: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(folder / "metrics.jsonl") if r.get("event") == "round"]


def _garbage_sender(
    address: str, start: threading.Event, stop: threading.Event, keys: tuple[Identity, PeerId] | None
) -> None:
    """Mallory: a ZeroMQ peer that sends junk frames to a node's listen address.

    With ``keys`` (a key of the network, the server's peer id) it is an insider
    that passes the CurveZMQ handshake; without, a plaintext outsider.
    """
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        public, secret = keys[0].curve_keypair()
        sock.curve_serverkey = z85.encode(curve_public_key(keys[1]))
        sock.curve_publickey, sock.curve_secretkey = z85.encode(public), z85.encode(secret)
    sock.connect(address)
    start.wait(60)
    for i in range(50):  # bounded
        if stop.is_set():
            break
        # An outsider never completes a handshake, so its PUSH socket has no peer to queue for.
        with contextlib.suppress(zmq.Again):
            sock.send_multipart([b"junk" * (i + 1), b"\x00" * 10], flags=zmq.NOBLOCK)
        time.sleep(0.05)
    context.destroy(linger=0)


def test_crash_resume_garbage_and_saved_adapter(tmp_path: Path, tiny_bert_dir: Path) -> None:
    timeout_s = 4.0
    scenario = _scenario(
        tmp_path,
        tiny_bert_dir,
        # Down for 5 s: long enough that the others are rounds ahead when it is back (a node that
        # restarts from the runner's prefork server is training again about 1 s later).
        "timeout_s = 300\n[[faults.crash]]\nnode = 1\nround = 2\nrestart_after_s = 5.0\n"
        "[[faults.drop]]\nprob = 0.3\nlink = [2, 3]\n[[faults.slow]]\nnode = 3\nfactor = 2.0",
        rounds=ROUNDS,
        round_timeout_s=timeout_s,
    )
    [train_line] = [line for line in scenario.read_text().splitlines() if line == "[train]"]
    scenario.write_text(scenario.read_text().replace(train_line, "[train]\nlocal_steps = 40"))
    out = tmp_path / "run"
    result: dict[str, Summary] = {}
    runner = threading.Thread(target=lambda: result.update(summary=run_scenario(scenario, out)))
    runner.start()
    # Find node0's address once its config exists, then send it garbage while it runs.
    start, stop = threading.Event(), threading.Event()
    config = out / "nodes" / "node0" / "node.toml"
    deadline = time.monotonic() + 60
    while not config.exists() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    listen = next(line.split('"')[1] for line in config.read_text().splitlines() if line.startswith("listen"))
    # An insider (node3's key: a neighbour of node0) sending junk, and a plaintext outsider.
    keys = out / "keys"
    insider = (load_key_file(keys / "node3.key"), load_key_file(keys / "node0.key").peer_id)
    mallory = threading.Thread(target=_garbage_sender, args=(listen, start, stop, insider))
    outsider = threading.Thread(target=_garbage_sender, args=(listen, start, stop, None))
    mallory.start()
    outsider.start()
    while not _rounds(out / "nodes" / "node0") and runner.is_alive() and time.monotonic() < deadline + 60:
        time.sleep(0.2)
    start.set()
    runner.join(timeout=300)
    stop.set()
    mallory.join(timeout=10)
    outsider.join(timeout=10)
    assert not runner.is_alive()

    summary = result["summary"]
    assert summary.ok, summary
    nodes = {n.name: n for n in summary.nodes}
    assert all(n.finished and n.rounds_completed == ROUNDS for n in nodes.values())
    assert nodes["node1"].restarts == 1
    # The others went on while node1 was down; it caught up to their round
    # instead of replaying the rounds it missed.
    node1 = list(read_metrics(out / "nodes" / "node1" / "metrics.jsonl"))
    [resume] = [r for r in node1 if r["event"] == "resume"]
    jumps = [r for r in node1 if r["event"] == "caught_up"]
    assert resume["round"] == 2 and jumps and jumps[0]["to_round"] > jumps[0]["from_round"] >= 3
    assert len([r for r in node1 if r["event"] == "round" and r["round"] >= 3]) < ROUNDS - 2
    # The insider's junk got through CurveZMQ and was refused and counted as
    # malformed (at most its 50 messages: none of the outsider's landed);
    # node0 carried on to the end.
    assert 1 <= nodes["node0"].rejected.get("malformed", 0) <= 50
    # node1's neighbours never waited longer than one deadline for it; node0
    # (whose other link is clean) paid that deadline at most twice (the crash
    # round, and a restart race).
    for name in ("node0", "node2"):
        rounds = _rounds(out / "nodes" / name)
        assert max(r.get("wait_s", 0.0) for r in rounds) <= timeout_s + 1.0
    assert sum(bool(r.get("timed_out")) for r in _rounds(out / "nodes" / "node0")) <= 2
    # The lossy 2-3 link lost messages (counted at the sender); node3 trained 2x slower.
    assert (
        nodes["node2"].dropped.get("fault_injected", 0) + nodes["node3"].dropped.get("fault_injected", 0) > 0
    )
    assert nodes["node0"].dropped.get("fault_injected", 0) == 0
    # The slow fault wraps the learner: node3's training takes factor (2) times
    # as long as the same training on node0 (same model, steps and batch).
    slow = [r["train_s"] for r in _rounds(out / "nodes" / "node3") if r["round"] >= 1]
    normal = [r["train_s"] for r in _rounds(out / "nodes" / "node0") if r["round"] >= 1]
    assert statistics.median(slow) >= 1.5 * statistics.median(normal)
    # Consensus: after the last mixing the adapters are close to each other.
    final = summary.consensus[-1]
    assert final.round == ROUNDS and final.consensus_distance < 0.05
    # The saved adapter loads unchanged with PEFT.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, out / "nodes" / "node0" / "adapter")
    snapshot = safetensors.numpy.load_file(
        str(out / "nodes" / "node0" / "snapshots" / f"round_{ROUNDS:05d}.safetensors")
    )
    params = dict(loaded.named_parameters())
    lora_a = next(k for k in snapshot if "lora_A" in k)
    match = [p for name, p in params.items() if name.startswith(lora_a.removesuffix(".weight"))]
    assert match and np.allclose(match[0].detach().numpy(), snapshot[lora_a])
    assert (out / "report.md").exists() and (out / "accuracy.png").stat().st_size > 0


def test_mixing_only_network_matches_lambda2(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """ring:4 has |lambda| = 1/3 for every non-trivial mode: distance shrinks 9x per round, exactly."""
    scenario = _scenario(tmp_path, tiny_bert_dir, "distinct_seeds = true\ntimeout_s = 300", rounds=5)
    scenario.write_text(scenario.read_text().replace("[train]", "[train]\nlocal_steps = 0"))
    summary = run_scenario(scenario, tmp_path / "run")
    assert summary.ok
    distances = [c.consensus_distance for c in summary.consensus]
    assert len(distances) == 5 and all(b < a for a, b in itertools.pairwise(distances))
    # The disagreement itself (the distance's numerator) shrinks by lambda2^2 = 1/9 per round.
    spreads = []
    for round_ in range(1, 6):
        states = [
            flatten(
                safetensors.numpy.load_file(str(folder / "snapshots" / f"round_{round_:05d}.safetensors"))
            )
            for folder in sorted((tmp_path / "run" / "nodes").iterdir())
        ]
        matrix = np.stack(states)
        spreads.append(float(np.mean(np.sum((matrix - matrix.mean(axis=0)) ** 2, axis=1))))
    ratios = [b / a for a, b in itertools.pairwise(spreads)]
    assert all(math.isclose(r, 1 / 9, rel_tol=0.01) for r in ratios), ratios


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nodes_train_on_cuda(tmp_path: Path, tiny_bert_dir: Path) -> None:
    scenario = _scenario(tmp_path, tiny_bert_dir, "timeout_s = 300", rounds=2)
    summary = run_scenario(scenario, tmp_path / "run")
    assert summary.ok
    starts = [
        r
        for r in read_metrics(tmp_path / "run" / "nodes" / "node0" / "metrics.jsonl")
        if r["event"] == "start"
    ]
    assert starts[0]["device"].startswith("cuda")


def test_causal_lm_network_reports_perplexity(tmp_path: Path, tiny_llama_dir: Path) -> None:
    data = write_jsonl(tmp_path / "lm.jsonl", lm_examples(300, seed=2))
    scenario = tmp_path / "lm.toml"
    scenario.write_text(
        f"""
name = "lm"
topology = "complete:3"
baselines = ["local"]
timeout_s = 300

[model]
path = "{tiny_llama_dir}"
task = "causal-lm"

[lora]
rank = 4
target_modules = ["q_proj", "v_proj"]

[data]
source = "{data}"
partition = "iid"

[train]
local_steps = 10
batch_size = 8
max_length = 16
threads = 1
lr = 5e-3

[gossip]
rounds = 4
round_timeout_s = 10.0
"""
    )
    summary = run_scenario(scenario, tmp_path / "run")
    assert summary.ok and summary.metric == "perplexity"
    first = next(r for r in _rounds(tmp_path / "run" / "nodes" / "node0") if r["round"] == 0)
    final = summary.mean_final
    assert final is not None and math.isfinite(final) and 1.0 < final < first["eval"]["perplexity"]
    assert summary.baselines is not None and summary.baselines.local is not None
    assert math.isfinite(summary.baselines.local)
    assert (tmp_path / "run" / "perplexity.png").exists()
    report = (tmp_path / "run" / "report.md").read_text()
    assert "perplexity" in report
    assert "lower (better)" in report or "higher (worse)" in report
