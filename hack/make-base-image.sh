#!/usr/bin/env bash
# Makes a local Python 3.12 base image for the Dockerfile, for machines that cannot pull one.
#
# No container registry is reachable here (see ../shared/PLATFORM.md), so `python:3.12-slim`
# cannot be pulled. This script builds the closest thing from what is reachable: a minimal
# Debian root filesystem (debootstrap, from Debian's package mirror) with this machine's
# Python 3.12 copied into /usr/local, the same place the official image keeps it. The host's
# CA bundle goes in too (and pip is pointed at it, as on the host), so that pip in the build
# stage trusts what the host trusts.
#
# Usage: hack/make-base-image.sh [IMAGE]   (default localhost/juturna-operator-base:python3.12)
# The root filesystem is cached as a tarball; a second run only re-imports it if needed.
set -euo pipefail
image=${1:-localhost/juturna-operator-base:python3.12}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/versions.env"
podman=(podman --runtime runc --cgroup-manager=cgroupfs)

for tool in podman debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing; run hack/install-packages.sh" >&2; exit 1; }
done
if "${podman[@]}" image exists "$image"; then
  echo "$image"; exit 0
fi

python=$("$here/find-python.sh")
prefix=$("$python" -c 'import sys; print(sys.base_prefix)')
version=$("$python" -c 'import platform; print(platform.python_version())')
cache=${JUTURNA_OPERATOR_CACHE:-$HOME/.cache/juturna-operator}
tarball=$cache/base-rootfs-${BASE_SUITE}-python${version}.tar
if [ ! -s "$tarball" ]; then
  [ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  root=$work/rootfs
  # Python's shared libraries need these; the rest of python:3.12-slim is not needed.
  libs=ca-certificates,libssl3,libffi8,libsqlite3-0,libbz2-1.0,liblzma5,zlib1g,libreadline8,libncursesw6,libuuid1
  if ! debootstrap --variant=minbase --include="$libs" "$BASE_SUITE" "$root" "$BASE_MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -20 "$work/debootstrap.log" >&2
    echo "error: debootstrap of $BASE_SUITE from $BASE_MIRROR failed (log above)" >&2
    exit 1
  fi
  cp -a "$prefix"/. "$root/usr/local/"
  rm -rf "$root/usr/local/lib/python3.12/site-packages"/_sandboxing* "$root/usr/local/lib/python3.12/test"
  # The interpreter's RUNPATH points at its old prefix; ldconfig makes /usr/local/lib known.
  echo /usr/local/lib >"$root/etc/ld.so.conf.d/usr-local.conf"
  chroot "$root" /sbin/ldconfig
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  chroot "$root" /usr/local/bin/python3.12 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib'
  rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
  mkdir -p "$cache"
  tar -C "$root" -cf "$tarball.part" .
  mv "$tarball.part" "$tarball"
fi
"${podman[@]}" import \
  --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'CMD ["python3"]' \
  "$tarball" "$image" >/dev/null
echo "$image"
