#!/usr/bin/env bash
# Installs from Debian's packages what `make test` needs beyond Python and Go, when missing:
#  - podman, runc and debootstrap: build and run the operator's image (the image tests);
#  - containerd, runc, the CNI plugins, socat, iproute2, iptables and gcc: the local node
#    (hack/node.py; iptables for kube-proxy's rules and their cleanup);
#  - redis-server: Argo CD's cache in the GitOps test (hack/argocd.py).
#
# Only on Debian-like machines, as root; anywhere else it says why and exits 0, and the tests
# that need what is missing skip with that reason. Opt out on purpose with
# JUTURNA_OPERATOR_NO_PODMAN=1 (the image) or JUTURNA_OPERATOR_NO_NODE=1 (the node).
set -uo pipefail
need=()
if [ -z "${JUTURNA_OPERATOR_NO_PODMAN:-}" ]; then
  command -v podman >/dev/null || need+=(podman conmon slirp4netns uidmap golang-github-containers-common)
  command -v debootstrap >/dev/null || need+=(debootstrap)
fi
if [ -z "${JUTURNA_OPERATOR_NO_NODE:-}" ]; then
  command -v containerd >/dev/null || need+=(containerd)
  command -v socat >/dev/null || need+=(socat)
  command -v ip >/dev/null || need+=(iproute2)
  command -v iptables >/dev/null || need+=(iptables)
  command -v gcc >/dev/null || need+=(gcc libc6-dev)
fi
command -v runc >/dev/null || need+=(runc)
command -v redis-server >/dev/null || need+=(redis-server)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] || need+=(containernetworking-plugins)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: ${need[*]} missing and this is not a root Debian machine; the tests that need them will skip" >&2
  exit 0
fi
echo "installing ${need[*]} from Debian's packages" >&2
# crun is not used (it fails here with "cgroups in hybrid mode"), runc is; see PLATFORM.md.
log=/tmp/juturna-operator-apt.log
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >"$log" 2>&1; }
# A machine that never ran `apt-get update` has no package lists: update once, then retry.
if ! install && ! { apt-get update >>"$log" 2>&1 && install; }; then
  tail -15 "$log" >&2
  echo "note: apt-get install failed (log above); the tests that need ${need[*]} will skip" >&2
fi
exit 0
