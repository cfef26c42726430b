#!/usr/bin/env bash
# Builds the real servers that kopa's tests and demo run (OPA, etcd, kube-apiserver, kubectl, helm) from Go
# modules, because this project may not download prebuilt binaries. Each binary is cached outside the
# repository under a directory named by its version, so a build happens once per version and machine.
#
# Usage: scripts/build-servers.sh [opa|kube|helm|kube-score|kube-mgmt ...]   (default: opa kube; helm and
#        kube-score are built on request, for the Helm chart's tests; kube-mgmt on request, for the
#        side-by-side benchmarks)
# Env:   KOPA_TOOLS_DIR   where binaries go (default: ~/.cache/kopa/tools)
#        KOPA_PEERS_DIR   where kube-mgmt's source snapshot and its build script are (default: ../shared/peers
#                         beside the repository); kube-mgmt is skipped, with a note, when they are not there
#
# Prints progress and one line per binary with its path. Measured cold on 2 cores: OPA about 2 minutes,
# kube-apiserver + kubectl + etcd about 6 minutes, helm about 2 minutes.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

tools_dir=${KOPA_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kopa/tools}
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local
ldflags_strip='-s -w'
started=$SECONDS

say() { printf '[build-servers %4ds] %s\n' "$((SECONDS - started))" "$*"; }

# Runs a `go build -v` / `go install -v` and turns its one-line-per-package output into a progress count.
go_with_progress() {
  local what=$1; shift
  local n=0
  # shellcheck disable=SC2034
  while IFS= read -r _line; do
    n=$((n + 1))
    if ((n % 200 == 0)); then say "  $what: $n packages compiled"; fi
  done < <("$@" 2>&1 | tee "$log" | grep -v '^go: ' || true)
  # The pipeline above swallows go's exit code; a missing output binary is the failure signal.
  return 0
}

# Installs the binary atomically: build into a temp dir, then move into place.
finish() { # finish <tmpdir> <destdir> <names...>
  local tmp=$1 dest=$2; shift 2
  for name in "$@"; do
    if [[ ! -x "$tmp/$name" ]]; then
      say "FAILED to build $name; the last lines of the build log ($log):"
      tail -n 30 "$log" >&2
      exit 1
    fi
  done
  mkdir -p "$dest"
  for name in "$@"; do mv -f "$tmp/$name" "$dest/$name"; done
}

build_opa() {
  local dest=$tools_dir/opa-$OPA_VERSION
  if [[ -x $dest/opa ]]; then say "opa $OPA_VERSION: cached at $dest/opa"; return; fi
  say "opa $OPA_VERSION: building (about 2 minutes when cold)"
  local tmp; tmp=$(mktemp -d); log=$tmp/build.log
  GOBIN=$tmp go_with_progress opa go install -v -trimpath -ldflags="$ldflags_strip" \
    "github.com/open-policy-agent/opa@$OPA_VERSION"
  finish "$tmp" "$dest" opa
  rm -rf "$tmp"
  say "opa $OPA_VERSION: built $dest/opa"
}

# kube-apiserver, kubectl and etcd come from one wrapper module: k8s.io/kubernetes replaces its staging
# modules with local paths, so `go install` cannot build it; the wrapper replaces each with its published
# tag instead. etcd's server module is already in that module graph (at ETCD_VERSION), so building it here
# reuses the compiled gRPC, protobuf and etcd client packages.
build_kube() {
  local dest=$tools_dir/kubernetes-$KUBERNETES_VERSION
  local etcd_dest=$tools_dir/etcd-$ETCD_VERSION
  if [[ -x $dest/kube-apiserver && -x $dest/kubectl && -x $etcd_dest/etcd ]]; then
    say "kube-apiserver, kubectl $KUBERNETES_VERSION: cached in $dest"
    say "etcd $ETCD_VERSION: cached at $etcd_dest/etcd"
    return
  fi
  say "kube-apiserver, kubectl $KUBERNETES_VERSION and etcd $ETCD_VERSION: building (about 6 minutes when cold)"
  local mod=$tools_dir/src/kubernetes-$KUBERNETES_VERSION
  mkdir -p "$mod"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  {
    echo "module kopa.test/kubernetes-build"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    echo "replace ("
    # Every `k8s.io/<name> => ./staging/...` line of the tagged go.mod becomes a replace with the tag.
    sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\t\1 => \1 '"$KUBERNETES_STAGING_VERSION"'#p' "$gomod"
    echo ")"
  } >"$mod/go.mod"
  if ! grep -q "go.etcd.io/etcd/server/v3 $ETCD_VERSION" "$gomod"; then
    say "warning: k8s.io/kubernetes $KUBERNETES_VERSION does not pin etcd server $ETCD_VERSION; check versions.env"
  fi
  local tmp; tmp=$(mktemp -d); log=$tmp/build.log
  local vpkg=k8s.io/component-base/version
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="$ldflags_strip -X $vpkg.gitVersion=$KUBERNETES_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor"
  ldflags+=" -X $vpkg.gitTreeState=clean -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  (
    cd "$mod"
    go mod download k8s.io/kubernetes
    # -mod=mod lets go record the go.sum entries of exactly the packages these three commands need.
    go_with_progress kubernetes go build -mod=mod -v -trimpath -pgo=off -ldflags="$ldflags" -o "$tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl go.etcd.io/etcd/server/v3
  )
  # go names a binary after the path element before a major-version suffix: .../server/v3 -> server
  if [[ -x $tmp/server ]]; then mv "$tmp/server" "$tmp/etcd"; fi
  finish "$tmp" "$dest" kube-apiserver kubectl
  finish "$tmp" "$etcd_dest" etcd
  rm -rf "$tmp"
  say "kube-apiserver $KUBERNETES_VERSION: built $dest/kube-apiserver"
  say "kubectl $KUBERNETES_VERSION: built $dest/kubectl"
  say "etcd $ETCD_VERSION: built $etcd_dest/etcd"
}

build_helm() {
  local dest=$tools_dir/helm-$HELM_VERSION
  if [[ -x $dest/helm ]]; then say "helm $HELM_VERSION: cached at $dest/helm"; return; fi
  say "helm $HELM_VERSION: building (about 2 minutes when cold)"
  local tmp; tmp=$(mktemp -d); log=$tmp/build.log
  GOBIN=$tmp go_with_progress helm go install -v -trimpath \
    -ldflags="$ldflags_strip -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  finish "$tmp" "$dest" helm
  rm -rf "$tmp"
  say "helm $HELM_VERSION: built $dest/helm"
}

# kube-score lints the chart's rendered manifests (tests/integration/test_chart_lint.py).
build_kube_score() {
  local dest=$tools_dir/kube-score-$KUBE_SCORE_VERSION
  if [[ -x $dest/kube-score ]]; then say "kube-score $KUBE_SCORE_VERSION: cached at $dest/kube-score"; return; fi
  say "kube-score $KUBE_SCORE_VERSION: building (about a minute when cold)"
  local tmp; tmp=$(mktemp -d); log=$tmp/build.log
  GOBIN=$tmp go_with_progress kube-score go install -v -trimpath -ldflags="$ldflags_strip" \
    "github.com/zegl/kube-score/cmd/kube-score@$KUBE_SCORE_VERSION"
  finish "$tmp" "$dest" kube-score
  rm -rf "$tmp"
  say "kube-score $KUBE_SCORE_VERSION: built $dest/kube-score"
}

# Go kube-mgmt, for the benchmarks only: its source is not in the repository (nor on the Go module proxy);
# a snapshot outside it comes with its own build script. Without it the bench runs kopa alone.
build_kube_mgmt() {
  local dest=$tools_dir/kube-mgmt-$KUBE_MGMT_VERSION
  if [[ -x $dest/kube-mgmt ]]; then say "kube-mgmt $KUBE_MGMT_VERSION: cached at $dest/kube-mgmt"; return; fi
  local peers=${KOPA_PEERS_DIR:-$here/../../shared/peers}
  if [[ ! -x $peers/build-kube-mgmt.sh ]]; then
    say "kube-mgmt $KUBE_MGMT_VERSION: no source snapshot in $peers (KOPA_PEERS_DIR); skipped, the bench runs kopa alone"
    return
  fi
  say "kube-mgmt $KUBE_MGMT_VERSION: building from $peers (about 3 minutes when cold)"
  "$peers/build-kube-mgmt.sh" "$dest" >/dev/null
  say "kube-mgmt $KUBE_MGMT_VERSION: built $dest/kube-mgmt"
}

command -v go >/dev/null || { echo "build-servers: Go is required (go1.24 or newer) and was not found" >&2; exit 1; }
mkdir -p "$tools_dir"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(opa kube)
for t in "${targets[@]}"; do
  case $t in
    opa) build_opa ;;
    kube) build_kube ;;
    helm) build_helm ;;
    kube-score) build_kube_score ;;
    kube-mgmt) build_kube_mgmt ;;
    *) echo "build-servers: unknown target '$t' (expected opa, kube, helm, kube-score or kube-mgmt)" >&2; exit 2 ;;
  esac
done
say "all binaries are in $tools_dir"
