#!/usr/bin/env bash
# Builds (or reuses) the local cluster's binaries at the versions in hack/versions.env: the
# control plane (kube-apiserver, kube-controller-manager, etcd), the node (kubelet,
# kube-scheduler, kube-proxy, CoreDNS), a kubectl of the same version, and helm.
#
# Binaries live outside the repository, keyed by version, so every clone on this
# machine shares them:  $JUTURNA_OPERATOR_CACHE/<component>-<version>/<binary>
# (default cache: ~/.cache/juturna-operator). A second run only checks that each
# binary is present and reports the pinned version, then prints the bin folders.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/versions.env"
cache=${JUTURNA_OPERATOR_CACHE:-$HOME/.cache/juturna-operator}
quiet=${QUIET:-0}

say() { [ "$quiet" = 1 ] || echo "$@" >&2; }
die() { echo "error: $*" >&2; exit 1; }

if ! command -v go >/dev/null 2>&1; then
  die "no Go toolchain on PATH. The local control plane is built from source with Go >= 1.26.
  Fix: install Go (apt-get install golang-go, or put /usr/local/go/bin on PATH) and run 'make cluster-up' again."
fi

# One build at a time per cache: clones building at once (CI beside a developer's run) would
# each compile everything and write the same $out.tmp. The second waits, then reuses.
if command -v flock >/dev/null 2>&1; then
  mkdir -p "$cache"
  exec 9>"$cache/.build.lock"
  if ! flock -n 9; then
    say "another build of the cluster's binaries is running; waiting for it ($cache/.build.lock) ..."
    flock 9
  fi
fi

# has_version BINARY VERSION-ARGS... -- EXPECTED : the binary exists and prints EXPECTED.
# (Output is captured first: with pipefail, `grep -q` closing the pipe early would make a
# multi-line --version die of SIGPIPE and look like a wrong version.)
has_version() {
  local bin=$1 want=$2 out; shift 2
  [ -x "$bin" ] || return 1
  out=$("$bin" "$@" 2>/dev/null) || return 1
  [[ $out == *"$want"* ]]
}

# go_build DIR OUT LOG PKG LDFLAGS : builds PKG inside wrapper module DIR into OUT.
go_build() {
  local dir=$1 out=$2 log=$3 pkg=$4 ldflags=$5
  say "building $(basename "$out") from $pkg (log: $log) ..."
  mkdir -p "$(dirname "$out")"
  if ! (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out.tmp" "$pkg") >"$log" 2>&1; then
    echo "error: go build of $pkg failed. Last lines of the go output ($log):" >&2
    tail -n 25 "$log" >&2
    die "fix the cause above (network to the Go module proxy, disk space, Go version >= 1.26) and run again."
  fi
  mv "$out.tmp" "$out"
}

kdir=$cache/kubernetes-$KUBERNETES_VERSION
minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
kflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  kflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
done
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  # kubectl has no --version flag; `kubectl version --client` prints the same string.
  vargs=(--version); [ "$cmd" = kubectl ] && vargs=(version --client)
  if ! has_version "$kdir/$cmd" "$KUBERNETES_VERSION" "${vargs[@]}"; then
    go_build "$here/kube" "$kdir/$cmd" "$kdir/$cmd.build.log" "k8s.io/kubernetes/cmd/$cmd" "$kflags"
  fi
  has_version "$kdir/$cmd" "$KUBERNETES_VERSION" "${vargs[@]}" || die "$kdir/$cmd does not report $KUBERNETES_VERSION after building"
done

edir=$cache/etcd-$ETCD_VERSION
if ! has_version "$edir/etcd" "${ETCD_VERSION#v}" --version; then
  go_build "$here/etcd" "$edir/etcd" "$edir/etcd.build.log" go.etcd.io/etcd/server/v3 "-s -w"
fi
has_version "$edir/etcd" "${ETCD_VERSION#v}" --version || die "$edir/etcd does not report $ETCD_VERSION after building"

hdir=$cache/helm-$HELM_VERSION
if ! has_version "$hdir/helm" "$HELM_VERSION" version --short; then
  say "installing helm $HELM_VERSION (log: $hdir/helm.build.log) ..."
  mkdir -p "$hdir"
  if ! GOBIN=$hdir CGO_ENABLED=0 go install -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
      "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >"$hdir/helm.build.log" 2>&1; then
    echo "error: go install of helm $HELM_VERSION failed. Last lines of the go output:" >&2
    tail -n 25 "$hdir/helm.build.log" >&2
    die "fix the cause above and run again."
  fi
fi
has_version "$hdir/helm" "$HELM_VERSION" version --short || die "$hdir/helm does not report $HELM_VERSION"

# CoreDNS for the node's cluster DNS: a plain `go install` (its go.mod has no replaces that
# break it); -mod=mod lets the install resolve its module graph itself.
cdir=$cache/coredns-$COREDNS_VERSION
if ! has_version "$cdir/coredns" "CoreDNS-${COREDNS_VERSION#v}" -version; then
  say "installing coredns $COREDNS_VERSION (log: $cdir/coredns.build.log) ..."
  mkdir -p "$cdir"
  if ! GOBIN=$cdir GOFLAGS=-mod=mod CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
      "github.com/coredns/coredns@$COREDNS_VERSION" >"$cdir/coredns.build.log" 2>&1; then
    echo "error: go install of coredns $COREDNS_VERSION failed. Last lines of the go output:" >&2
    tail -n 25 "$cdir/coredns.build.log" >&2
    die "fix the cause above and run again."
  fi
fi
has_version "$cdir/coredns" "CoreDNS-${COREDNS_VERSION#v}" -version || die "$cdir/coredns does not report $COREDNS_VERSION"

# One line each, NAME=folder, for the Python launcher and the Makefile.
echo "KUBE_BIN=$kdir"
echo "ETCD_BIN=$edir"
echo "HELM_BIN=$hdir"
echo "COREDNS_BIN=$cdir"
