#!/usr/bin/env bash
# Builds the real node's cluster network pieces from the Go module proxy, at pinned
# versions, into the control plane's cache keyed by version: CoreDNS (cluster DNS) and
# kube-router (run as the NetworkPolicy controller only). A second run on the same machine
# returns at once. Prints the folder holding each binary, one a line, in the order asked.
# Usage: build-node-network.sh [all|coredns|kube-router]   (default: all)
set -euo pipefail
PART=${1:-all}

# Each has a go.mod without replace lines, so `go install pkg@version` builds it in its own
# module. kube-router: v2.1.0 is the only version the module proxy here serves.
# Versions: versions.env, the one place for them; one set in the environment wins.
while IFS== read -r key value; do
  [ -n "${!key:-}" ] || declare "$key=$value"
done < <(grep -E '^[A-Z0-9_]+=' "$(dirname "$0")/../versions.env")
CACHE=${WHISPERX_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whisperx-operator/control-plane}
case "$PART" in
  coredns) want=(coredns) ;;
  kube-router) want=(kube-router) ;;
  all) want=(coredns kube-router) ;;
  *) echo "build-node-network: unknown part $PART (all, coredns or kube-router)" >&2; exit 2 ;;
esac

version() { case "$1" in coredns) echo "$COREDNS_VERSION" ;; kube-router) echo "$KUBE_ROUTER_VERSION" ;; esac; }
bin_dir() { echo "$CACHE/$1-$(version "$1")/bin"; }
missing() { for b in "${want[@]}"; do [ -x "$(bin_dir "$b")/$b" ] || echo "$b"; done; }
if [ -z "$(missing)" ]; then for b in "${want[@]}"; do bin_dir "$b"; done; exit 0; fi
command -v go >/dev/null || { echo "build-node-network: Go is needed (go 1.26)" >&2; exit 1; }

export CGO_ENABLED=0
build() {
  local name=$1 dir pkg ldflags="-s -w"
  dir=$(bin_dir "$name")
  case "$name" in
    coredns) pkg=github.com/coredns/coredns@"$COREDNS_VERSION" ;;
    kube-router)
      pkg=github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@"$KUBE_ROUTER_VERSION"
      # Without it the binary reports an empty version (and logs "Malformed version").
      ldflags="-X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version=$KUBE_ROUTER_VERSION $ldflags" ;;
  esac
  # Into a scratch folder first, so an interrupted build never leaves a binary that
  # counts as cached.
  rm -rf "$dir.partial"; mkdir -p "$dir.partial"
  GOBIN="$dir.partial" go install -trimpath -ldflags "$ldflags" "$pkg"
  mkdir -p "$dir"; mv "$dir.partial/$name" "$dir/$name"; rmdir "$dir.partial"
}

start=$(date +%s)
# Neither build reads a go.mod of the current folder; the Go caches are the machine's.
cd "$CACHE" 2>/dev/null || { mkdir -p "$CACHE"; cd "$CACHE"; }
# Both at once: each `go build` leaves cores idle while it downloads modules and links.
pids=()
for b in $(missing); do build "$b" & pids+=($!); done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
((failed == 0)) || { echo "build-node-network: a build failed" >&2; exit 1; }
echo "build-node-network: built in $(( $(date +%s) - start )) s" >&2
[ -z "$(missing)" ]
for b in "${want[@]}"; do bin_dir "$b"; done
