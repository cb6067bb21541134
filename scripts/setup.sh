#!/usr/bin/env bash
# Installs the Debian packages vbd builds with and the real NBD clients its tests drive.
# Idempotent: does nothing when everything is present. Needs root (or sudo) on Debian/Ubuntu.
set -euo pipefail
# The power-cut test (IntegrationTests/test-power-cut.sh) boots a QEMU guest: qemu-system-x86, and for
# its image busybox-static, cpio, xz-utils and kmod (depmod); the kernel package itself is unpacked,
# not installed, by scripts/power-cut-image.sh.
packages=(liblz4-dev libxxhash-dev pkg-config libnbd-bin python3-libnbd qemu-utils fio nbdkit
          e2fsprogs python3 openssl jq util-linux
          qemu-system-x86 busybox-static cpio xz-utils kmod)
# The RADOS backend (docs/RADOS.md) builds against librados-dev; its tests start a throw-away
# monitor + OSD (scripts/ceph-micro-cluster.sh). Without --no-install-recommends ceph-mon would pull
# in the manager, the dashboard and their Python stack, none of which the tests use.
ceph_packages=(ceph-mon ceph-osd ceph-common librados-dev)
not_installed() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
    done
}
mapfile -t missing < <(not_installed "${packages[@]}")
mapfile -t missing_ceph < <(not_installed "${ceph_packages[@]}")
if [ ${#missing[@]} -gt 0 ] || [ ${#missing_ceph[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ ${#missing_ceph[@]} -gt 0 ]; then
        echo "setup: installing ${missing_ceph[*]}"
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_ceph[@]}" >/dev/null
    fi
fi
command -v swift >/dev/null || { echo "setup: swift 6.x is required on PATH" >&2; exit 1; }
# Benchmarks/rados-compare.sh serves an RBD image with qemu-nbd, whose rbd driver is in
# qemu-block-extra (fio's rbd engine and the rbd CLI come with fio and ceph-common above).
mapfile -t missing_benchmark < <(not_installed qemu-block-extra)
if [ ${#missing_benchmark[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    echo "setup: installing ${missing_benchmark[*]}"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing_benchmark[@]}" >/dev/null
fi
