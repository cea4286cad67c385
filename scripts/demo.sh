#!/usr/bin/env bash
# The main job from a fresh clone: set up (CPU torch, trimix, the embedded Gemma 3 270M), then run
# `trimix demo` (CPT, weight selection, evaluation, report). Extra arguments go to `trimix demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec trimix demo "$@"
