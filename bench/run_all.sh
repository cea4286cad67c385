#!/usr/bin/env bash
# Every benchmark behind BENCHMARKS.md, in the order it reports them. Outputs go to bench/out/ (ignored).
# Usage: bash bench/run_all.sh [tiny|gemma|all]   (gemma: ~2 h on 2 CPU cores; it trains the demo's adapters
# first if `trimix demo` has not). The GPU script is separate: python bench/gpu_decode.py --help
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
  run speculative.py --model tiny --new-tokens 16 --selection none
  run serve_load.py --model tiny --scenarios 1:10 4:20 16:64
  run ray_scaling.py --model tiny
  run selection_study.py --model tiny --test-items 40
  if [[ -f ../.reference/TriMix/dexperts.py ]]; then  # the authors' implementation, if fetched
    run reference_compare.py --shapes tiny --check-tokens --batch-sizes 1 4 8 --new-tokens 32 --repeats 2 --engines eager static
    run reference_compare.py --shapes tiny --check-tokens --batch-sizes 1 8 --new-tokens 32 --search --padded-rows 0
    run reference_compare.py --shapes mini --check-tokens --batch-sizes 1 4 --new-tokens 32 --search --search-texts 8 --search-tokens 48
  fi
fi
if [[ "$which" == gemma || "$which" == all ]]; then
  run decode_throughput.py --model gemma --batch-sizes 1 8 32 --new-tokens 32 --repeats 3
  run naive_baseline.py --model gemma --new-tokens 64 --batch-size 1
  run search_cost.py --model gemma --n-prompts 4 --shots 2
  run search_cost.py --model gemma --n-prompts 4 --shots 2 --chunk-mb 256
  run shared_prefix.py --model gemma --shots 2
  run step_breakdown.py --model gemma --batch-size 8 --new-tokens 24
  run speculative.py --model gemma --selection "${DEMO_DIR:-../runs/demo}/selections/sib200_topic_uig_Arab.json"
  run speculative.py --model gemma --selection none --k 8 auto --new-tokens 64
  run serve_load.py --model gemma
  run ray_scaling.py --model gemma --items 50 --cells 1 3 --repeats 1
  run selection_study.py --model gemma
fi
