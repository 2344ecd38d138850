#!/usr/bin/env bash
# Builds etcd and kube-apiserver from the Go module proxy into the tools cache (once).
#
# Neither ships in a package registry reachable here, so each is built from a tiny wrapper module:
# etcd's server module builds as is; kubernetes needs one `replace` per staging module (the same
# list as the `replace` block of its own go.mod, pointed at the published v0.x versions), which is
# why `go install pkg@version` cannot build it.
source "$(dirname "$0")/common.sh"

command -v go >/dev/null || die "go is required to build etcd and kube-apiserver (apt-get install golang-go, or Go >= 1.24)"

bin="$EVENTROUTER_TOOLS/bin"
work="$EVENTROUTER_TOOLS/src"
mkdir -p "$work"

build_etcd() {
  if [[ -x "$bin/etcd" ]] && "$bin/etcd" --version 2>/dev/null | grep -q "${ETCD_VERSION#v}"; then
    return
  fi
  log "building etcd $ETCD_VERSION (first run only)"
  local dir="$work/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  cat >"$dir/go.mod" <<GOMOD
module eventrouter.test/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$dir" && go mod tidy >/dev/null 2>&1 || true
   cd "$dir" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && \
     go build -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3/etcdmain/... 2>/dev/null || true)
  if [[ ! -x "$bin/etcd.tmp" ]]; then
    # etcdmain is a library; the binary's main package is the module root.
    (cd "$dir" && go build -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3)
  fi
  mv "$bin/etcd.tmp" "$bin/etcd"
}

build_kube() {
  local want=("$@")
  local missing=()
  for cmd in "${want[@]}"; do
    if ! [[ -x "$bin/$cmd" ]] || ! "$bin/$cmd" --version 2>/dev/null | grep -q "$KUBE_VERSION"; then
      missing+=("$cmd")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  log "building ${missing[*]} $KUBE_VERSION from the Go module proxy (first run only; minutes on 2 cores)"
  local dir="$work/kubernetes-$KUBE_VERSION"
  local staging="v0.${KUBE_VERSION#v1.}"
  mkdir -p "$dir"
  local modfile
  modfile="$(cd "$dir" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
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
  cat >"$dir/tools.go" <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"
GO
  local minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  (cd "$dir" && GOFLAGS=-mod=mod go mod tidy)
  for cmd in "${missing[@]}"; do
    (cd "$dir" && GOFLAGS=-mod=mod go build -ldflags "$ldflags" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
    mv "$bin/$cmd.tmp" "$bin/$cmd"
  done
}

build_etcd
build_kube kube-apiserver
log "control plane binaries ready: $("$bin/etcd" --version | head -1); $("$bin/kube-apiserver" --version)"
