#!/usr/bin/env bash
# Builds (or reuses) Argo CD at the version in hack/versions.env, for the GitOps test
# (tests/integration/test_gitops.py, run by hack/argocd.py): the one binary `./cmd` of
# github.com/argoproj/argo-cd/v3 (ARGOCD_BINARY_NAME picks the component), built through the
# wrapper module hack/argo-cd (hack/gen-modules.sh), no UI build (the module's placeholder
# under ui/dist/app is embedded).
#
# Nothing of Argo CD's repository is committed here: what the binary needs beside it comes from
# that version's module source in the Go module cache, copied next to the binary:
#   $JUTURNA_OPERATOR_CACHE/argocd-<version>/
#     argocd                                  the binary
#     git-verify-wrapper.sh, gpg-wrapper.sh   from its hack/: its image has them on PATH, and
#                                             the repo server fails every manifest generation
#                                             without them ("permission denied")
#     manifests/crds/                         the Application and AppProject CRDs
#     manifests/config/                       the stock argocd-cm, -rbac-cm, -cmd-params-cm, ...
# A second run only checks that all of it is there and that the binary reports the version.
#
# Prints ARGOCD_BIN=<folder> and exits 0; exits 3 with the reason on stderr where Argo CD
# cannot be built on this machine (no Go, the Go module proxy unreachable), 1 on other errors.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=/dev/null
source "$here/versions.env"
cache=${JUTURNA_OPERATOR_CACHE:-$HOME/.cache/juturna-operator}
dir=$cache/argocd-$ARGOCD_VERSION
quiet=${QUIET:-0}

say() { [ "$quiet" = 1 ] || echo "$@" >&2; }
die() { echo "error: $*" >&2; exit 1; }
unavailable() { echo "Argo CD $ARGOCD_VERSION cannot be built here: $*" >&2; exit 3; }

complete() {
  local out
  [ -x "$dir/argocd" ] && [ -x "$dir/git-verify-wrapper.sh" ] && [ -x "$dir/gpg-wrapper.sh" ] \
    && [ -f "$dir/manifests/crds/application-crd.yaml" ] \
    && [ -f "$dir/manifests/crds/appproject-crd.yaml" ] \
    && [ -f "$dir/manifests/config/argocd-cm.yaml" ] || return 1
  out=$(ARGOCD_BINARY_NAME=argocd HOME=$dir "$dir/argocd" version --client --short 2>/dev/null) || return 1
  [[ $out == *"$ARGOCD_VERSION"* ]]
}

if ! complete; then
  command -v go >/dev/null 2>&1 || unavailable "no Go toolchain on PATH (install Go >= 1.26; GOTOOLCHAIN=$ARGOCD_GO_TOOLCHAIN is fetched from the Go module proxy)"
  export GOTOOLCHAIN=$ARGOCD_GO_TOOLCHAIN
  mkdir -p "$dir"
  log=$dir/build.log
  # The module source (the wrapper's version of it); this also fetches the toolchain. A
  # failure here is the proxy: nothing of Argo CD can be had without it.
  if ! src=$(cd "$here/argo-cd" && go mod download -json github.com/argoproj/argo-cd/v3 2>"$log" \
      | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("Dir") or ""); sys.exit(1 if d.get("Error") else 0)') \
      || [ -z "$src" ]; then
    tail -n 5 "$log" >&2
    unavailable "the Go module proxy did not serve github.com/argoproj/argo-cd/v3 or Go $ARGOCD_GO_TOOLCHAIN (log: $log)"
  fi
  say "building Argo CD $ARGOCD_VERSION with $ARGOCD_GO_TOOLCHAIN (cold: ~6 min and 2.5 GB on 2 cores; log: $log) ..."
  flags="-s -w -X github.com/argoproj/argo-cd/v3/common.version=${ARGOCD_VERSION#v}"
  if ! (cd "$here/argo-cd" && CGO_ENABLED=0 go build -trimpath -ldflags "$flags" \
      -o "$dir/argocd.tmp" github.com/argoproj/argo-cd/v3/cmd) >>"$log" 2>&1; then
    echo "error: go build of Argo CD failed. Last lines of the go output ($log):" >&2
    tail -n 25 "$log" >&2
    # A module the proxy would not serve is this machine's network, not a bug to fail on.
    grep -qE 'dial tcp|proxy.golang.org|no such host|i/o timeout|TLS handshake' "$log" \
      && unavailable "the Go module proxy failed during the build (above)"
    die "fix the cause above and run again."
  fi
  # The module cache is read-only: copies get the modes the repo server needs.
  install -m 0755 "$src/hack/git-verify-wrapper.sh" "$src/hack/gpg-wrapper.sh" "$dir/"
  mkdir -p "$dir/manifests/crds" "$dir/manifests/config"
  install -m 0644 "$src/manifests/crds/application-crd.yaml" "$src/manifests/crds/appproject-crd.yaml" \
    "$dir/manifests/crds/"
  for f in "$src"/manifests/base/config/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || install -m 0644 "$f" "$dir/manifests/config/"
  done
  mv "$dir/argocd.tmp" "$dir/argocd"
  complete || die "$dir/argocd does not report $ARGOCD_VERSION after building (log: $log)"
fi
echo "ARGOCD_BIN=$dir"
