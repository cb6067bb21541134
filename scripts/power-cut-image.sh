#!/usr/bin/env bash
# Builds what the power-cut test boots (IntegrationTests/test-power-cut.sh): an uncompressed kernel
# (vmlinux, booted by QEMU through PVH) from Debian's linux-image package, and an initramfs with
# busybox, the virtio/ext4 modules, a vbd-sim built with the Swift runtime linked in, and /init.
#   scripts/power-cut-image.sh OUT_DIR [VBD_SIM]
# VBD_SIM defaults to building one: swift build -c $POWER_CUT_BUILD --static-swift-stdlib --product vbd-sim
# (POWER_CUT_BUILD: debug, the default, shares make test's build; release writes faster in the guest).
# The kernel is cached in $GUEST_KERNEL_DIR (default .build/guest-kernel, shared by the guest tests; scripts/guest-kernel.sh); the initramfs is rebuilt every time (about 2 s).
set -euo pipefail
out=${1:?usage: power-cut-image.sh OUT_DIR [VBD_SIM]}
sim=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)

# --- kernel and modules (shared with the other guest tests; cached)
kdir=${GUEST_KERNEL_DIR:-$here/.build/guest-kernel}
bash "$here/scripts/guest-kernel.sh" "$kdir"

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
ln -sf "$kdir/vmlinux" "$out/vmlinux"
