#!/usr/bin/env bash
# Builds the real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler), Kueue's controller and a node's kubelet and kube-proxy from the Go
# module proxy, at pinned versions, into a cache keyed by version. A second run on the
# same machine returns at once.
# Prints the folder holding the binaries on its last line.
# Usage: build-control-plane.sh [all|k8s|kueue|node]   (default: all)
set -euo pipefail
PART=${1:-all}

# Kueue's release builds against one Kubernetes minor (v0.17: the v0.35 libraries), and
# the control plane is built at that minor's newest patch release, in one Go module with
# Kueue: the k8s.io libraries both use then compile once, not twice.
# Versions: versions.env, the one place for them; one set in the environment wins.
while IFS== read -r key value; do
  [ -n "${!key:-}" ] || declare "$key=$value"
done < <(grep -E '^[A-Z0-9_]+=' "$(dirname "$0")/../versions.env")
CACHE=${WHISPERX_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whisperx-operator/control-plane}
BIN="$CACHE/k8s-$K8S_VERSION-kueue-$KUEUE_VERSION/bin"
case "$PART" in
  k8s) want=(etcd kube-apiserver kube-controller-manager kube-scheduler) ;;
  kueue) want=(kueue) ;;
  node) want=(kubelet kube-proxy) ;;
  all) want=(etcd kube-apiserver kube-controller-manager kube-scheduler kueue kubelet kube-proxy) ;;
  *) echo "build-control-plane: unknown part $PART (all, k8s, kueue or node)" >&2; exit 2 ;;
esac

missing() { for b in "${want[@]}"; do [ -x "$BIN/$b" ] || echo "$b"; done; }
with_kueue() { [[ " ${want[*]} " == *" kueue "* ]]; }
# Kueue's CRDs are copied beside its binary once it is built.
kueue_crds_missing() { with_kueue && [ ! -d "$BIN/../kueue-crds" ]; }
if [ -z "$(missing)" ] && ! kueue_crds_missing; then echo "$BIN"; exit 0; fi
command -v go >/dev/null || { echo "build-control-plane: Go is needed (go 1.26)" >&2; exit 1; }

mkdir -p "$BIN"
export GOFLAGS=-mod=mod CGO_ENABLED=0
ldflags() {
  local pkg minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s ' \
      "$pkg" "$K8S_VERSION" "$pkg" "$pkg" "$minor"
  done
  printf -- '-s -w'
}

start=$(date +%s)
mod="$CACHE/build-k8s-$K8S_VERSION-kueue-$KUEUE_VERSION"
mkdir -p "$mod"; cd "$mod"
[ -f go.mod ] || go mod init whisperx-control-plane >/dev/null 2>&1
go mod edit -require=k8s.io/kubernetes@"$K8S_VERSION" -require=sigs.k8s.io/kueue@"$KUEUE_VERSION"
# k8s.io/kubernetes requires its staging modules at v0.0.0 with replace lines that only
# resolve inside its own tree: replace each with the published v0.<minor>.<patch>.
gomod=$(go mod download -json k8s.io/kubernetes@"$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
grep -oE '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" | awk '{print $1}' | while read -r m; do
  go mod edit -replace="$m=$m@v0.${K8S_VERSION#v1.}"
done
# etcd's server ships as a package; a two-line main runs it, at the version the API
# server itself was released with.
mkdir -p etcd
printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' > etcd/main.go
cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "sigs.k8s.io/kueue/cmd/kueue"
)
GO
go mod tidy >/dev/null 2>&1 || go mod tidy
# One `go build` for every binary still missing: their packages compile once, and one
# binary links while the next one's packages compile.
targets=()
for b in $(missing); do
  case "$b" in
    etcd) targets+=(./etcd) ;;
    kueue) targets+=(sigs.k8s.io/kueue/cmd/kueue) ;;
    *) targets+=(k8s.io/kubernetes/cmd/"$b") ;;
  esac
done
((${#targets[@]} == 0)) || go build -trimpath -ldflags "$(ldflags)" -o "$BIN/" "${targets[@]}"
if with_kueue; then
  # Kueue's CRDs ship in its module; keep them beside the binary.
  dir=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  rm -rf "$BIN/../kueue-crds"; mkdir -p "$BIN/../kueue-crds"
  cp "$dir"/config/components/crd/bases/*.yaml "$BIN/../kueue-crds/"
fi
echo "build-control-plane: built in $(( $(date +%s) - start )) s" >&2
[ -z "$(missing)" ]
echo "$BIN"
