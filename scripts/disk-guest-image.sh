#!/usr/bin/env bash
# Builds what the block-device guest tests boot (IntegrationTests/test-vhost-user-blk.sh): the shared
# kernel (scripts/guest-kernel.sh) and an initramfs with busybox, mke2fs/e2fsck and the libraries they
# link, the virtio/ext4 modules, and scripts/disk-guest-init.sh as /init.
#   scripts/disk-guest-image.sh OUT_DIR [--fio]
# Writes OUT_DIR/vmlinux and OUT_DIR/initramfs.gz (rebuilt every time, about 2 s). With --fio the
# initramfs carries fio and every library it links as well (Benchmarks/vhost-user-blk.sh): about
# 30 MiB compressed and 85 MiB in the guest's memory, so the file-system tests leave it out.
set -euo pipefail
out=${1:?usage: disk-guest-image.sh OUT_DIR [--fio]}
with_fio=false
[ "${2:-}" = --fio ] && with_fio=true
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
kdir=${GUEST_KERNEL_DIR:-$here/.build/guest-kernel}
bash "$here/scripts/guest-kernel.sh" "$kdir"

root=$out/root
rm -rf "$root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,mnt,etc,tmp,lib/modules}
cp /bin/busybox "$root/bin/busybox"
if ldd /bin/busybox >/dev/null 2>&1; then
    echo "disk-guest-image: /bin/busybox is not static (install busybox-static)" >&2; exit 1
fi
tools="mke2fs e2fsck"
$with_fio && tools="$tools fio"
for tool in $tools; do
    path=$(command -v "$tool" || true)
    [ -n "$path" ] || { echo "disk-guest-image: $tool is missing (install e2fsprogs, fio)" >&2; exit 1; }
    cp -L "$path" "$root/sbin/$tool"
    # Its libraries at the same paths, and the dynamic loader.
    for lib in $(ldd "$path" | grep -oE '/[^ ]+'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
cp "$kdir"/modules/*.ko "$root/lib/modules/"
cp "$kdir/modules.load" "$root/lib/modules/load"
cp "$here/scripts/disk-guest-init.sh" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.gz"
rm -rf "$root"
ln -sf "$kdir/vmlinux" "$out/vmlinux"
echo "disk-guest-image: $out/vmlinux, $(du -h "$out/initramfs.gz" | cut -f1) initramfs" >&2
