"""`p2pfm launch slurm` for real: a one-host Slurm cluster (munged, slurmctld, slurmd) started by the test.

The cluster is private to the test: its own slurm.conf, munge key and socket,
state and spool folders under tmp_path, free ports, the host as one Slurm node
named ``localhost``. The generated sbatch script runs three p2pfm nodes (three
tasks on the one node, ports apart by SLURM_LOCALID) on the tiny random BERT.
Every daemon the test starts is stopped by its pid, the job by ``scancel``.
Skips, with the reason, where the Slurm or munge programs are missing
(``.ci/run`` installs Debian's slurm-wlm and munge).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.numpy

from p2pfm.core.consensus import consensus_distance
from p2pfm.core.identity import load_key_file
from p2pfm.lab.scenario import stop_processes
from p2pfm.node.metrics import read_metrics
from tests.conftest import file_mode, tiny_classifier_toml, topic_examples, write_jsonl

pytestmark = pytest.mark.slow  # starts a Slurm cluster and three node processes (each imports torch)

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "sinfo", "scontrol", "scancel")
TASKS = 3
ROUNDS = 4
_ENDED = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "DEADLINE",
)


def _program(name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_run(width: int, *, avoid: set[int]) -> int:
    """A port P with P .. P + width - 1 free (and none in ``avoid``); bounded tries."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            base = int(sock.getsockname()[1])
        ports = range(base, base + width)
        if base + width <= 65535 and not avoid & set(ports) and all(_bindable(p) for p in ports):
            return base
    raise AssertionError(f"no run of {width} free ports")


@dataclass
class Cluster:
    env: dict[str, str]
    folder: Path
    daemons: list[tuple[str, subprocess.Popen[bytes]]]

    def run(self, *args: str, cwd: Path | None = None) -> str:
        done = subprocess.run(
            args, env=self.env, cwd=cwd, capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr, self.logs())
        return done.stdout

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.folder / "log").iterdir())
        )


def _slurm_conf(folder: Path, *, user: str, ctld_port: int, slurmd_port: int) -> str:
    return f"""ClusterName=p2pfmtest
SlurmctldHost=localhost
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MinJobAge=600
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _stop(daemons: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    for _, proc in reversed(daemons):  # slurmd, slurmctld, then munged
        stop_processes([proc], grace_s=15.0)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    paths = {name: _program(name) for name in PROGRAMS}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        pytest.skip(
            f"Slurm/munge programs missing: {', '.join(missing)} (.ci/run installs slurm-wlm and munge)"
        )
    folder = tmp_path / "slurm"
    for sub in ("state", "spool", "log"):
        (folder / sub).mkdir(parents=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    ctld_port = _free_run(1, avoid=set())
    slurmd_port = _free_run(1, avoid={ctld_port})
    conf = folder / "slurm.conf"
    conf.write_text(_slurm_conf(folder, user=getpass.getuser(), ctld_port=ctld_port, slurmd_port=slurmd_port))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(SLURM_CONF=str(conf), PYTHONPATH=str(ROOT))
    daemons: list[tuple[str, subprocess.Popen[bytes]]] = []
    commands = {
        "munged": [
            "--foreground", "--force", f"--socket={folder}/munge.socket", f"--key-file={key}",
            f"--log-file={folder}/log/munged.log", f"--pid-file={folder}/munged.pid",
            f"--seed-file={folder}/munged.seed",
        ],
        "slurmctld": ["-D", "-f", str(conf)],
        "slurmd": ["-D", "-f", str(conf), "-N", "localhost"],
    }  # fmt: skip
    made = Cluster(env, folder, daemons)
    try:
        for name, args in commands.items():
            log = (folder / "log" / f"{name}.out").open("wb")
            daemons.append(
                (name, subprocess.Popen([str(paths[name]), *args], env=env, stdout=log, stderr=log))
            )
            if name == "munged":
                deadline = time.monotonic() + 10
                while not (folder / "munge.socket").exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
        deadline = time.monotonic() + 40
        state = ""
        while time.monotonic() < deadline:
            assert all(proc.poll() is None for _, proc in daemons), made.logs()
            done = subprocess.run(
                [str(paths["sinfo"]), "-h", "-o", "%t"],
                env=env,
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            state = done.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        assert state == "idle", (state, made.logs())
        yield made
    finally:
        _stop(daemons)


def _template(tmp_path: Path, model_dir: Path) -> Path:
    data = write_jsonl(tmp_path / "data.jsonl", topic_examples(120, seed=3))
    template = tmp_path / "template.toml"
    template.write_text(
        f"""
[node]
network = "slurm-test"
{tiny_classifier_toml(model_dir, data)}
[train]
batch_size = 8
max_length = 16
threads = 1
local_steps = 4

[gossip]
rounds = {ROUNDS}
round_timeout_s = 10.0
snapshot_every = 1

[membership]
degree = 3
"""
    )
    return template


def _wait_for_job(cluster: Cluster, job: str, timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        line = cluster.run("scontrol", "show", "job", job, "-o")
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if fields.get("JobState") in _ENDED:
            return fields
        time.sleep(1.0)
    return fields


def test_sbatch_script_runs_an_open_network_on_a_slurm_cluster(
    tmp_path: Path, tiny_bert_dir: Path, cluster: Cluster
) -> None:
    submit = tmp_path / "submit"
    submit.mkdir()
    port = _free_run(3 * TASKS, avoid=set())
    state = tmp_path / "node-storage"
    script = submit / "run.sbatch"
    launch = [
        sys.executable, "-m", "p2pfm", "launch", "slurm", "--nodes", "1", "--tasks-per-node", str(TASKS),
        "--config", str(_template(tmp_path, tiny_bert_dir)), "--out", str(script), "--port", str(port),
        "--state-dir", str(state), "--time", "5", "--job-name", "p2pfm-test",
    ]  # fmt: skip
    cluster.run(*launch, cwd=submit)
    job = cluster.run("sbatch", "--parsable", str(script), cwd=submit).strip().split(";")[0]
    try:
        fields = _wait_for_job(cluster, job, timeout_s=240)
    finally:
        subprocess.run(["scancel", job], env=cluster.env, capture_output=True, timeout=30, check=False)
    job_dir = submit / f"p2pfm-job-{job}"
    logs = "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}"
        for p in [submit / f"p2pfm-test-{job}.out", *sorted(job_dir.glob("node*.log"))]
        if p.exists()
    )
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", (fields, logs)

    # Keys were made on the node's storage, private; only peer ids went to the job folder.
    ids = {int(p.name): p.read_text().strip() for p in (job_dir / "ids").iterdir()}
    assert sorted(ids) == list(range(TASKS))
    for i in range(TASKS):
        key = state / f"node{i}" / "node.key"
        assert file_mode(key) == 0o600 and load_key_file(key).peer_id.hex == ids[i]
    show = ["roster", "show", str(job_dir / "roster.signed"), "--network", "slurm-test"]
    roster = cluster.run(sys.executable, "-m", "p2pfm", *show)
    assert all(ids[i] in roster for i in range(TASKS)) and roster.count("member ") == TASKS

    # Every node finished every round; the joiners joined through task 0's address.
    for i in range(TASKS):
        records = list(read_metrics(state / f"node{i}" / "out" / "metrics.jsonl"))
        done = records[-1]
        assert done["event"] == "done" and done["rounds_completed"] == ROUNDS and not done["stopped"], (
            i,
            logs,
        )
        assert (state / f"node{i}" / "out" / "adapter").is_dir()
        config = (state / f"node{i}" / "node.toml").read_text()
        assert f"shard = {i}" in config and f"shards = {TASKS}" in config
        if i:
            assert any(r["event"] == "joined" for r in records), (i, logs)
    # They agree. With degree 3 each node is the other two's neighbour (a full mesh of three), so the
    # Metropolis weights are 1/3 each: a last round in which every node heard both others leaves all three
    # on the same average, equal up to float32 rounding (measured ~1e-20). Should an update miss the
    # deadline, the node keeps its own weight and the bound is test_e2e's 0.05.
    last = []
    for i in range(TASKS):
        records = read_metrics(state / f"node{i}" / "out" / "metrics.jsonl")
        last.append([r for r in records if r["event"] == "round" and r["round"] == ROUNDS][-1])
        assert last[-1]["members"] == TASKS and len(last[-1]["active_view"]) == TASKS - 1, (i, last[-1])
    folder = "out/snapshots"
    snapshots = [
        dict(
            safetensors.numpy.load_file(str(state / f"node{i}" / folder / f"round_{ROUNDS:05d}.safetensors"))
        )
        for i in range(TASKS)
    ]
    everyone_heard = all(not r["missing"] and len(r["heard"]) == TASKS - 1 for r in last)
    assert consensus_distance(snapshots) < (1e-9 if everyone_heard else 0.05), (
        consensus_distance(snapshots),
        logs,
    )
