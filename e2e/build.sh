#!/usr/bin/env bash
# Build (or reuse) the pinned test-cluster binaries: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy, e2e's own
# device plugin (e2e-device-plugin) and pause (e2e-pause), kwok, helm, plus kwok's stages,
# and NVIDIA's config-manager with e2e's advertise (NVIDIA's device-plugin config parser).
#
# Everything goes through the Go module proxy into a cache outside the repo:
#   ${INFERENCEFLEET_CLUSTER_CACHE:-~/.cache/inferencefleet/cluster}/<key>/bin
# where <key> hashes e2e/versions.env, the wrapper modules' go.mod/go.sum, this
# script's recipe version and the Go toolchain version, so a bump rebuilds.
# GOCACHE and GOMODCACHE stay at Go's defaults (~/.cache/go-build, ~/go/pkg/mod).
#
#   e2e/build.sh              build if needed, print the bin dir on the last line
#   e2e/build.sh --print-dir  print the bin dir this checkout wants (no build)
#   e2e/build.sh --check      exit 0 if that bin dir is complete, 1 if not
# $GO picks the go binary (default: go on PATH, then /usr/local/go/bin/go).
set -euo pipefail

# Bump when the build recipe (flags, ldflags, outputs) changes: it is part of the key.
RECIPE=5

e2e="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=versions.env
source "$e2e/versions.env"
BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy
          e2e-device-plugin e2e-pause kwok helm config-manager advertise)

log() { printf '[cluster-build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[cluster-build] ERROR: %s\n' "$*" >&2; exit 1; }

find_go() {  # $GO if set, else go on PATH, else Go's default install location
  if [[ -n "${GO:-}" ]]; then [[ -x "$GO" ]] && echo "$GO"
  elif command -v go >/dev/null 2>&1; then command -v go
  elif [[ -x /usr/local/go/bin/go ]]; then echo /usr/local/go/bin/go
  else return 1; fi
}
wanted_go="${GO:-}"
GO="$(find_go)" || die "Go toolchain not found (${wanted_go:+GO=$wanted_go is not executable; }need go >= ${GO_MIN_VERSION} on PATH or at /usr/local/go/bin/go); install it from https://go.dev/dl/"
go_version="$("$GO" env GOVERSION)" || die "'$GO env GOVERSION' failed"

version_ge() {  # version_ge 1.26.8 1.26
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}
version_ge "${go_version#go}" "$GO_MIN_VERSION" \
  || die "$GO is ${go_version}; Kubernetes ${KUBERNETES_VERSION} needs go >= ${GO_MIN_VERSION}"

cache_root="${INFERENCEFLEET_CLUSTER_CACHE:-$HOME/.cache/inferencefleet/cluster}"
key="$( { echo "recipe=$RECIPE go=$go_version"; cat "$e2e/versions.env" \
          "$e2e"/go/{k8s,kwok,helm,nvidia}/go.{mod,sum} "$e2e"/go/k8s/*/*.go \
          "$e2e"/go/nvidia/cmd/advertise/*.go; } | sha256sum | cut -c1-16)"
dir="$cache_root/$key"
bin="$dir/bin"

complete() {
  [[ -f "$bin/.complete" ]] || return 1
  local b; for b in "${BINARIES[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
  [[ -d "$dir/stages" ]]
}

case "${1:-}" in
  --print-dir) echo "$dir"; exit 0 ;;
  --check) complete; exit $? ;;
  "") ;;
  *) die "unknown argument '$1' (use --print-dir or --check)" ;;
esac

if complete; then
  log "reusing $bin (kubernetes ${KUBERNETES_VERSION}, etcd ${ETCD_VERSION}, kwok ${KWOK_VERSION}, helm ${HELM_VERSION}, nvidia device plugin ${NVIDIA_DEVICE_PLUGIN_VERSION})"
  echo "$dir"; exit 0
fi

# Sanity: the wrapper must have been generated for the pinned versions.
grep -Eq "k8s.io/kubernetes ${KUBERNETES_VERSION}( // indirect)?$" "$e2e/go/k8s/go.mod" \
  || die "e2e/go/k8s/go.mod does not require k8s.io/kubernetes ${KUBERNETES_VERSION}; run e2e/go/update.sh"
grep -Eq "go.etcd.io/etcd/server/v3 ${ETCD_VERSION}( // indirect)?$" "$e2e/go/k8s/go.mod" \
  || die "e2e/go/k8s/go.mod does not require etcd server ${ETCD_VERSION}; run e2e/go/update.sh"
grep -Eq "sigs.k8s.io/kwok ${KWOK_VERSION}( // indirect)?$" "$e2e/go/kwok/go.mod" \
  || die "e2e/go/kwok/go.mod does not require kwok ${KWOK_VERSION}; run e2e/go/update.sh"
grep -Eq "helm.sh/helm/v3 ${HELM_VERSION}( // indirect)?$" "$e2e/go/helm/go.mod" \
  || die "e2e/go/helm/go.mod does not require helm ${HELM_VERSION}; run e2e/go/update.sh"
grep -Eq "github.com/NVIDIA/k8s-device-plugin ${NVIDIA_DEVICE_PLUGIN_VERSION}( // indirect)?$" "$e2e/go/nvidia/go.mod" \
  || die "e2e/go/nvidia/go.mod does not require k8s-device-plugin ${NVIDIA_DEVICE_PLUGIN_VERSION}; run e2e/go/update.sh"

mkdir -p "$dir"
# One build per key at a time (two test sessions may start together): wait, then reuse.
exec 9>"$dir/.lock"
if ! flock -n 9; then
  log "another build into $dir is running; waiting for it to finish"
  flock 9
  if complete; then
    log "reusing $bin, built meanwhile"
    echo "$dir"; exit 0
  fi
fi
rm -rf "$dir"/bin.tmp.*
tmp="$(mktemp -d "$dir/bin.tmp.XXXXXX")"
buildlog="$dir/build.log"
: > "$buildlog"
trap 'rm -rf "$tmp"' EXIT
export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
start_all=$SECONDS
log "cold build into $bin with $go_version on $(nproc) CPUs (log: $buildlog)"

# go_build <label> <module dir> <go build args...>: runs `go build -v`, prints a
# heartbeat every 30 s with the number of packages compiled, and on failure the log tail.
go_build() {
  local label="$1" moddir="$2"; shift 2
  local t0=$SECONDS pid rc n
  log "building $label ..."
  ( cd "$moddir" && exec "$GO" build -v "$@" ) >>"$buildlog" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      n="$(grep -c '^[a-zA-Z0-9]' "$buildlog" || true)"
      log "  ... $label: $((SECONDS - t0)) s, ~$n packages compiled so far"
    fi
  done
  rc=0; wait "$pid" || rc=$?
  if (( rc != 0 )); then
    tail -n 40 "$buildlog" >&2
    die "building $label failed (go build exit $rc); full log: $buildlog"
  fi
  log "built $label in $((SECONDS - t0)) s"
}

# --- Kubernetes control plane, node, kubectl, etcd and e2e's device plugin (one go build:
# shared packages compile once)
k8s_major=1
k8s_minor_num="$(echo "$KUBERNETES_VERSION" | cut -d. -f2)"
# buildDate: the release's publication time from the module proxy (reproducible).
info_file="$(cd "$e2e/go/k8s" && "$GO" mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" \
  | sed -n 's/^[[:space:]]*"Info": "\(.*\)",$/\1/p')"
build_date="$(sed -n 's/.*"Time":"\([^"]*\)".*/\1/p' "$info_file" 2>/dev/null || true)"
[[ -n "$build_date" ]] || die "no publication time for k8s.io/kubernetes@${KUBERNETES_VERSION} in '$info_file'"
kver=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kver+=" -X $p.gitVersion=${KUBERNETES_VERSION} -X $p.gitMajor=${k8s_major}"
  kver+=" -X $p.gitMinor=${k8s_minor_num} -X $p.gitCommit=unknown"
  kver+=" -X $p.gitTreeState=clean -X $p.buildDate=${build_date}"
done
go_build "kubernetes ${KUBERNETES_VERSION} + etcd ${ETCD_VERSION}" "$e2e/go/k8s" \
  -trimpath -ldflags "-s -w${kver} -X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}" \
  -o "$tmp/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy \
  go.etcd.io/etcd/server/v3 ./deviceplugin ./pause
# go names the binary of go.etcd.io/etcd/server/v3 "server".
mv "$tmp/server" "$tmp/etcd"
mv "$tmp/deviceplugin" "$tmp/e2e-device-plugin"
mv "$tmp/pause" "$tmp/e2e-pause"

# --- kwok
go_build "kwok ${KWOK_VERSION}" "$e2e/go/kwok" \
  -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" \
  -o "$tmp/" sigs.k8s.io/kwok/cmd/kwok

# --- helm (ldflags as helm's Makefile sets them)
helm_cg="$(sed -n 's#^[[:space:]]*k8s.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$e2e/go/helm/go.mod" | head -n1)"
hv="helm.sh/helm/v3"
go_build "helm ${HELM_VERSION}" "$e2e/go/helm" \
  -trimpath -ldflags "-s -w -X $hv/internal/version.version=${HELM_VERSION} \
 -X $hv/internal/version.gitTreeState=clean \
 -X $hv/pkg/lint/rules.k8sVersionMajor=1 -X $hv/pkg/lint/rules.k8sVersionMinor=${helm_cg} \
 -X $hv/pkg/chartutil.k8sVersionMajor=1 -X $hv/pkg/chartutil.k8sVersionMinor=${helm_cg}" \
  -o "$tmp/" helm.sh/helm/v3/cmd/helm

# --- NVIDIA's config-manager and e2e's advertise (NVIDIA's config parser), one module
go_build "nvidia device plugin ${NVIDIA_DEVICE_PLUGIN_VERSION}" "$e2e/go/nvidia" \
  -trimpath -ldflags "-s -w" -o "$tmp/" \
  github.com/NVIDIA/k8s-device-plugin/cmd/config-manager ./cmd/advertise

# --- kwok stages, from the kwok module's kustomize/stage folder
kwok_dir="$(cd "$e2e/go/kwok" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
[[ -d "$kwok_dir/kustomize/stage" ]] || die "kwok module has no kustomize/stage folder ($kwok_dir)"
rm -rf "$dir/stages"; mkdir -p "$dir/stages.tmp"
for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
         pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  [[ -f "$kwok_dir/kustomize/stage/$f" ]] || die "kwok stage $f missing in $kwok_dir"
  cp "$kwok_dir/kustomize/stage/$f" "$dir/stages.tmp/"
done
chmod -R u+w "$dir/stages.tmp"

# --- check every binary runs and reports the pinned version
"$tmp/kube-apiserver" --version | grep -qx "Kubernetes ${KUBERNETES_VERSION}" \
  || die "kube-apiserver --version says '$("$tmp/kube-apiserver" --version)', expected ${KUBERNETES_VERSION}"
for b in kubelet kube-proxy; do
  "$tmp/$b" --version | grep -qx "Kubernetes ${KUBERNETES_VERSION}" \
    || die "$b --version says '$("$tmp/$b" --version)', expected ${KUBERNETES_VERSION}"
done
"$tmp/kubectl" version --client -o yaml | grep -q "gitVersion: ${KUBERNETES_VERSION}" \
  || die "kubectl does not report ${KUBERNETES_VERSION}"
# (Output captured first: grep -q exiting early would SIGPIPE the writer under pipefail.)
etcd_version="$("$tmp/etcd" --version)"
grep -q "etcd Version: ${ETCD_VERSION#v}" <<<"$etcd_version" \
  || die "etcd --version does not report ${ETCD_VERSION}: $etcd_version"
"$tmp/helm" version --short | grep -q "^${HELM_VERSION}" || die "helm version does not report ${HELM_VERSION}"
"$tmp/kwok" --version >/dev/null 2>&1 || die "kwok --version failed"
"$tmp/config-manager" --help >/dev/null 2>&1 || die "config-manager --help failed"
"$tmp/advertise" --config-file /dev/null | grep -q '"replicas":1' \
  || die "advertise does not read an empty config as unshared"

rm -rf "$bin"; mv "$tmp" "$bin"; mv "$dir/stages.tmp" "$dir/stages"
{ echo "kubernetes=${KUBERNETES_VERSION} etcd=${ETCD_VERSION} kwok=${KWOK_VERSION} helm=${HELM_VERSION} nvidia=${NVIDIA_DEVICE_PLUGIN_VERSION} go=${go_version}"
  echo "built=$(date -u +%FT%TZ) seconds=$((SECONDS - start_all))"; } > "$bin/.complete"
trap - EXIT
log "done in $((SECONDS - start_all)) s: $bin"
echo "$dir"
