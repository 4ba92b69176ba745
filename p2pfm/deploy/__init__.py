"""Launching an open network on an existing engine: Slurm batch scripts and Kubernetes manifests.

Pure functions that turn a node config template (docs/deploy.md) into
text: ``p2pfm.deploy.slurm`` an sbatch script, ``p2pfm.deploy.k8s`` a
multi-document YAML manifest, ``p2pfm.deploy.template`` one node's config
from the template (run on each node, at start). No torch, no sockets.
"""
