#!/usr/bin/env bash
# Installs podman, runc and debootstrap from Debian's packages when they are missing, so that
# `make test` can build and run the operator's image (tests/integration/test_image.py).
#
# Only on Debian-like machines, as root; anywhere else it says why and exits 0, and the
# image test then skips with that reason. Set JUTURNA_OPERATOR_NO_PODMAN=1 to skip on purpose.
set -uo pipefail
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
[ ${#need[@]} -eq 0 ] && exit 0
if [ -n "${JUTURNA_OPERATOR_NO_PODMAN:-}" ]; then
  echo "note: JUTURNA_OPERATOR_NO_PODMAN is set; not installing ${need[*]}" >&2; exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: ${need[*]} missing and this is not a root Debian machine; the image test will skip" >&2
  exit 0
fi
echo "installing ${need[*]} from Debian's packages (for the image test)" >&2
# crun is not used (it fails here with "cgroups in hybrid mode"), runc is; see PLATFORM.md.
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    podman runc conmon debootstrap slirp4netns uidmap containernetworking-plugins \
    golang-github-containers-common >/tmp/juturna-operator-apt.log 2>&1; then
  tail -15 /tmp/juturna-operator-apt.log >&2
  echo "note: apt-get install failed (log above); the image test will skip" >&2
fi
exit 0
