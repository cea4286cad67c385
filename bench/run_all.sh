#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, in the order it reports them. Outputs go to bench/out/ (ignored).
# Usage: bash bench/run_all.sh [tiny|gemma|all]   (gemma: ~30 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p out
which="${1:-all}"
run() { echo "+ python $*" >&2; python "$@" | tee "out/$(echo "$*" | tr ' /' '__' | cut -c1-80).txt"; }
if [[ "$which" == tiny || "$which" == all ]]; then
  run decode_throughput.py --model tiny --batch-sizes 1 8 32 --new-tokens 64
  run naive_baseline.py --model tiny --new-tokens 64 256 --batch-size 8
  run search_cost.py --model tiny
  run log_partition.py
  run shared_prefix.py --model tiny
  run step_breakdown.py --model tiny --batch-size 8
fi
if [[ "$which" == gemma || "$which" == all ]]; then
  run decode_throughput.py --model gemma --batch-sizes 1 8 32 --new-tokens 32 --repeats 3
  run naive_baseline.py --model gemma --new-tokens 64 --batch-size 1
  run search_cost.py --model gemma --n-prompts 4 --shots 2
  run search_cost.py --model gemma --n-prompts 4 --shots 2 --chunk-mb 256
  run shared_prefix.py --model gemma --shots 2
  run step_breakdown.py --model gemma --batch-size 8 --new-tokens 24
fi
