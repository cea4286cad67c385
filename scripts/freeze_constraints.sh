#!/usr/bin/env bash
# Rewrite constraints.txt from a fresh virtual environment holding the newest releases that pyproject.toml
# admits (torch stays the local CPU build). Run the suite against them first:
#     TRIMIX_CONSTRAINTS=none bash scripts/test.sh
# then this script, then `bash scripts/test.sh` again, and commit constraints.txt with the summary line.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="$(mktemp -d)/venv"
"$PYTHON" -m venv "$VENV"
PYTHON="$VENV/bin/python" TRIMIX_CONSTRAINTS=none bash scripts/setup.sh
{
  echo "# The versions the test suite last passed with: scripts/setup.sh installs exactly these."
  echo "# Written by scripts/freeze_constraints.sh on $(date -u +%Y-%m-%d) (Python $("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))."
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -v -E '^(pip|setuptools|wheel)=='
} > constraints.txt
rm -rf "$(dirname "$VENV")"
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) packages)"
