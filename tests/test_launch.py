"""`p2pfm launch slurm | k8s | node-config`: rendering, validation, and the operator's mistakes.

The sbatch script runs for real in tests/test_slurm.py. The Kubernetes
manifests are validated here offline against the Kubernetes API's OpenAPI
schema (kubernetes-validate, strict: unknown fields are errors); no cluster.
"""

from __future__ import annotations

import base64
import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from p2pfm.cli import main
from p2pfm.config.node_config import load_node_config
from p2pfm.config.settings import NodeSection
from p2pfm.core.errors import ConfigError
from p2pfm.core.identity import load_key_file
from p2pfm.core.records import open_roster_document
from p2pfm.deploy.k8s import K8sNetwork, render_manifests
from p2pfm.deploy.slurm import SlurmJob, render_sbatch
from tests.conftest import file_mode

K8S_VERSION = "1.30"

TEMPLATE = """
[node]
network = "launch-test"

[model]
path = "model"
num_labels = 2

[data]
source = "data.jsonl"

[gossip]
rounds = 5

[membership]
degree = 3
"""


@pytest.fixture
def template(tmp_path: Path) -> Path:
    path = tmp_path / "tpl" / "template.toml"
    path.parent.mkdir()
    path.write_text(TEMPLATE)
    return path


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("p2pfm: error: ") and err.count("\n") == 1, err
    return err


# --------------------------------------------------------------------------- #
# Slurm
# --------------------------------------------------------------------------- #


def test_launch_slurm_writes_a_script_and_an_admin_key(tmp_path: Path, template: Path) -> None:
    out = tmp_path / "job" / "run.sbatch"
    argv = [
        "launch",
        "slurm",
        "--nodes",
        "4",
        "--config",
        str(template),
        "--out",
        str(out),
        "--partition",
        "gpu",
    ]
    argv += ["--time", "2:00:00", "--cpus-per-task", "8", "--gpus-per-task", "1", "--port", "6000"]
    assert main(argv) == 0
    script = out.read_text()
    subprocess.run(["bash", "-n", str(out)], check=True, timeout=30)
    for directive in (
        "--nodes=4", "--ntasks-per-node=1", "--partition=gpu", "--time=2:00:00", "--cpus-per-task=8",
        "--gpus-per-task=1", "--job-name=p2pfm",
    ):  # fmt: skip
        assert f"#SBATCH {directive}\n" in script
    assert f"P2PFM_TEMPLATE={template}" in script and "P2PFM_NETWORK=launch-test" in script
    assert "P2PFM_PORT=6000" in script and "head -n1" in script and "SLURM_LOCALID" in script
    assert script.count("srun ") == 2 and "roster sign" in script and "launch node-config" in script
    assert f"{sys.executable} -m p2pfm node --config" in script
    admin = tmp_path / "job" / "admin.key"
    assert file_mode(admin) == 0o600 and f"ADMIN_KEY={admin}" in script
    peer = load_key_file(admin).peer_id
    # A second script keeps the admin key (members trust it); the script itself is not overwritten.
    assert main([*argv, "--force"]) == 0 and load_key_file(admin).peer_id == peer


def test_launch_slurm_refuses_mistakes_naming_the_field(
    tmp_path: Path, template: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "run.sbatch")
    base = ["launch", "slurm", "--config", str(template), "--out", out]
    assert "'--nodes': must be >= 1" in _fails([*base, "--nodes", "0"], capsys)
    err = _fails([*base, "--nodes", "2", "--tasks-per-node", "4", "--port", "65530"], capsys)
    assert "'--port'" in err and "65530..65541" in err
    lone = _fails([*base, "--nodes", "1"], capsys)  # one task would wait for peers until the time limit
    assert "'--nodes'" in lone and "at least 2" in lone
    err = _fails([*base, "--nodes", "2", "--metrics-port", "5551"], capsys)
    assert "'--metrics-port'" in err and "overlaps" in err
    assert "'--network'" in _fails([*base, "--nodes", "2", "--network", "other"], capsys)
    bad = tmp_path / "bad.toml"
    for text, field in (
        (TEMPLATE.replace("num_labels = 2", ""), "model.num_labels"),
        (TEMPLATE.replace("rounds = 5", "rounds = 0"), "gossip.rounds"),
        (TEMPLATE.replace('network = "launch-test"', 'network = "x"\nkey = "node.key"'), "node.key"),
        (TEMPLATE.replace("degree = 3", "degree = 3\nbootstrap = []"), "membership.bootstrap"),
        (TEMPLATE + "\n[[peers]]\nid = 'x'\naddress = 'tcp://h:1'\n", "peers"),
        (TEMPLATE.replace("[data]", "[data]\nshard = 1"), "data.shard"),
        (TEMPLATE.replace('[node]\nnetwork = "launch-test"', ""), "node.network"),
    ):
        bad.write_text(text)
        err = _fails(["launch", "slurm", "--nodes", "2", "--config", str(bad), "--out", out], capsys)
        assert f"config field {field!r}" in err, (field, err)
    assert not Path(out).exists()
    assert main([*base, "--nodes", "1", "--tasks-per-node", "2"]) == 0  # two nodes on one host
    assert "already exists" in _fails([*base, "--nodes", "2"], capsys)


def test_sbatch_renderer_is_plain_text(tmp_path: Path) -> None:
    job = SlurmJob(
        nodes=2, template=tmp_path / "t.toml", admin_key=tmp_path / "admin.key", network="n",
        p2pfm=("/opt/my env/bin/python", "-m", "p2pfm"), tasks_per_node=2, state_dir="/var/tmp/p2pfm",
        metrics_port=9100, resume=True,
    )  # fmt: skip
    script = render_sbatch(job)
    assert "'/opt/my env/bin/python' -m p2pfm keygen" in script  # quoted for the shell
    assert 'P2PFM_STATE_DIR="${P2PFM_STATE_DIR:-/var/tmp/p2pfm}"' in script
    assert "--metrics-address" in script and "extra+=(--resume)" in script
    assert "#SBATCH --partition" not in script and "#SBATCH --gpus-per-task" not in script
    with pytest.raises(ConfigError, match="--job-name"):
        render_sbatch(SlurmJob(**{**job.__dict__, "job_name": "two words"}))


# --------------------------------------------------------------------------- #
# One node's config
# --------------------------------------------------------------------------- #


def _node_config_argv(template: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "launch", "node-config", "--template", str(template), "--output", str(tmp_path / "n2" / "node.toml"),
        "--index", "2", "--count", "3", "--key", str(tmp_path / "n2" / "node.key"),
        "--roster", str(tmp_path / "roster.signed"), "--out-dir", str(tmp_path / "n2" / "out"),
        "--listen", "tcp://0.0.0.0:5556", "--advertise-host", "host2", *extra,
    ]  # fmt: skip


def test_node_config_fills_in_one_node(tmp_path: Path, template: Path) -> None:
    assert main(_node_config_argv(template, tmp_path)) == 0
    config = load_node_config(tmp_path / "n2" / "node.toml")
    assert (config.shard.shard, config.shard.shards) == (2, 3)
    assert config.node.name == "node2" and config.node.network == "launch-test"
    assert config.node.listen == "tcp://0.0.0.0:5556" and config.node.key == tmp_path / "n2" / "node.key"
    assert config.membership is not None and config.membership.advertise_host == "host2"
    assert config.membership.roster == tmp_path / "roster.signed" and config.membership.degree == 3
    # Relative paths of the template stay relative to the template, wherever the node's config goes.
    assert config.model.path == str(template.parent / "model")
    assert config.data.source == str(template.parent / "data.jsonl")


def test_node_config_metrics_address(tmp_path: Path, template: Path) -> None:
    if "metrics_address" not in NodeSection.__struct_fields__:
        pytest.skip("node.metrics_address is not in the node config schema yet")
    assert main(_node_config_argv(template, tmp_path, "--metrics-address", "0.0.0.0:9100")) == 0
    assert load_node_config(tmp_path / "n2" / "node.toml").node.metrics_address == "0.0.0.0:9100"


def test_node_config_refuses_a_bad_slot(
    tmp_path: Path, template: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = _node_config_argv(template, tmp_path)
    argv[argv.index("--index") + 1] = "3"
    assert "'--index': must be in 0..2" in _fails(argv, capsys)
    argv = _node_config_argv(template, tmp_path)
    argv[argv.index("--listen") + 1] = "0.0.0.0:5556"
    assert "'node.listen'" in _fails(argv, capsys)
    assert not (tmp_path / "n2" / "node.toml").exists()


@pytest.mark.parametrize("command", ["launch", "launch slurm", "launch k8s", "launch node-config"])
def test_every_launch_command_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    assert f"example:\n  p2pfm {command} " in capsys.readouterr().out


# --------------------------------------------------------------------------- #
# Kubernetes
# --------------------------------------------------------------------------- #


def _validate(doc: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _render(tmp_path: Path, template: Path, *extra: str) -> list[dict[str, Any]]:
    out = tmp_path / "k8s" / "p2pfm.yaml"
    out.parent.mkdir(exist_ok=True)
    argv = [
        "launch",
        "k8s",
        "--nodes",
        "3",
        "--config",
        str(template),
        "--out",
        str(out),
        "--namespace",
        "ml",
    ]
    assert main([*argv, "--image", "registry.example/p2pfm:0.1", *extra]) == 0
    assert file_mode(out) == 0o600  # the Secret holds the node keys
    return list(yaml.safe_load_all(out.read_text()))


def test_k8s_manifests_validate_against_the_api_schema(tmp_path: Path, template: Path) -> None:
    docs = _render(tmp_path, template, "--gpus", "1", "--storage-class", "fast")
    assert [d["kind"] for d in docs] == ["Service", "ConfigMap", "Secret", "StatefulSet"]
    for doc in docs:
        _validate(doc)
    service, config_map, secret, stateful_set = docs
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert [p["port"] for p in service["spec"]["ports"]] == [5550, 5551, 5552, 9100]
    spec = stateful_set["spec"]
    assert (
        spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel" and spec["serviceName"] == "p2pfm"
    )
    pod = spec["template"]
    assert pod["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "registry.example/p2pfm:0.1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    keys_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "keys")
    assert keys_volume["secret"] == {"secretName": "p2pfm", "defaultMode": 0o400}
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"] in ("keys", "config"))
    assert spec["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    script = container["command"][2]
    subprocess.run(["sh", "-n", "-c", script], check=True, timeout=30)
    assert "--bootstrap tcp://p2pfm-0.p2pfm.ml.svc.cluster.local:5550" in script
    assert "--metrics-address 0.0.0.0:9100" in script and '"${POD_NAME##*-}"' in script
    # One key per pod, and the signed roster lists exactly their peer ids.
    roster = open_roster_document(base64.b64decode(config_map["binaryData"]["roster.signed"]), "launch-test")
    keys = tmp_path / "k8s" / "p2pfm-keys"
    peers = set()
    for i in range(3):
        text = base64.b64decode(secret["data"][f"node-{i}.key"]).decode()
        assert text == (keys / f"node-{i}.key").read_text() and file_mode(keys / f"node-{i}.key") == 0o600
        peers.add(load_key_file(keys / f"node-{i}.key").peer_id)
    assert roster.members == peers and roster.admins == {load_key_file(keys / "admin.key").peer_id}
    assert config_map["data"]["template.toml"] == TEMPLATE
    # Re-rendering for more pods keeps the existing keys, adds one, and signs a roster no older.
    again = _render(tmp_path, template, "--nodes", "4")
    assert again[2]["data"]["node-0.key"] == secret["data"]["node-0.key"] and "node-3.key" in again[2]["data"]
    newer = open_roster_document(base64.b64decode(again[1]["binaryData"]["roster.signed"]), "launch-test")
    assert newer.version >= roster.version and len(newer.members) == 4


def test_a_broken_manifest_fails_the_schema_check(tmp_path: Path, template: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    stateful_set = _render(tmp_path, template)[3]
    for path, value in (
        (("spec", "replicas"), "3"),  # a string where an integer belongs
        (("spec", "podManagmentPolicy"), "Parallel"),  # a misspelt field (strict: unknown fields fail)
        (("spec", "template", "spec", "containers"), [{"image": "x"}]),  # a container without a name
    ):
        broken = copy.deepcopy(stateful_set)
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_k8s_refuses_mistakes(tmp_path: Path, template: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["launch", "k8s", "--nodes", "2", "--config", str(template), "--out", str(tmp_path / "x.yaml")]
    assert "'--name'" in _fails([*base, "--name", "P2PFM"], capsys)
    assert "'--metrics-port'" in _fails([*base, "--metrics-port", "5551"], capsys)
    assert "'--memory'" in _fails([*base, "--memory", "4 GB"], capsys)
    assert "'--nodes'" in _fails([*base[:2], "--nodes", "0", *base[4:]], capsys)
    assert "at least 2 pods" in _fails([*base[:2], "--nodes", "1", *base[4:]], capsys)
    assert not (tmp_path / "x.yaml").exists()
    net = K8sNetwork(nodes=2, network="n", image="i", metrics_port=None)
    docs = render_manifests(net, template=TEMPLATE, roster=b"r", keys=["a", "b"])
    assert "annotations" not in docs[3]["spec"]["template"]["metadata"]
    with pytest.raises(ConfigError, match="2 nodes but 1 keys"):
        render_manifests(net, template=TEMPLATE, roster=b"r", keys=["a"])


def test_the_pod_start_script_configures_its_own_node(
    tmp_path: Path, template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The container command, run by sh with the pod's folders under tmp_path and `p2pfm node` stubbed."""
    from p2pfm.deploy import k8s  # noqa: PLC0415

    docs = _render(tmp_path, template)
    config, keys, state, stubs = (tmp_path / name for name in ("etc", "etc/keys", "state", "bin"))
    for folder in (keys, state, stubs):
        folder.mkdir(parents=True)
    (config / "template.toml").write_text(docs[1]["data"]["template.toml"])
    (config / "roster.signed").write_bytes(base64.b64decode(docs[1]["binaryData"]["roster.signed"]))
    for name, data in docs[2]["data"].items():
        (keys / name).write_bytes(base64.b64decode(data))
        (keys / name).chmod(0o440)  # what the kubelet makes of defaultMode 0400 with an fsGroup
    (stubs / "sleep").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "p2pfm").write_text(
        f'#!/bin/sh\nif [ "$1" = node ]; then echo "$@" > {state}/node-args; exit 0; fi\n'
        f'exec {sys.executable} -m p2pfm "$@"\n'
    )
    for stub in ("sleep", "p2pfm"):
        (stubs / stub).chmod(0o755)
    for name, value in (("CONFIG_DIR", config), ("KEYS_DIR", keys), ("STATE_DIR", state)):
        monkeypatch.setattr(k8s, name, str(value))
    script = k8s._start_script(K8sNetwork(nodes=3, network="launch-test", image="i", namespace="ml"))
    env = {"POD_NAME": "p2pfm-2", "PATH": f"{stubs}:/usr/bin:/bin", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(
        ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert file_mode(state / "node.key") == 0o400
    assert (state / "node.key").read_bytes() == (keys / "node-2.key").read_bytes()
    load_key_file(state / "node.key")  # its mode and content are what a node accepts
    node = load_node_config(state / "node.toml")
    assert (node.shard.shard, node.shard.shards, node.node.name) == (2, 3, "p2pfm-2")
    assert node.membership is not None
    assert node.membership.advertise_host == "p2pfm-2.p2pfm.ml.svc.cluster.local"
    assert node.node.metrics_address == "0.0.0.0:9100"
    args = (state / "node-args").read_text().split()
    assert args[args.index("--bootstrap") + 1] == "tcp://p2pfm-0.p2pfm.ml.svc.cluster.local:5550"
    assert (state / "done").exists()  # a finished node idles instead of training again on restart
