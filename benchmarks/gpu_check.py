"""The steps of the GPU check (``bash scripts/gpu_check.sh``; docs/benchmarks.md, "GPU check").

    python benchmarks/gpu_check.py env
    python benchmarks/gpu_check.py demo --work DIR [--smoke]
    python benchmarks/gpu_check.py overlap --work DIR --budget-s S [--smoke] [--layers N] [--no-netns]
    python benchmarks/gpu_check.py make-model --out DIR --layers N [--smoke]     (overlap runs it)

``env`` prints the machine, torch and CUDA, and every package p2pfm needs
against pyproject.toml. ``demo`` runs ``p2pfm demo`` (``--smoke``: the same
scenario at toy size on the CPU), checks from each node's start record that
it trained on the GPU, and reports wall time, per-node accuracy and the
peak GPU memory (nvidia-smi, sampled every 0.5 s). ``overlap`` is issue 13's
GPU item as far as one GPU allows: four node processes share the GPU, each
fine-tuning LoRA r=16 on every linear layer of a random-weight causal LM
with Llama-7B's layer shapes and as many layers as four processes fit, on a
ring whose links are limited to 1 Gb/s (a network namespace per node and tc,
as benchmarks/overlap.py does; loopback without limits where those are
refused, said so), with ``gossip.overlap`` and ``sign1`` compression, then
synchronous and uncompressed if the time budget allows; it prints the
training-time fraction of each (benchmarks/overlap.py's: local-step time
over wall time across the steady rounds).

Every step prints its log to stdout, appends its key lines to ``--summary``
and its figures to ``--results`` (JSON, one key per step). Every process a
step starts is stopped by pid; SIGTERM (the script's ``timeout``) stops them too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tomli_w
from overlap import Run, place_on_hosts  # benchmarks/overlap.py: fractions, node placement

from p2pfm.config.toml import read_toml
from p2pfm.lab import netns
from p2pfm.lab.scenario import QUICKSTART, load_scenario, stop_processes, write_node_configs
from p2pfm.node.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
LINK_BYTES_PER_S = 125e6  # 1 Gb/s per link
# Llama-7B's layer shapes (DESIGN.md: LoRA r=16 on all linear layers = 160 MB fp32 over 32 layers,
# 358 ms/step at 4 x 1024 tokens, 39 GiB peak for one process on an H200).
LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
}
LLAMA_7B_LAYERS = 32
TINY = {"hidden_size": 64, "intermediate_size": 172, "num_attention_heads": 4, "num_key_value_heads": 4}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# GPU memory of one node process, GiB, estimated: a fixed part (CUDA context, fp32 embeddings and
# head, logits and their gradient) plus, per layer of Llama-7B shape, the fp32 frozen weights
# (0.75), the bf16 copies autocast makes and autograd keeps for the backward pass (0.38) and the
# activations kept for it (0.20 per 1024 tokens of the batch). p2pfm loads the base in fp32; the
# last two were counted here with saved-tensor hooks on one such layer (CPU autocast, torch 2.13):
# about 1.9 GiB a layer at 4 x 1024 tokens, so a 32-layer 7B in p2pfm would take about 65 GiB.
FIXED_GIB, LAYER_WEIGHTS_GIB, LAYER_GIB_PER_1K_TOKENS = 3.5, 1.13, 0.20
NODES = 4


# ----------------------------------------------------------------------------- output


class Report:
    """Key lines for summary.txt and figures for results.json (both in $OUT)."""

    def __init__(self, step: str, summary: Path | None, results: Path | None) -> None:
        self.step, self.summary, self.results = step, summary, results
        self.figures: dict[str, Any] = {}

    def line(self, text: str) -> None:
        print(text, flush=True)
        if self.summary is not None:
            with self.summary.open("a", encoding="utf-8") as handle:
                handle.write(f"  {self.step}: {text}\n")

    def save(self) -> None:
        if self.results is None:
            return
        doc: dict[str, Any] = {}
        if self.results.exists():
            with contextlib.suppress(ValueError):
                doc = json.loads(self.results.read_text())
        doc[self.step] = self.figures
        self.results.write_text(json.dumps(doc, indent=1, default=str))


def _stop_on_sigterm() -> None:
    """SIGTERM (timeout) raises SystemExit, so that finally blocks stop processes and namespaces."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------- GPU memory


def _smi(*query: str) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-...`` (csv, no header, no units); [] without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(
            ["nvidia-smi", *query, "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return []
    if done.returncode != 0:
        return []
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def _smi_int(cell: str) -> int | None:
    try:
        return int(float(cell))
    except ValueError:
        return None


class GpuMemory:
    """nvidia-smi's memory.used of GPU 0 (MiB), sampled every ``interval_s`` in a thread: the peak."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.before_mib: int | None = None
        self.total_mib: int | None = None
        self.peak_mib: int | None = None
        self.peak_process_mib: int | None = None  # largest one process held (where nvidia-smi lists them)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rows = _smi("--query-gpu=memory.used,memory.total")
        if rows:
            used = _smi_int(rows[0][0])
            if used is not None:
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
        apps = [_smi_int(r[1]) for r in _smi("--query-compute-apps=pid,used_memory") if len(r) > 1]
        largest = max((a for a in apps if a is not None), default=None)
        if largest is not None:
            self.peak_process_mib = max(self.peak_process_mib or 0, largest)

    def __enter__(self) -> GpuMemory:
        rows = _smi("--query-gpu=memory.used,memory.total")
        if rows:
            self.before_mib, self.total_mib = _smi_int(rows[0][0]), _smi_int(rows[0][1])

            def loop() -> None:
                while not self._stop.wait(self.interval_s):
                    self._sample()

            self._thread = threading.Thread(target=loop, name="gpu-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def figures(self) -> dict[str, Any]:
        return {
            "gpu_mem_before_mib": self.before_mib,
            "gpu_mem_peak_mib": self.peak_mib,
            "gpu_mem_peak_process_mib": self.peak_process_mib,
            "gpu_mem_total_mib": self.total_mib,
        }

    def describe(self) -> str:
        if self.peak_mib is None:
            return "peak GPU memory: n/a (no nvidia-smi)"
        text = f"peak GPU memory {self.peak_mib} MiB of {self.total_mib} (before: {self.before_mib})"
        if self.peak_process_mib is not None:
            text += f", largest process {self.peak_process_mib} MiB"
        return text


# ----------------------------------------------------------------------------- env


def _requirements() -> list[str]:
    project = read_toml(ROOT / "pyproject.toml", "pyproject")["project"]
    return [*project["dependencies"], "pytest>=8", "hypothesis>=6.100"]


def cmd_env(args: argparse.Namespace, report: Report) -> int:
    from packaging.requirements import Requirement  # noqa: PLC0415  (pip's; in the image and the venv)

    print(
        f"python {sys.version.split()[0]} at {sys.executable}; {platform.platform()}; {os.cpu_count()} CPUs"
    )
    with contextlib.suppress(OSError, StopIteration, ValueError):
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        print(f"{kib / 2**20:.0f} GiB memory; /tmp free {shutil.disk_usage('/tmp').free / 2**30:.0f} GiB")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False)
        print(smi.stdout or smi.stderr)
        # compute mode: "Default" lets the node processes share the GPU, "Exclusive_Process" would not
        for row in _smi("--query-gpu=name,driver_version,compute_mode,memory.total,memory.used"):
            report.line(f"nvidia-smi: {', '.join(row)} (name, driver, compute mode, MiB total, MiB used)")
    else:
        print("nvidia-smi: not found")
    figures: dict[str, Any] = {"python": sys.version.split()[0]}
    import torch  # noqa: PLC0415

    figures |= {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        figures |= {
            "gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "sms": props.multi_processor_count,
            "gpu_mem_free_gib": round(free / 2**30, 1), "gpu_mem_total_gib": round(total / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
        }  # fmt: skip
    report.line(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuda available: {torch.cuda.is_available()}"
        + (f", {figures['gpu']} {figures['gpu_mem_total_gib']} GiB" if "gpu" in figures else "")
    )
    unmet = []
    versions = {}
    for text in _requirements():
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        versions[req.name] = version
        ok = version is not None and req.specifier.contains(version, prereleases=True)
        where = ""
        if version is not None:
            dist = importlib.metadata.distribution(req.name)
            where = str(dist.locate_file(""))
        verdict = "ok" if ok else f"UNMET {req.specifier}"
        print(f"  {req.name:20} {version or 'MISSING':14} {verdict:18} {where}")
        if not ok:
            unmet.append(f"{req.name} {version or 'missing'} (needs {req.specifier})")
    figures["packages"] = versions
    figures["unmet"] = unmet
    report.line(
        "versions: "
        + ", ".join(f"{n} {versions.get(n)}" for n in ("transformers", "peft", "pyzmq", "pynacl", "msgspec"))
    )
    report.line("requirements: all met" if not unmet else f"requirements UNMET: {'; '.join(unmet)}")
    import zmq  # noqa: PLC0415

    report.line(f"libzmq {zmq.zmq_version()}, CURVE: {zmq.has('curve')}")
    figures["curve"] = zmq.has("curve")
    import p2pfm  # noqa: PLC0415
    from p2pfm.config.settings import ModelSettings  # noqa: PLC0415
    from p2pfm.learn.adapter import resolve_model_dir  # noqa: PLC0415
    from p2pfm.learn.data import bbc_news_dir  # noqa: PLC0415

    version = subprocess.run(
        [sys.executable, "-m", "p2pfm", "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    report.line(
        f"p2pfm from {Path(p2pfm.__file__).parent}; `python -m p2pfm --version`: {version.stdout.strip()}"
    )
    model = resolve_model_dir(ModelSettings(path="minilm", num_labels=5))
    report.line(f"MiniLM at {model}; BBC News at {bbc_news_dir()}")
    for tool in ("ip", "tc"):
        print(f"{tool}: {shutil.which(tool) or 'not found'}")
    report.figures = figures
    return 1 if unmet or not figures["curve"] else 0


# ----------------------------------------------------------------------------- demo


def _starts(folder: Path) -> dict[str, dict[str, Any]]:
    """Each node's start record under ``folder`` (nodes/*, baselines/*/*)."""
    starts = {}
    for metrics in sorted(folder.glob("**/metrics.jsonl")):
        start = next((r for r in read_metrics(metrics) if r.get("event") == "start"), None)
        if start is not None:
            starts[str(metrics.parent.relative_to(folder))] = start
    return starts


def cmd_demo(args: argparse.Namespace, report: Report) -> int:
    out = args.work / "demo"
    if args.smoke:  # the demo's scenario at toy size, on the CPU
        doc = dict(read_toml(QUICKSTART, "scenario"))
        doc["timeout_s"] = 600
        doc["data"] = {**doc["data"], "max_train_examples": 160, "max_test_examples": 40}
        doc["train"] = {**doc["train"], "local_steps": 2, "batch_size": 8, "threads": 1, "device": "cpu"}
        doc["gossip"] = {**doc["gossip"], "rounds": 2, "consensus_rounds": 1}
        scenario = args.work / "demo-smoke.toml"
        scenario.write_text(tomli_w.dumps(doc))
        argv = [sys.executable, "-m", "p2pfm", "run", str(scenario), "--out", str(out)]
    else:
        argv = [sys.executable, "-m", "p2pfm", "demo", "--out", str(out)]
    print("$ " + " ".join(argv), flush=True)
    started = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with GpuMemory() as memory:
        popen = subprocess.Popen(argv, env=env, cwd=ROOT)
        try:
            code = popen.wait()
        finally:
            stop_processes([popen])
    wall_s = time.monotonic() - started
    figures: dict[str, Any] = {"exit": code, "wall_s": round(wall_s, 1), **memory.figures()}
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    metric = summary.get("metric", "accuracy")
    nodes = {n["name"]: n.get(f"final_{metric}") for n in summary.get("nodes", [])}
    figures |= {"metric": metric, "nodes": nodes, "baselines": summary.get("baselines")}
    starts = _starts(out)
    devices = {name: f"{s.get('device')}/{s.get('autocast')}" for name, s in starts.items()}
    figures["devices"] = devices
    gossip_s = summary.get("wall_s")
    gossip = f"{gossip_s:.0f} s" if isinstance(gossip_s, (int, float)) else "n/a"
    report.line(f"`python {' '.join(argv[1:])}` exit {code}, wall {wall_s:.0f} s (the gossip run: {gossip})")
    report.line(f"{metric} per node: " + ", ".join(f"{k} {v:.3f}" for k, v in nodes.items() if v is not None))
    if summary.get("baselines"):
        report.line(f"baselines: {json.dumps(summary['baselines'])[:300]}")
    report.line(f"devices (device/autocast): {json.dumps(devices)}")
    report.line(memory.describe())
    if args.report_copy is not None and (out / "report.md").exists():
        shutil.copy(out / "report.md", args.report_copy)
    expected = "cpu" if args.smoke else "cuda"
    wrong = {k: v for k, v in devices.items() if not v.startswith(expected)}
    if wrong or not devices:
        report.line(f"FAIL: nodes not on {expected}: {wrong or 'no start records'}")
        figures["ok"] = False
    else:
        figures["ok"] = code == 0
    report.figures = figures
    return 0 if figures["ok"] else 1


# ----------------------------------------------------------------------------- overlap: the model


def cmd_make_model(args: argparse.Namespace, report: Report) -> int:
    """A random-weight Llama of Llama-7B's layer shapes (``--smoke``: tiny), with the MiniLM tokenizer."""
    import torch  # noqa: PLC0415
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    from p2pfm.config.settings import ModelSettings  # noqa: PLC0415
    from p2pfm.learn.adapter import resolve_model_dir  # noqa: PLC0415

    started = time.monotonic()
    # No Llama tokenizer travels: the packaged MiniLM's word pieces (30522) stand in for Llama's 32000.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(ModelSettings(path="minilm", num_labels=5)))
    tokenizer.model_max_length = 2048  # MiniLM's says 512; the batches here are up to --max-length
    shape = TINY if args.smoke else LLAMA_7B
    config = LlamaConfig(
        vocab_size=len(tokenizer), num_hidden_layers=args.layers, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, tie_word_embeddings=False, **shape,
    )  # fmt: skip
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    torch.manual_seed(0)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    except RuntimeError as exc:  # out of memory, or a CUDA error: build it on the CPU (slower)
        print(f"make-model: building on {device} failed ({exc}); on the CPU")
        device = "cpu"
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)  # half the file; p2pfm loads every model as float32
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"make-model: {params / 1e9:.2f} B parameters on {device}, {size / 2**30:.2f} GiB bf16 in "
          f"{args.out}, {time.monotonic() - started:.1f} s")  # fmt: skip
    return 0


def _layers_that_fit(nodes: int, most: int, tokens: int) -> tuple[int, str]:
    """Layers of Llama-7B shape whose ``nodes`` processes fit the free GPU memory (nvidia-smi)."""
    rows = _smi("--query-gpu=memory.free")
    free_mib = _smi_int(rows[0][0]) if rows else None
    if free_mib is None:
        return 2, "no nvidia-smi: 2 layers"
    per_node_gib = 0.85 * free_mib / 1024 / nodes
    per_layer_gib = LAYER_WEIGHTS_GIB + LAYER_GIB_PER_1K_TOKENS * tokens / 1024
    fit = int((per_node_gib - FIXED_GIB) / per_layer_gib)
    layers = max(1, min(most, fit))
    why = (
        f"{free_mib} MiB free; 85% / {nodes} processes = {per_node_gib:.1f} GiB each; estimated "
        f"{FIXED_GIB} GiB + {per_layer_gib:.2f} GiB per layer at {tokens} tokens -> {fit} fit; "
        f"at most {most} (time) -> {layers}"
    )
    return layers, why


def _adapter_mb(layers: int, shape: dict[str, int], rank: int) -> float:
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = rank * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # q, o; k, v; gate, up, down
    return 4 * layers * per_layer / 1e6


# ----------------------------------------------------------------------------- overlap: the runs


def _scenario(
    folder: Path, model_dir: Path, args: argparse.Namespace, overlap: bool, compression: str
) -> Any:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scenario.toml"
    doc = {
        "name": "gpu-overlap",
        "topology": f"ring:{NODES}",
        "model": {"path": str(model_dir), "task": "causal-lm"},
        "lora": {"rank": args.rank, "alpha": 2.0 * args.rank, "target_modules": LORA_TARGETS},
        "data": {"source": "bbc-news", "partition": "iid", "max_test_examples": args.test_examples},
        "train": {
            "local_steps": args.local_steps, "batch_size": args.batch_size, "max_length": args.max_length,
            "lr": 2e-4, "eval_batch_size": args.batch_size, "device": "cpu" if args.smoke else "cuda",
            "threads": 1 if args.smoke else max(1, (os.cpu_count() or 4) // NODES),
        },
        "gossip": {
            "rounds": args.rounds, "round_timeout_s": 120.0, "eval_every": args.rounds + 100,
            "overlap": overlap, "compression": compression, "snapshot_every": 0,
        },
    }  # fmt: skip
    path.write_text(tomli_w.dumps(doc))
    return load_scenario(path)


class NodesFailed(RuntimeError):
    """A run's node failed or the run timed out; ``logs`` holds the tails of the nodes' logs."""

    def __init__(self, message: str, logs: str) -> None:
        super().__init__(message)
        self.logs = logs

    @property
    def out_of_memory(self) -> bool:
        return "out of memory" in self.logs.lower()


def _run_nodes(
    scenario: Any, hosts: list[netns.Host] | None, folder: Path, mode: str, timeout_s: float
) -> Run:
    """benchmarks/overlap.py's _run, also on loopback (hosts None: the configs' own 127.0.0.1 ports)."""
    procs = write_node_configs(scenario, folder)
    if hosts is not None:
        place_on_hosts(folder, [proc.config for proc in procs], hosts)
    popens: list[subprocess.Popen[bytes]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    started_s = time.monotonic()
    try:
        for i, proc in enumerate(procs):
            argv = [sys.executable, "-m", "p2pfm", "node", "--config", str(proc.config)]
            if hosts is not None:
                argv = hosts[i].command(*argv)
            with proc.log.open("ab") as log:
                popens.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env))
        while any(p.poll() is None for p in popens) and time.monotonic() - started_s < timeout_s:
            time.sleep(0.5)
        if any(p.poll() != 0 for p in popens):
            codes = {proc.name: p.poll() for proc, p in zip(procs, popens, strict=True)}
            print(f"{mode}: run failed or timed out after {time.monotonic() - started_s:.0f} s: {codes}")
            logs = "".join(
                f"--- {proc.name} log tail ({proc.log}):\n{proc.log.read_text(errors='replace')[-2000:]}\n"
                for proc in procs
            )
            print(logs, flush=True)
            raise NodesFailed(f"{mode} run failed or timed out: exit codes {codes}", logs)
    finally:
        stop_processes(popens)
    wall_s = time.monotonic() - started_s
    return Run(mode, {proc.name: list(read_metrics(proc.metrics)) for proc in procs}, wall_s)


def _describe_run(run: Run, rounds: int, local_steps: int) -> dict[str, Any]:
    """The run's fractions (benchmarks/overlap.py), its step time, waits, message size and devices."""
    rounds_of = {node: run.rounds(node) for node in run.records}
    steady = [r for rs in rounds_of.values() for r in rs if 1 < r["round"] < rounds]
    starts = [next((r for r in recs if r.get("event") == "start"), {}) for recs in run.records.values()]
    step_s = statistics.mean(r["train_s"] for r in steady) / local_steps if steady else None
    message_bytes = run.message_bytes()
    return {
        "steady_fraction": round(run.steady_fraction(rounds), 4),
        "whole_fraction": round(run.whole_fraction(), 4),
        "wall_s": round(run.wall_s, 1),
        "step_s": None if step_s is None else round(step_s, 4),
        "wait_s_per_round": round(statistics.mean(r["wait_s"] for r in steady), 3) if steady else None,
        "message_bytes": round(message_bytes),
        # one message to one neighbour at 1 Gb/s, in local steps
        "transfer_steps": None if not step_s else round(message_bytes / LINK_BYTES_PER_S / step_s, 2),
        "devices": sorted({f"{s.get('device')}/{s.get('autocast')}" for s in starts}),
        "eval": {node: (rs[-1].get("eval") if rs else None) for node, rs in rounds_of.items()},
    }


@contextlib.contextmanager
def _hosts(use_netns: bool, report: Report) -> Iterator[tuple[list[netns.Host] | None, str]]:
    """Four emulated hosts with 1 Gb/s per link, else loopback: (hosts or None, what the links are)."""
    if not use_netns:
        yield None, "loopback WITHOUT limits (--no-netns)"
        return
    stack = contextlib.ExitStack()
    try:
        hosts = stack.enter_context(netns.hosts(NODES, tag=f"gpuchk{os.getpid() % 10000}"))
    except netns.NetnsUnavailable as exc:
        yield None, f"loopback WITHOUT limits (network namespaces unavailable: {exc})"
        return
    with stack:
        try:  # ring: host i sends to i - 1 and i + 1, each link its own 1 Gb/s
            limits = [
                netns.limit_links(h, {hosts[(i + d) % NODES].address: LINK_BYTES_PER_S for d in (-1, 1)})
                for i, h in enumerate(hosts)
            ]
            links = f"network namespaces, tc {limits[0]}"
        except netns.NetnsUnavailable as exc:
            report.line(f"tc htb refused ({exc}); trying one tbf uplink per host")
            try:
                limits = [netns.limit_rate(h, rate_bytes_per_s=2 * LINK_BYTES_PER_S) for h in hosts]
                links = f"network namespaces, tc {limits[0]} (one 2 Gb/s uplink per host for its 2 links)"
            except netns.NetnsUnavailable as exc2:
                links = f"network namespaces WITHOUT limits (tc refused: {exc2})"
        yield hosts, links


def cmd_overlap(args: argparse.Namespace, report: Report) -> int:
    deadline = time.monotonic() + args.budget_s
    shape = TINY if args.smoke else LLAMA_7B
    if args.layers:
        layers, why = args.layers, "--layers"
    elif args.smoke:
        layers, why = 2, "smoke: tiny shape"
    else:
        layers, why = _layers_that_fit(NODES, args.max_layers, args.batch_size * args.max_length)
    report.figures = figures = {
        "shape": shape, "rank": args.rank, "local_steps": args.local_steps, "rounds": args.rounds,
        "batch": f"{args.batch_size}x{args.max_length}", "link_bytes_per_s": LINK_BYTES_PER_S,
        "runs": {}, "attempts": [],
    }  # fmt: skip
    for attempt in range(2):
        outcome = _overlap_attempt(args, report, layers, why, deadline)
        figures["attempts"].append(outcome)
        figures |= {
            k: outcome[k] for k in ("layers", "layers_why", "adapter_mb", "links", "runs") if k in outcome
        }
        smaller = max(1, layers // 2)
        if not outcome.get("out_of_memory") or attempt or smaller == layers:
            break
        if deadline - time.monotonic() < 150:
            report.line(f"out of GPU memory at {layers} layers; too little time left to retry with fewer")
            break
        why = f"{layers} layers ran out of GPU memory: half as many"
        report.line(f"out of GPU memory at {layers} layers; again with {smaller}")
        layers = smaller
    runs = figures["runs"]
    if runs:
        report.line(
            "training-time fraction (steady rounds): "
            + ", ".join(f"{name} {r['steady_fraction']:.3f}" for name, r in runs.items())
            + f" (issue 13 target for overlap: >= 0.97; {figures['layers']} layers; {figures['links']})"
        )
    expected = "cpu" if args.smoke else "cuda"
    wrong = [d for r in runs.values() for d in r["devices"] if not d.startswith(expected)]
    if wrong:
        report.line(f"FAIL: nodes trained on {wrong}, not {expected}")
    failed = any(a.get("failures") for a in figures["attempts"][-1:])
    return 1 if wrong or failed or not runs else 0


def _overlap_attempt(
    args: argparse.Namespace, report: Report, layers: int, why: str, deadline: float
) -> dict[str, Any]:
    """Build the model, then run overlap + sign1 and (time allowing) synchronous + none."""
    shape = TINY if args.smoke else LLAMA_7B
    adapter_mb = _adapter_mb(layers, shape, args.rank)
    full_mb = _adapter_mb(LLAMA_7B_LAYERS, LLAMA_7B, args.rank)
    shape_text = ", ".join(f"{k} {v}" for k, v in shape.items())
    report.line(
        f"model: random-weight Llama, {shape_text}, {layers} layers ({why}); LoRA r={args.rank} on "
        f"{'/'.join(LORA_TARGETS)}: adapter {adapter_mb:.1f} MB fp32 (the 32-layer 7B: {full_mb:.0f} MB); "
        f"batch {args.batch_size} x {args.max_length} tokens, {args.local_steps} steps a round, "
        f"{args.rounds} rounds"
    )
    outcome: dict[str, Any] = {
        "layers": layers, "layers_why": why, "adapter_mb": round(adapter_mb, 2), "runs": {}, "failures": 0,
    }  # fmt: skip
    model_dir = args.work / f"llama-{layers}"
    argv = [sys.executable, str(Path(__file__).resolve()), "make-model", "--out", str(model_dir)]
    argv += ["--layers", str(layers)] + (["--smoke"] if args.smoke else [])
    started = time.monotonic()
    try:
        subprocess.run(argv, check=True, timeout=max(30.0, deadline - time.monotonic() - 60), cwd=ROOT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        report.line(f"make-model failed: {exc}")
        outcome["failures"] = 1
        return outcome
    outcome["make_model_s"] = round(time.monotonic() - started, 1)
    plan = [("overlap", True, args.compression), ("synchronous", False, "none")]
    with _hosts(not args.no_netns, report) as (netns_hosts, netns_links):
        hosts, links = netns_hosts, netns_links
        report.line(f"links: {links}")
        outcome["links"] = links
        for index, (mode, overlap, compression) in enumerate(plan):
            left = deadline - time.monotonic()
            name = f"{mode}+{compression}"
            first = outcome["runs"].get(f"{plan[0][0]}+{plan[0][2]}")
            if index and first is not None and left < 1.3 * first["wall_s"] + 20:
                report.line(
                    f"{name}: skipped, {left:.0f} s left (the first run took {first['wall_s']:.0f} s)"
                )
                continue
            if left < 40:
                report.line(f"{name}: skipped, {left:.0f} s left")
                continue
            scenario = _scenario(args.work / f"{name}-{layers}", model_dir, args, overlap, compression)
            folder = args.work / f"{name}-{layers}" / "run"
            try:
                with GpuMemory() as memory:
                    try:
                        run = _run_nodes(scenario, hosts, folder, name, left - 10)
                    except NodesFailed as exc:
                        if exc.out_of_memory or hosts is None or index or time.monotonic() > deadline - 60:
                            raise
                        report.line(f"{name}: failed in network namespaces; again on loopback without limits")
                        hosts, links = (
                            None,
                            f"loopback WITHOUT limits (the runs in namespaces failed: {links})",
                        )
                        outcome["links"] = links
                        folder = folder.with_name("run-loopback")
                        run = _run_nodes(scenario, None, folder, name, deadline - time.monotonic() - 10)
                result = _describe_run(run, args.rounds, args.local_steps) | memory.figures()
            except NodesFailed as exc:
                oom = " (out of GPU memory)" if exc.out_of_memory else ""
                report.line(f"{name}: FAILED{oom}: {exc}; {memory.describe()}")
                outcome["failures"] += 1
                outcome["out_of_memory"] = exc.out_of_memory
                break
            except (KeyError, ValueError, ZeroDivisionError, statistics.StatisticsError) as exc:
                report.line(f"{name}: FAILED to read its metrics: {type(exc).__name__}: {exc}")
                outcome["failures"] += 1
                continue
            outcome["runs"][name] = result
            step = "n/a" if result["step_s"] is None else f"{result['step_s']:.3f}"
            report.line(
                f"{name}: training-time fraction steady {result['steady_fraction']:.3f}, whole "
                f"{result['whole_fraction']:.3f}; step {step} s, wait {result['wait_s_per_round']} s/round, "
                f"message {result['message_bytes'] / 1e6:.2f} MB (= {result['transfer_steps']} steps at "
                f"1 Gb/s), wall {result['wall_s']:.0f} s; devices {result['devices']}; {memory.describe()}"
            )
    shutil.rmtree(model_dir, ignore_errors=True)
    return outcome


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--summary", type=Path, help="append key lines here")
    parser.add_argument("--results", type=Path, help="add this step's figures to this JSON file")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env")
    demo = commands.add_parser("demo")
    demo.add_argument("--work", type=Path, required=True)
    demo.add_argument("--smoke", action="store_true", help="toy size on the CPU")
    demo.add_argument("--report-copy", type=Path, help="copy the run's report.md here")
    over = commands.add_parser("overlap")
    over.add_argument("--work", type=Path, required=True)
    over.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    over.add_argument("--budget-s", type=float, default=300.0, help="seconds for the whole step")
    over.add_argument(
        "--layers", type=int, default=0, help="layers (default: as many as fit, up to --max-layers)"
    )
    over.add_argument("--max-layers", type=int, default=12)
    over.add_argument("--rank", type=int, default=16)
    over.add_argument("--rounds", type=int, help="default 8 (smoke: 4)")
    over.add_argument("--local-steps", type=int, help="default 4 (smoke: 2)")
    over.add_argument("--batch-size", type=int, help="default 4 (smoke: 2)")
    over.add_argument("--max-length", type=int, help="default 1024 (smoke: 64)")
    over.add_argument("--test-examples", type=int, default=8)
    over.add_argument("--compression", default="sign1")
    over.add_argument("--no-netns", action="store_true", help="loopback without link limits")
    make = commands.add_parser("make-model")
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--layers", type=int, required=True)
    make.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.command == "overlap":
        for key, full, smoke in (
            ("rounds", 6, 4),
            ("local_steps", 4, 2),
            ("batch_size", 4, 2),
            ("max_length", 1024, 64),
        ):
            if getattr(args, key) is None:
                setattr(args, key, smoke if args.smoke else full)
    if args.command == "overlap" and args.rounds < 4:
        parser.error("--rounds must be >= 4 (rounds 2 .. R - 1 are timed)")
    _stop_on_sigterm()
    if getattr(args, "work", None) is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    report = Report(args.command, args.summary, args.results)
    command = {"env": cmd_env, "demo": cmd_demo, "overlap": cmd_overlap, "make-model": cmd_make_model}
    try:
        return command[args.command](args, report)
    finally:
        if args.command != "make-model":
            report.save()


if __name__ == "__main__":
    sys.exit(main())
