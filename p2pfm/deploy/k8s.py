"""``p2pfm launch k8s``: Kubernetes manifests that run one open network as a StatefulSet.

Rendered (docs/deploy.md, "Kubernetes"):

- a headless Service (``clusterIP: None``, ``publishNotReadyAddresses``):
  stable DNS names ``NAME-I.NAME.NAMESPACE.svc.cluster.local`` for the pods,
  resolvable before a pod is ready (a joiner must reach pod 0 at once);
- a ConfigMap with the template and the signed roster;
- a Secret with one key file per pod (``node-I.key``), made by the
  launcher; a pod copies only its own (mode 0400) into its volume;
- a StatefulSet (``podManagementPolicy: Parallel``): pod I is node I (data
  shard I), pod 0 starts the network, the others join it through its DNS
  name; a volume per pod (``volumeClaimTemplates``) keeps the node's out
  folder and checkpoint across restarts (it resumes); the metrics port is
  annotated for Prometheus scraping; the pods run as a non-root user.

Pure: the keys and the signed roster come in as text and bytes.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from p2pfm.core.errors import ConfigError
from p2pfm.deploy.template import PORTS_PER_NODE

_DNS_LABEL = re.compile(r"\A[a-z0-9]([-a-z0-9]*[a-z0-9])?\Z")
_QUANTITY = re.compile(r"\A[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|Pi|M|G|T|P)?\Z")
_USER = 10001  # the pods' non-root user and group
CONFIG_DIR = "/etc/p2pfm"
KEYS_DIR = "/etc/p2pfm/keys"
STATE_DIR = "/var/lib/p2pfm"


@dataclass(frozen=True)
class K8sNetwork:
    """The options of ``p2pfm launch k8s``."""

    nodes: int
    network: str
    image: str
    name: str = "p2pfm"  # StatefulSet, Service, ConfigMap and Secret name; pods are NAME-0 ..
    namespace: str = "default"
    port: int = 5550  # node.listen's port P; P + 1 and P + 2 too
    metrics_port: int | None = 9100  # node.metrics_address 0.0.0.0:PORT; None: no metrics
    storage: str = "10Gi"  # each pod's volume (out folder, checkpoint)
    storage_class: str | None = None
    cpu: str = "2"
    memory: str = "4Gi"
    gpus: int = 0  # nvidia.com/gpu per pod
    p2pfm: Sequence[str] = ("p2pfm",)  # the command in the image

    def check(self) -> None:
        if self.nodes < 2:  # a lone pod would wait for peers for ever
            raise ConfigError("--nodes", f"a network needs at least 2 pods, got {self.nodes}")
        for option, value in (("--name", self.name), ("--namespace", self.namespace)):
            if len(value) > 40 or not _DNS_LABEL.match(value):
                raise ConfigError(
                    option, f"must be a DNS label (a-z, 0-9, '-', at most 40 characters), got {value!r}"
                )
        if not 1 <= self.port <= 65535 - (PORTS_PER_NODE - 1):
            raise ConfigError("--port", f"must be in 1..{65535 - PORTS_PER_NODE + 1}, got {self.port}")
        if self.metrics_port is not None:
            if not 1 <= self.metrics_port <= 65535:
                raise ConfigError("--metrics-port", f"must be in 1..65535, got {self.metrics_port}")
            if self.port <= self.metrics_port < self.port + PORTS_PER_NODE:
                raise ConfigError(
                    "--metrics-port", f"is one of the node's ports {self.port}..{self.port + 2}"
                )
        for option, value in (("--storage", self.storage), ("--cpu", self.cpu), ("--memory", self.memory)):
            if not _QUANTITY.match(value):
                raise ConfigError(
                    option, f"must be a Kubernetes quantity such as 10Gi or 500m, got {value!r}"
                )
        if self.gpus < 0:
            raise ConfigError("--gpus", f"must be >= 0, got {self.gpus}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError("--image", f"must be an image reference, got {self.image!r}")

    @property
    def bootstrap(self) -> str:
        return f"tcp://{self.name}-0.{self.name}.{self.namespace}.svc.cluster.local:{self.port}"


def render_manifests(
    net: K8sNetwork, *, template: str, roster: bytes, keys: Sequence[str]
) -> list[dict[str, Any]]:
    """The Service, ConfigMap, Secret and StatefulSet, as documents (``keys[i]``: pod i's key file text)."""
    net.check()
    if len(keys) != net.nodes:
        raise ConfigError("--nodes", f"{net.nodes} nodes but {len(keys)} keys")
    labels = {"app.kubernetes.io/name": "p2pfm", "app.kubernetes.io/instance": net.name}
    meta = {"name": net.name, "namespace": net.namespace, "labels": labels}
    ports = [("gossip", net.port), ("control", net.port + 1), ("hello", net.port + 2)]
    if net.metrics_port is not None:
        ports.append(("metrics", net.metrics_port))
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": labels,
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports],
        },
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {"template.toml": template},
        "binaryData": {"roster.signed": base64.b64encode(roster).decode("ascii")},
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {
            f"node-{i}.key": base64.b64encode(text.encode("utf-8")).decode("ascii")
            for i, text in enumerate(keys)
        },
    }
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": net.cpu, "memory": net.memory},
        "limits": {"memory": net.memory},
    }
    if net.gpus:
        resources["limits"]["nvidia.com/gpu"] = net.gpus
    pod_meta: dict[str, Any] = {"labels": labels}
    if net.metrics_port is not None:
        pod_meta["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(net.metrics_port),
        }
    container = {
        "name": "node",
        "image": net.image,
        "command": ["/bin/sh", "-c", _start_script(net)],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "HOME", "value": STATE_DIR},
        ],
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        "resources": resources,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "keys", "mountPath": KEYS_DIR, "readOnly": True},
            {"name": "state", "mountPath": STATE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    claim: dict[str, Any] = {
        "metadata": {"name": "state", "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": net.storage}}},
    }
    if net.storage_class is not None:
        claim["spec"]["storageClassName"] = net.storage_class
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "serviceName": net.name,
            "replicas": net.nodes,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": pod_meta,
                "spec": {
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": _USER,
                        "runAsGroup": _USER,
                        "fsGroup": _USER,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "terminationGracePeriodSeconds": 120,  # SIGTERM: the node finishes its round, then leaves
                    "containers": [container],
                    "volumes": [
                        {
                            "name": "config",
                            "configMap": {"name": net.name, "defaultMode": 0o444},
                        },
                        {
                            "name": "keys",
                            "secret": {"secretName": net.name, "defaultMode": 0o400},
                        },
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }
    return [service, config_map, secret, stateful_set]


def _start_script(net: K8sNetwork) -> str:
    """The container's shell command: pod ordinal -> node index, own key, node config, node."""
    p2pfm = shlex.join(net.p2pfm)
    metrics = "" if net.metrics_port is None else f" --metrics-address 0.0.0.0:{net.metrics_port}"
    fqdn = f"{net.name}.{net.namespace}.svc.cluster.local"
    return f"""set -eu
i="${{POD_NAME##*-}}"
state={STATE_DIR}
if [ -e "$state/done" ]; then
  echo "p2pfm: node $i finished earlier (rm $state/done to train again); idling"
  exec sleep 2147483647
fi
install -m 0400 "{KEYS_DIR}/node-$i.key" "$state/node.key.new"
mv -f "$state/node.key.new" "$state/node.key"
{p2pfm} launch node-config --template {CONFIG_DIR}/template.toml --output "$state/node.toml" \\
  --index "$i" --count {net.nodes} --name "{net.name}-$i" --network {shlex.quote(net.network)} \\
  --key "$state/node.key" --roster {CONFIG_DIR}/roster.signed --out-dir "$state/out"{metrics} \\
  --listen tcp://0.0.0.0:{net.port} --advertise-host "$POD_NAME.{fqdn}"
set --
if [ "$i" != 0 ]; then set -- --bootstrap {net.bootstrap}; fi
if [ -d "$state/out/checkpoint" ]; then set -- "$@" --resume; fi
{p2pfm} node --config "$state/node.toml" "$@"
touch "$state/done"
echo "p2pfm: node $i finished; its adapter is in $state/out/adapter; idling"
exec sleep 2147483647
"""


def manifests_yaml(documents: Sequence[dict[str, Any]]) -> str:
    """Multi-document YAML (``kubectl apply -f``)."""
    return str(yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False))
