#!/usr/bin/env bash
# Builds what the power-cut test boots (IntegrationTests/test-power-cut.sh): an uncompressed kernel
# (vmlinux, booted by QEMU through PVH) from Debian's linux-image package, and an initramfs with
# busybox, the virtio/ext4 modules, a vbd-sim built with the Swift runtime linked in, and /init.
#   scripts/power-cut-image.sh OUT_DIR [VBD_SIM]
# VBD_SIM defaults to building one: swift build -c $POWER_CUT_BUILD --static-swift-stdlib --product vbd-sim
# (POWER_CUT_BUILD: debug, the default, shares make test's build; release writes faster in the guest).
# The kernel is cached in OUT_DIR/kernel; the initramfs is rebuilt every time (about 2 s).
set -euo pipefail
out=${1:?usage: power-cut-image.sh OUT_DIR [VBD_SIM]}
sim=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

# --- kernel and modules: the package unpacked, not installed (installing builds an initrd, slowly)
kdir=$out/kernel
if [ ! -s "$kdir/vmlinux" ] || [ ! -s "$kdir/modules.load" ]; then
    rm -rf "$kdir/deb" "$kdir/modules"; mkdir -p "$kdir/deb"
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$pkg" ] || { echo "power-cut-image: no linux-image-*-amd64 package known to apt (run apt-get update)" >&2; exit 1; }
    echo "power-cut-image: unpacking $pkg"
    ls "$kdir"/"$pkg"_*.deb >/dev/null 2>&1 || (cd "$kdir" && apt-get download -q "$pkg")
    dpkg-deb -x "$kdir"/"$pkg"_*.deb "$kdir/deb"
    version=$(ls "$kdir/deb/lib/modules")
    # The bzImage carries the kernel as an xz stream; QEMU boots the ELF inside it directly (PVH).
    bz=$kdir/deb/boot/vmlinuz-$version
    offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -1 | cut -d: -f1)
    [ -n "$offset" ] || { echo "power-cut-image: no xz stream in $bz" >&2; exit 1; }
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
        line=$(grep -m1 "^$path:" "$dep") || { echo "power-cut-image: $path not in modules.dep" >&2; exit 1; }
        read -r -a deps <<< "${line#*:}"
        for ((i = ${#deps[@]} - 1; i >= 0; i--)); do add "${deps[$i]}"; done
        loaded[$path]=1
        order+=("$path")
    }
    for m in crc32c_generic ext4 virtio_pci virtio_blk; do
        path=$(grep -oE "^[^:]*/$m\.ko(\.xz)?:" "$dep" | head -1 | tr -d :)
        if [ -z "$path" ]; then
            grep -qE "/$m\.ko" "$kdir/deb/lib/modules/$version/modules.builtin" \
                || { echo "power-cut-image: module $m neither built in nor a module" >&2; exit 1; }
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
    echo "power-cut-image: kernel $version, modules: $(tr '\n' ' ' < "$kdir/modules.load")"
fi

# --- the writer/checker binary
if [ -z "$sim" ]; then
    config=${POWER_CUT_BUILD:-debug}
    # The static FoundationEssentials (pulled in by ArgumentParser) misses its autolink entries
    # for these two archives in Swift 6.3: named explicitly, or the link fails.
    (cd "$here" && swift build -c "$config" --static-swift-stdlib --product vbd-sim \
        -Xlinker -l_FoundationCollections -Xlinker -l_FoundationCShims >&2)
    sim=$(cd "$here" && swift build -c "$config" --show-bin-path)/vbd-sim
fi
[ -x "$sim" ] || { echo "power-cut-image: $sim is not executable" >&2; exit 1; }
if ldd "$sim" 2>/dev/null | grep -q libswiftCore; then
    echo "power-cut-image: $sim links the Swift runtime dynamically (build it with --static-swift-stdlib)" >&2; exit 1
fi

# --- initramfs
root=$out/root
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,lib/modules}
cp /bin/busybox "$root/bin/busybox"
if ldd /bin/busybox >/dev/null 2>&1; then
    echo "power-cut-image: /bin/busybox is not static (install busybox-static)" >&2; exit 1
fi
cp "$sim" "$root/bin/vbd-sim"
# Whatever the binary still links dynamically (glibc, liblz4, libxxhash), at the same paths.
libs=$(ldd "$sim" 2>/dev/null | grep -oE '/[^ ]+' || true)
for lib in $libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
cp "$kdir"/modules/*.ko "$root/lib/modules/"
cp "$kdir/modules.load" "$root/lib/modules/load"
cp "$here/scripts/power-cut-init.sh" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.gz"
rm -rf "$root"
echo "power-cut-image: $out/vmlinux $(du -h "$out/initramfs.gz" | cut -f1) initramfs" >&2
ln -sf kernel/vmlinux "$out/vmlinux"
