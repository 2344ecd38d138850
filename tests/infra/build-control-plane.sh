#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kube-scheduler from the Go module proxy
# into the tools
# cache, once; later runs find the binaries at the wanted version and return at once.
#
# None of them ships in a package registry reachable here, so each is built from a tiny wrapper
# module in $EVENTROUTER_TOOLS/src:
# - etcd: the server module's root package is the `etcd` binary, and its go.mod has no replace
#   directives, so a wrapper that requires it can build it directly.
# - kubernetes: k8s.io/kubernetes points its staging modules (k8s.io/api, k8s.io/apiserver, ...)
#   at ./staging with `replace` directives, which `go install pkg@version` refuses. The wrapper
#   carries one replace per staging module, pointed at the published v0.<minor>.<patch> version.
#   The commands share that module and Go's build cache, so each build after the first is
#   incremental (kube-scheduler: a few minutes after the other two).
source "$(dirname "$0")/common.sh"

command -v go >/dev/null || die "go is required to build etcd and kube-apiserver (Go >= 1.25 on PATH)"

bin="$EVENTROUTER_TOOLS/bin"
work="$EVENTROUTER_TOOLS/src"
mkdir -p "$work"

# Two test runs at once must not build into the same files.
exec 9>"$work/.build.lock"
flock 9

have_version() { # BINARY VERSION
  # Capture first: `cmd | grep -q` fails under pipefail when grep quits early (SIGPIPE).
  local version
  [[ -x "$bin/$1" ]] && version="$("$bin/$1" --version 2>/dev/null)" && [[ "$version" == *"$2"* ]]
}

build_etcd() {
  have_version etcd "${ETCD_VERSION#v}" && return
  log "building etcd $ETCD_VERSION from the Go module proxy (first run only)"
  local dir="$work/etcd-$ETCD_VERSION"
  rm -rf "$dir"
  mkdir -p "$dir"
  (
    cd "$dir"
    go mod init eventrouter.test/etcd >/dev/null 2>&1
    go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
    go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3
  ) || die "building etcd $ETCD_VERSION failed"
  mv "$bin/etcd.tmp" "$bin/etcd"
}

# Writes the kubernetes wrapper module for $KUBE_VERSION into $1.
write_kube_module() {
  local dir="$1"
  local staging="v0.${KUBE_VERSION#v1.}"
  mkdir -p "$dir"
  local modfile
  modfile="$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" |
    sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [[ -f "$modfile" ]] || die "could not download k8s.io/kubernetes@$KUBE_VERSION's go.mod"
  {
    echo "module eventrouter.test/kubernetes"
    echo
    echo "go 1.25"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    grep -E '^\s+k8s\.io/[a-z0-9-]+ => \./staging/' "$modfile" |
      awk -v v="$staging" '{ printf "replace %s => %s %s\n", $1, $1, v }'
  } >"$dir/go.mod"
  # The imports keep `go mod tidy` from dropping what the commands need.
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
)
GO
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy) || die "resolving k8s.io/kubernetes@$KUBE_VERSION's dependencies failed"
}

build_kube() { # COMMAND...
  local missing=()
  for cmd in "$@"; do
    have_version "$cmd" "$KUBE_VERSION" || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  log "building ${missing[*]} $KUBE_VERSION from the Go module proxy (first run only; tens of minutes on 2 cores)"
  local dir="$work/kubernetes-$KUBE_VERSION"
  # A module written before a command was added lacks its imports: write it again.
  grep -q kube-scheduler "$dir/tools.go" 2>/dev/null || write_kube_module "$dir"
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  for cmd in "${missing[@]}"; do
    log "go build k8s.io/kubernetes/cmd/$cmd"
    (cd "$dir" && GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd") ||
      die "building $cmd $KUBE_VERSION failed"
    mv "$bin/$cmd.tmp" "$bin/$cmd"
  done
}

build_etcd
build_kube kube-apiserver kube-controller-manager kube-scheduler
log "control plane binaries ready: etcd $("$bin/etcd" --version | sed -n 's/^etcd Version: //p'), $("$bin/kube-apiserver" --version), $("$bin/kube-controller-manager" --version | sed 's/^Kubernetes //') (controller-manager), $("$bin/kube-scheduler" --version | sed 's/^Kubernetes //') (scheduler)"
