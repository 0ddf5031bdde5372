#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every check: CRD drift, ruff, mypy, the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
whisperx-crd --check
ruff check .
ruff format --check .
mypy
pytest -q -ra "$@"
