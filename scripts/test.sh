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
# Some suites hold hundreds of sockets at once (client, server and Redis ends of each
# concurrent request); a soft limit of 1024 starves them.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
pytest -q -ra "$@"
