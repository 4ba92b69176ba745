"""``p2pfm launch slurm | k8s | node-config``: run an open network on an existing engine (docs/deploy.md).

``slurm`` writes an sbatch script (one job, one task per p2pfm node) and the
admin key that signs the job's roster; ``k8s`` writes Kubernetes manifests
(a StatefulSet behind a headless Service) and keeps the keys it made in a
folder beside them; ``node-config`` is what the script and the pods run on
each node at start: one node's config from the shared template.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from p2pfm import __version__
from p2pfm.core.errors import ConfigError


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    launch = commands.add_parser(
        "launch", help="run an open network on Slurm or Kubernetes (an sbatch script, manifests)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  p2pfm launch slurm --nodes 12 --config template.toml --out run.sbatch",
    )  # fmt: skip
    actions = launch.add_subparsers(dest="launch_command", required=True, metavar="ENGINE")
    _add_slurm(actions)
    _add_k8s(actions)
    _add_node_config(actions)


def _add_slurm(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    slurm = actions.add_parser(
        "slurm", help="write an sbatch script that runs the network as one job (one task per node)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  p2pfm launch slurm --nodes 12 --config template.toml --partition gpu "
        "--time 4:00:00 --gpus-per-task 1 --out run.sbatch\n  sbatch run.sbatch",
    )  # fmt: skip
    slurm.add_argument("--nodes", type=int, required=True, help="Slurm nodes (hosts) of the job")
    slurm.add_argument("--config", type=Path, required=True, help="node config template (docs/deploy.md)")
    slurm.add_argument("--out", type=Path, default=Path("p2pfm.sbatch"), help="script (default p2pfm.sbatch)")
    slurm.add_argument("--force", action="store_true", help="overwrite an existing script")
    slurm.add_argument(
        "--tasks-per-node",
        type=int,
        default=1,
        help="p2pfm nodes per host, each on its own ports (default 1)",
    )
    slurm.add_argument(
        "--port", type=int, default=5550,
        help="first task's node.listen port on each host; task L uses PORT+3L .. PORT+3L+2 (default 5550)",
    )  # fmt: skip
    slurm.add_argument("--network", help="network id (default: the template's node.network)")
    slurm.add_argument("--job-name", default="p2pfm", help="Slurm job name (default p2pfm)")
    slurm.add_argument("--partition", help="Slurm partition")
    slurm.add_argument("--time", help="Slurm time limit, e.g. 4:00:00")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per p2pfm node")
    slurm.add_argument("--gpus-per-task", type=int, help="GPUs per p2pfm node")
    slurm.add_argument(
        "--state-dir", default="$SLURM_SUBMIT_DIR/p2pfm-state",
        help="each node's storage for its key and outputs, NODE_STATE/nodeI; expanded on the node, so "
        "local disk such as /var/tmp/p2pfm works (default $SLURM_SUBMIT_DIR/p2pfm-state)",
    )  # fmt: skip
    slurm.add_argument(
        "--admin-key", type=Path,
        help="key that signs the job's roster (default admin.key beside the script; made when missing)",
    )  # fmt: skip
    slurm.add_argument(
        "--metrics-port", type=int,
        help="serve each node's metrics on this port + its local task number (node.metrics_address)",
    )  # fmt: skip
    slurm.add_argument(
        "--resume", action="store_true", help="a node whose state folder has a checkpoint continues from it"
    )
    slurm.add_argument(
        "--p2pfm", default=shlex.join([sys.executable, "-m", "p2pfm"]),
        help="command that runs p2pfm on the nodes (default: this interpreter, %(default)s)",
    )  # fmt: skip
    slurm.set_defaults(run=_cmd_slurm)


def _add_k8s(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    k8s = actions.add_parser(
        "k8s", help="write Kubernetes manifests: a StatefulSet of nodes behind a headless Service",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  p2pfm launch k8s --nodes 12 --config template.toml "
        "--image registry.example/p2pfm:0.1 --namespace ml --out p2pfm.yaml\n  kubectl apply -f p2pfm.yaml",
    )  # fmt: skip
    k8s.add_argument("--nodes", type=int, required=True, help="pods (nodes) of the StatefulSet")
    k8s.add_argument("--config", type=Path, required=True, help="node config template (docs/deploy.md)")
    k8s.add_argument(
        "--image",
        default=f"p2pfm:{__version__}",
        help="container image with p2pfm installed (default %(default)s)",
    )
    k8s.add_argument(
        "--out", type=Path, default=Path("p2pfm.yaml"), help="manifest file (default p2pfm.yaml)"
    )
    k8s.add_argument(
        "--keys-dir", type=Path,
        help="where the admin key, node keys and roster are kept (default OUT's name + '-keys', beside it); "
        "existing keys are reused",
    )  # fmt: skip
    k8s.add_argument("--network", help="network id (default: the template's node.network)")
    k8s.add_argument("--name", default="p2pfm", help="StatefulSet and Service name (default p2pfm)")
    k8s.add_argument("--namespace", default="default", help="namespace (default default)")
    k8s.add_argument("--port", type=int, default=5550, help="node.listen port P; P+1, P+2 too (default 5550)")
    k8s.add_argument(
        "--metrics-port",
        type=int,
        default=9100,
        help="metrics port, annotated for scraping; 0 = off (default 9100)",
    )
    k8s.add_argument("--storage", default="10Gi", help="each pod's volume for its outputs (default 10Gi)")
    k8s.add_argument("--storage-class", help="storage class of the volumes (default: the cluster's)")
    k8s.add_argument("--cpu", default="2", help="CPU request per pod (default 2)")
    k8s.add_argument("--memory", default="4Gi", help="memory request and limit per pod (default 4Gi)")
    k8s.add_argument("--gpus", type=int, default=0, help="nvidia.com/gpu per pod (default 0)")
    k8s.add_argument("--p2pfm", default="p2pfm", help="command that runs p2pfm in the image (default p2pfm)")
    k8s.set_defaults(run=_cmd_k8s)


def _add_node_config(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    node = actions.add_parser(
        "node-config", help="write one node's config from a template (run by the sbatch script and the pods)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  p2pfm launch node-config --template template.toml --output node.toml --index 2 "
        "--count 12 --key node.key --roster roster.signed --out-dir out --listen tcp://0.0.0.0:5550 "
        "--advertise-host host2",
    )  # fmt: skip
    node.add_argument("--template", type=Path, required=True)
    node.add_argument("--output", type=Path, required=True, help="node config file to write")
    node.add_argument("--index", type=int, required=True, help="this node's index: its data shard")
    node.add_argument("--count", type=int, required=True, help="nodes in the network: data.shards")
    node.add_argument("--name", help="node.name (default nodeINDEX)")
    node.add_argument("--network", help="node.network (default: the template's)")
    node.add_argument("--key", type=Path, required=True, help="node.key")
    node.add_argument("--roster", type=Path, required=True, help="membership.roster: the signed roster")
    node.add_argument("--out-dir", type=Path, required=True, help="node.out")
    node.add_argument("--listen", required=True, metavar="tcp://HOST:PORT", help="node.listen")
    node.add_argument("--advertise-host", help="membership.advertise_host")
    node.add_argument("--metrics-address", metavar="HOST:PORT", help="node.metrics_address")
    node.set_defaults(run=_cmd_node_config)


def _cmd_slurm(args: argparse.Namespace) -> int:
    from p2pfm.core.identity import Identity, load_key_file, write_key_file  # noqa: PLC0415
    from p2pfm.deploy.slurm import SlurmJob, render_sbatch  # noqa: PLC0415
    from p2pfm.deploy.template import check_template, read_template, template_network  # noqa: PLC0415

    template_path = args.config.resolve()
    template = read_template(template_path)
    network = template_network(template, args.network)
    check_template(template, template_path, count=args.nodes * max(args.tasks_per_node, 1), network=network)
    out: Path = args.out.resolve()
    if out.is_dir():
        out = out / "p2pfm.sbatch"
    admin_path = (args.admin_key or out.parent / "admin.key").resolve()
    job = SlurmJob(
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        template=template_path,
        admin_key=admin_path,
        network=network,
        p2pfm=_command("--p2pfm", args.p2pfm),
        port=args.port,
        job_name=args.job_name,
        partition=args.partition,
        time=args.time,
        cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task,
        state_dir=args.state_dir,
        metrics_port=args.metrics_port,
        resume=args.resume,
    )
    script = render_sbatch(job, command_line=shlex.join(["p2pfm", *sys.argv[1:]]))
    if out.exists() and not args.force:
        raise ConfigError("--out", f"{out} already exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    admin_path.parent.mkdir(parents=True, exist_ok=True)
    if admin_path.exists():
        admin = load_key_file(admin_path)
        made = "kept"
    else:
        admin = Identity.generate()
        write_key_file(admin, admin_path)
        made = "made"
    out.write_text(script, encoding="utf-8")
    out.chmod(0o755)
    print(f"wrote {out}: {args.nodes * args.tasks_per_node} nodes of network {network!r}")
    print(f"admin key {admin_path} ({made}; peer id {admin.peer_id.hex}) signs the job's roster")
    print(f"submit it from a folder every node sees: sbatch {out}")
    return 0


def _cmd_k8s(args: argparse.Namespace) -> int:
    from p2pfm.config.roster import Member, Roster, save_roster  # noqa: PLC0415
    from p2pfm.core.identity import Identity, load_key_file, write_key_file  # noqa: PLC0415
    from p2pfm.core.private_files import make_private_dir, write_private_file  # noqa: PLC0415
    from p2pfm.core.records import make_roster_document  # noqa: PLC0415
    from p2pfm.deploy.k8s import K8sNetwork, manifests_yaml, render_manifests  # noqa: PLC0415
    from p2pfm.deploy.template import check_template, read_template, template_network  # noqa: PLC0415

    template_path = args.config.resolve()
    template = read_template(template_path)
    network = template_network(template, args.network)
    check_template(template, template_path, count=args.nodes, network=network)
    net = K8sNetwork(
        nodes=args.nodes,
        network=network,
        image=args.image,
        name=args.name,
        namespace=args.namespace,
        port=args.port,
        metrics_port=args.metrics_port or None,
        storage=args.storage,
        storage_class=args.storage_class,
        cpu=args.cpu,
        memory=args.memory,
        gpus=args.gpus,
        p2pfm=_command("--p2pfm", args.p2pfm),
    )
    net.check()
    out: Path = args.out
    keys_dir: Path = args.keys_dir or out.with_name(out.stem + "-keys")
    out.parent.mkdir(parents=True, exist_ok=True)
    make_private_dir(keys_dir)

    def key(name: str) -> tuple[Identity, str]:
        path = keys_dir / name
        if not path.exists():
            write_key_file(Identity.generate(), path)
        return load_key_file(path), path.read_text(encoding="utf-8")

    admin, _ = key("admin.key")
    nodes = [key(f"node-{i}.key") for i in range(args.nodes)]
    roster = Roster(
        network, tuple(Member(f"{net.name}-{i}", ident.peer_id) for i, (ident, _) in enumerate(nodes))
    )
    save_roster(roster, keys_dir / "roster.toml")
    # The version is the time in seconds: a re-rendered roster (more nodes) is newer, so it can be published.
    document = make_roster_document(
        admin, network=network, version=int(time.time()), members=roster.ids, admins=[admin.peer_id]
    )
    write_private_file(keys_dir / "roster.signed", document.signed)
    docs = render_manifests(
        net,
        template=template_path.read_text(encoding="utf-8"),
        roster=document.signed,
        keys=[text for _, text in nodes],
    )
    write_private_file(out, manifests_yaml(docs).encode("utf-8"))  # holds the node keys: mode 0600
    print(
        f"wrote {out} (mode 0600: its Secret holds the node keys): {args.nodes} pods of network {network!r}"
    )
    print(f"keys, roster.toml and roster.signed (version {document.version}) kept in {keys_dir}")
    print(f"bootstrap: {net.bootstrap}; apply with: kubectl apply -f {out}")
    return 0


def _cmd_node_config(args: argparse.Namespace) -> int:
    from p2pfm.deploy.template import NodeSlot, read_template, template_network, write_node_config  # noqa: PLC0415

    template = read_template(args.template)
    slot = NodeSlot(
        index=args.index,
        count=args.count,
        name=args.name or f"node{args.index}",
        key=args.key.resolve(),
        listen=args.listen,
        roster=args.roster.resolve(),
        out=args.out_dir.resolve(),
        network=template_network(template, args.network),
        advertise_host=args.advertise_host,
        metrics_address=args.metrics_address,
    )
    if not 0 <= args.index < args.count:
        raise ConfigError("--index", f"must be in 0..{args.count - 1}, got {args.index}")
    write_node_config(template, slot, args.output.resolve())
    return 0


def _command(option: str, text: str) -> list[str]:
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise ConfigError(option, f"cannot split {text!r} into words: {exc}") from None
    if not words:
        raise ConfigError(option, "must name a command")
    return words
