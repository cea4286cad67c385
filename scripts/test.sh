#!/usr/bin/env bash
# The tests from a fresh clone (what CI runs): set up, lint, then the offline suite on tiny models.
# Extra arguments go to pytest (e.g. -m slow for the real Gemma 3 270M).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check src tests bench
exec python -m pytest -q "$@"
