#!/usr/bin/env bash
# Builds the real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) and Kueue's controller from the Go module proxy, at pinned versions,
# into a cache keyed by version. A second run on the same machine returns at once.
# Prints the folder holding the binaries on its last line.
# Usage: build-control-plane.sh [all|k8s|kueue]   (default: all)
set -euo pipefail
PART=${1:-all}

K8S_VERSION=${K8S_VERSION:-v1.37.2}
KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}
CACHE=${WHISPERX_CONTROL_PLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/whisperx-operator/control-plane}
BIN="$CACHE/k8s-$K8S_VERSION-kueue-$KUEUE_VERSION/bin"
case "$PART" in
  k8s) want=(etcd kube-apiserver kube-controller-manager kube-scheduler) ;;
  kueue) want=(kueue) ;;
  all) want=(etcd kube-apiserver kube-controller-manager kube-scheduler kueue) ;;
  *) echo "build-control-plane: unknown part $PART (all, k8s or kueue)" >&2; exit 2 ;;
esac

have_all() { for b in "${want[@]}"; do [ -x "$BIN/$b" ] || return 1; done; }
# Kueue's CRDs are copied beside its binary once it is built.
[ "$PART" = k8s ] || want+=(../kueue-crds)
if have_all; then echo "$BIN"; exit 0; fi
command -v go >/dev/null || { echo "build-control-plane: Go is needed (go 1.26)" >&2; exit 1; }

mkdir -p "$BIN"
export GOFLAGS=-mod=mod CGO_ENABLED=0
ldflags_k8s() {
  local pkg minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s ' \
      "$pkg" "$K8S_VERSION" "$pkg" "$pkg" "$minor"
  done
  printf -- '-s -w'
}

# k8s.io/kubernetes requires its staging modules at v0.0.0 with replace lines that only
# resolve inside its own tree: replace each with the published v0.<minor>.<patch>.
build_k8s() {
  local mod="$CACHE/build-k8s-$K8S_VERSION" staging=v0.${K8S_VERSION#v1.}
  mkdir -p "$mod"; cd "$mod"
  [ -f go.mod ] || go mod init whisperx-control-plane >/dev/null 2>&1
  go mod edit -require=k8s.io/kubernetes@"$K8S_VERSION"
  local gomod; gomod=$(go mod download -json k8s.io/kubernetes@"$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  grep -oE '^\s+k8s\.io/[a-z0-9-]+ v0\.0\.0$' "$gomod" | awk '{print $1}' | while read -r m; do
    go mod edit -replace="$m=$m@$staging"
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
)
GO
  go mod tidy >/dev/null 2>&1 || go mod tidy
  local ld; ld=$(ldflags_k8s)
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    [ -x "$BIN/$c" ] || go build -trimpath -ldflags "$ld" -o "$BIN/$c" k8s.io/kubernetes/cmd/$c
  done
  [ -x "$BIN/etcd" ] || go build -trimpath -ldflags '-s -w' -o "$BIN/etcd" ./etcd
}

build_kueue() {
  local mod="$CACHE/build-kueue-$KUEUE_VERSION"
  mkdir -p "$mod"; cd "$mod"
  [ -f go.mod ] || go mod init whisperx-kueue >/dev/null 2>&1
  go mod edit -require=sigs.k8s.io/kueue@"$KUEUE_VERSION"
  printf '//go:build tools\n\npackage tools\n\nimport _ "sigs.k8s.io/kueue/cmd/kueue"\n' > tools.go
  go mod tidy >/dev/null 2>&1 || go mod tidy
  [ -x "$BIN/kueue" ] || go build -trimpath -ldflags '-s -w' -o "$BIN/kueue" sigs.k8s.io/kueue/cmd/kueue
  # Kueue's CRDs ship in the module; keep them beside the binary.
  local dir; dir=$(go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  rm -rf "$BIN/../kueue-crds"; mkdir -p "$BIN/../kueue-crds"
  cp "$dir"/config/components/crd/bases/*.yaml "$BIN/../kueue-crds/"
}

start=$(date +%s)
[ "$PART" = kueue ] || ( build_k8s )
[ "$PART" = k8s ] || ( build_kueue )
echo "build-control-plane: built in $(( $(date +%s) - start )) s" >&2
have_all
echo "$BIN"
