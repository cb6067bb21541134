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
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "setup: swift 6.x is required on PATH" >&2; exit 1; }
