#!/usr/bin/env bash
# The kernel every QEMU guest test boots: Debian's linux-image package unpacked (not installed:
# installing builds an initrd, slowly), the ELF vmlinux taken out of its bzImage (QEMU boots it
# through PVH, seconds faster than the bzImage), and the virtio/ext4 modules with the order to load them.
#   scripts/guest-kernel.sh KERNEL_DIR
# Writes KERNEL_DIR/vmlinux, KERNEL_DIR/modules/*.ko and KERNEL_DIR/modules.load; does nothing when
# they are there already.
set -euo pipefail
kdir=${1:?usage: guest-kernel.sh KERNEL_DIR}
mkdir -p "$kdir"
kdir=$(cd "$kdir" && pwd)
if [ ! -s "$kdir/vmlinux" ] || [ ! -s "$kdir/modules.load" ]; then
    rm -rf "$kdir/deb" "$kdir/modules"; mkdir -p "$kdir/deb"
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "guest-kernel: no linux-image-*-amd64 package known to apt (run apt-get update)" >&2; exit 1; }
    echo "guest-kernel: unpacking $pkg"
    ls "$kdir"/"$pkg"_*.deb >/dev/null 2>&1 || (cd "$kdir" && apt-get download -q "$pkg")
    dpkg-deb -x "$kdir"/"$pkg"_*.deb "$kdir/deb"
    version=$(ls "$kdir/deb/lib/modules")
    # The bzImage carries the kernel as an xz stream; QEMU boots the ELF inside it directly (PVH).
    bz=$kdir/deb/boot/vmlinuz-$version
    offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -1 | cut -d: -f1)
    [ -n "$offset" ] || { echo "guest-kernel: no xz stream in $bz" >&2; exit 1; }
    tail -c +$((offset + 1)) "$bz" > "$kdir/vmlinux.xz"
    xz -dc --single-stream "$kdir/vmlinux.xz" > "$kdir/vmlinux"
    rm "$kdir/vmlinux.xz"
    depmod -b "$kdir/deb" "$version"
    # Modules to load, each after its dependencies (modules.dep order); crc32c first: ext4 needs it
    # only through a soft dependency, which busybox insmod does not follow.
    dep=$kdir/deb/lib/modules/$version/modules.dep
    declare -A loaded=()
    order=()
    add() {
        local path=$1 line deps d i
        [ -n "${loaded[$path]:-}" ] && return 0
        line=$(grep -m1 "^$path:" "$dep") || { echo "guest-kernel: $path not in modules.dep" >&2; exit 1; }
        read -r -a deps <<< "${line#*:}"
        for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add "${deps[$i]}"; done
        loaded[$path]=1
        order+=("$path")
    }
    for m in crc32c_generic ext4 virtio_pci virtio_blk; do
        path=$(grep -oE "^[^:]*/$m\.ko(\.xz)?:" "$dep" | head -1 | tr -d :)
        if [ -z "$path" ]; then
            grep -qE "/$m\.ko" "$kdir/deb/lib/modules/$version/modules.builtin" \
                || { echo "guest-kernel: module $m neither built in nor a module" >&2; exit 1; }
            continue
        fi
        add "$path"
    done
    mkdir -p "$kdir/modules"
    : > "$kdir/modules.load"
    for path in "${order[@]}"; do
        name=$(basename "$path"); src=$kdir/deb/lib/modules/$version/$path
        case $name in
            *.ko.xz) xz -dc "$src" > "$kdir/modules/${name%.xz}"; name=${name%.xz} ;;
            *) cp "$src" "$kdir/modules/$name" ;;
        esac
        echo "$name" >> "$kdir/modules.load"
    done
    rm -rf "$kdir/deb" "$kdir"/*.deb
    echo "guest-kernel: kernel $version, modules: $(tr '\n' ' ' < "$kdir/modules.load")"
fi

