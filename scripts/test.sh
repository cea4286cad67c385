#!/usr/bin/env bash
# The tests from a fresh clone (what CI runs): set up, lint, then the offline suite on tiny models.
# Extra arguments go to pytest (e.g. -m slow for the real Gemma 3 270M).
# TRIMIX_CONSTRAINTS=none runs the suite against the newest releases instead of constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRIMIX_CONSTRAINTS="${TRIMIX_CONSTRAINTS:-constraints.txt}"
bash scripts/setup.sh
ruff check src tests bench
# -rs lists every skipped test with its reason (only CUDA and Chromium tests may skip).
exec python -m pytest -q -rs --durations=10 "$@"
