"""``p2pfm launch slurm``: an sbatch script that runs one open network as one Slurm job.

The script's flow (docs/deploy.md, "Slurm"):

1. ``srun`` step ``keys``: every task makes its key on its node's storage
   (``STATE_DIR/nodeI/node.key``, ``p2pfm keygen``, kept when it exists)
   and publishes only its peer id (``p2pfm peer-id``) to the job folder.
2. The batch shell builds the roster from those ids (``p2pfm roster
   init/add``) and signs it with the admin key (``p2pfm roster sign``; the
   version is the submit time in seconds, so a later job's roster is newer).
3. ``srun`` step ``nodes``: every task writes its node config from the
   template (``p2pfm launch node-config``: index = ``SLURM_PROCID``, port =
   PORT + 3 * ``SLURM_LOCALID``) and runs ``p2pfm node``; task 0 (on the
   first host, port PORT) starts the network, the others join it through
   ``tcp://FIRST_HOST:PORT``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from p2pfm.core.errors import ConfigError
from p2pfm.deploy.template import PORTS_PER_NODE

_MAX_PORT = 65535


@dataclass(frozen=True)
class SlurmJob:
    """Everything the sbatch script needs; paths absolute (the job runs in another folder)."""

    nodes: int  # Slurm nodes (hosts)
    template: Path
    admin_key: Path
    network: str
    p2pfm: Sequence[str]  # the command that runs p2pfm on the nodes, e.g. (python, "-m", "p2pfm")
    tasks_per_node: int = 1  # p2pfm nodes per host (each gets its own ports)
    port: int = 5550
    job_name: str = "p2pfm"
    partition: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    gpus_per_task: int | None = None
    state_dir: str = "$SLURM_SUBMIT_DIR/p2pfm-state"  # expanded on the node: node-local disk works
    metrics_port: int | None = None  # node.metrics_address 0.0.0.0:(this + SLURM_LOCALID); None: off
    resume: bool = False  # a task whose state folder has a checkpoint continues from it

    def check(self) -> None:
        """Every option in range, each error naming its option."""
        if self.nodes < 1:
            raise ConfigError("--nodes", f"must be >= 1, got {self.nodes}")
        if self.tasks_per_node < 1:
            raise ConfigError("--tasks-per-node", f"must be >= 1, got {self.tasks_per_node}")
        if self.nodes * self.tasks_per_node < 2:  # a lone node would wait for peers until the time limit
            raise ConfigError(
                "--nodes", "a network needs at least 2 p2pfm nodes: --nodes 2 or more, or --tasks-per-node 2"
            )
        last = self.port + PORTS_PER_NODE * self.tasks_per_node - 1
        if self.port < 1 or last > _MAX_PORT:
            raise ConfigError(
                "--port",
                f"the tasks of one host use ports {self.port}..{last} ({PORTS_PER_NODE} each): "
                f"must lie in 1..{_MAX_PORT}",
            )
        if self.metrics_port is not None:
            top = self.metrics_port + self.tasks_per_node - 1
            if self.metrics_port < 1 or top > _MAX_PORT:
                raise ConfigError("--metrics-port", f"ports {self.metrics_port}..{top} must lie in 1..65535")
            if self.metrics_port <= last and top >= self.port:
                raise ConfigError(
                    "--metrics-port", f"overlaps the gossip ports {self.port}..{last}: pick another"
                )
        for option, value in (
            ("--cpus-per-task", self.cpus_per_task),
            ("--gpus-per-task", self.gpus_per_task),
        ):
            if value is not None and value < 1:
                raise ConfigError(option, f"must be >= 1, got {value}")
        if not self.job_name or any(c.isspace() for c in self.job_name):
            raise ConfigError("--job-name", f"must be one word, got {self.job_name!r}")
        if not self.state_dir or "'" in self.state_dir or '"' in self.state_dir:
            raise ConfigError("--state-dir", f"must be a path without quotes, got {self.state_dir!r}")
        if not self.p2pfm:
            raise ConfigError("--p2pfm", "must name a command")


def render_sbatch(job: SlurmJob, *, command_line: str = "") -> str:
    """The sbatch script for ``job`` (bash). ``command_line`` is recorded in its header."""
    job.check()
    p2pfm = shlex.join(job.p2pfm)
    directives = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        f"--ntasks-per-node={job.tasks_per_node}",
        f"--output={job.job_name}-%j.out",
    ]
    if job.partition:
        directives.append(f"--partition={job.partition}")
    if job.time:
        directives.append(f"--time={job.time}")
    if job.cpus_per_task is not None:
        directives.append(f"--cpus-per-task={job.cpus_per_task}")
    if job.gpus_per_task is not None:
        directives.append(f"--gpus-per-task={job.gpus_per_task}")
    sbatch = "\n".join(f"#SBATCH {d}" for d in directives)
    metrics = (
        ""
        if job.metrics_port is None
        else '\n    --metrics-address "0.0.0.0:$((P2PFM_METRICS_PORT + SLURM_LOCALID))" \\'
    )
    resume = 'if [ -d "$dir/out/checkpoint" ]; then extra+=(--resume); fi\n  ' if job.resume else ""
    header = f"# Generated by: {command_line}\n" if command_line else ""
    return f"""#!/bin/bash
# An open p2pfm network of {job.nodes} x {job.tasks_per_node} nodes as one Slurm job (docs/deploy.md).
{header}#
# Submit from a folder every node sees (a shared filesystem): the job folder
# p2pfm-job-JOBID there holds the peer ids, the signed roster and every
# node's log. Keys and node outputs stay in STATE_DIR/nodeI on the nodes.
{sbatch}
set -euo pipefail
umask 077

export P2PFM_TEMPLATE={shlex.quote(str(job.template))}
export P2PFM_NETWORK={shlex.quote(job.network)}
export P2PFM_PORT={job.port}
export P2PFM_PORTS_PER_NODE={PORTS_PER_NODE}
export P2PFM_METRICS_PORT={job.metrics_port if job.metrics_port is not None else ""}
export P2PFM_STATE_DIR="${{P2PFM_STATE_DIR:-{job.state_dir}}}"
export P2PFM_JOB_DIR="$SLURM_SUBMIT_DIR/p2pfm-job-$SLURM_JOB_ID"
ADMIN_KEY={shlex.quote(str(job.admin_key))}
FIRST_HOST="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export P2PFM_BOOTSTRAP="tcp://$FIRST_HOST:$P2PFM_PORT"
mkdir -p "$P2PFM_JOB_DIR/ids"
echo "p2pfm: job $SLURM_JOB_ID, $SLURM_NTASKS nodes of network $P2PFM_NETWORK, bootstrap $P2PFM_BOOTSTRAP"
echo "p2pfm: job folder $P2PFM_JOB_DIR, node state $P2PFM_STATE_DIR/nodeI"

# Step 1, on every task: its key on its node's storage (kept across jobs); only the peer id leaves.
p2pfm_keys() {{
  set -euo pipefail
  umask 077
  local dir="$P2PFM_STATE_DIR/node$SLURM_PROCID"
  mkdir -p "$dir"
  if [ ! -e "$dir/node.key" ]; then
    {p2pfm} keygen --out "$dir/node.key" >/dev/null
  fi
  {p2pfm} peer-id "$dir/node.key" >"$P2PFM_JOB_DIR/ids/$SLURM_PROCID.tmp"
  mv "$P2PFM_JOB_DIR/ids/$SLURM_PROCID.tmp" "$P2PFM_JOB_DIR/ids/$SLURM_PROCID"
}}
export -f p2pfm_keys
srun --distribution=block --kill-on-bad-exit=1 bash -c p2pfm_keys

# Step 2, here: the roster of this job's nodes, signed by the admin key.
ROSTER="$P2PFM_JOB_DIR/roster.toml"
{p2pfm} roster init "$ROSTER" --network "$P2PFM_NETWORK" --force >/dev/null
for ((i = 0; i < SLURM_NTASKS; i++)); do
  {p2pfm} roster add "$ROSTER" --name "node$i" --id "$(cat "$P2PFM_JOB_DIR/ids/$i")" >/dev/null
done
{p2pfm} roster sign "$ROSTER" --key "$ADMIN_KEY" --version "$(date +%s)" --out "$P2PFM_JOB_DIR/roster.signed"
export P2PFM_ROSTER="$P2PFM_JOB_DIR/roster.signed"

# Step 3, on every task: its config from the template, then the node. Task 0 starts the network.
p2pfm_node() {{
  set -euo pipefail
  umask 077
  local dir="$P2PFM_STATE_DIR/node$SLURM_PROCID"
  local port=$((P2PFM_PORT + P2PFM_PORTS_PER_NODE * SLURM_LOCALID))
  local extra=()
  if [ "$SLURM_PROCID" -ne 0 ]; then extra+=(--bootstrap "$P2PFM_BOOTSTRAP"); fi
  {resume}{p2pfm} launch node-config --template "$P2PFM_TEMPLATE" --output "$dir/node.toml" \\
    --index "$SLURM_PROCID" --count "$SLURM_NTASKS" --name "node$SLURM_PROCID" \\
    --network "$P2PFM_NETWORK" --key "$dir/node.key" --roster "$P2PFM_ROSTER" --out-dir "$dir/out" \\{metrics}
    --listen "tcp://0.0.0.0:$port" --advertise-host "$SLURMD_NODENAME"
  echo "p2pfm: node$SLURM_PROCID on $SLURMD_NODENAME:$port, state $dir"
  exec {p2pfm} node --config "$dir/node.toml" "${{extra[@]}}"
}}
export -f p2pfm_node
srun --distribution=block --output="$P2PFM_JOB_DIR/node%t.log" bash -c p2pfm_node
echo "p2pfm: all $SLURM_NTASKS nodes finished; logs in $P2PFM_JOB_DIR, adapters in $P2PFM_STATE_DIR/nodeI/out"
"""
