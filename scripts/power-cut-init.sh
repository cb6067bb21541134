#!/bin/busybox sh
# /init of the power-cut guest (scripts/power-cut-image.sh builds the initramfs around it).
# The kernel command line passes, as environment variables:
#   vbd_mode=write|verify   write: check the previous cut (if any), then write until the power goes
#   vbd_first=N             first sequence number this boot writes
#   vbd_prev_first=N        first sequence number the previous boot wrote (0: this is the first boot)
#   vbd_prev_flushed=N      last sequence number a flush acknowledged before the cut (0: none)
# /dev/vda is the ext4 disk holding the store, /dev/vdb the raw floors (see PowerCutCheck.swift).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

say() { echo "power-cut guest: $*"; }
halt_guest() { sync; poweroff -f; }
fail() { say "FAIL $*"; halt_guest; }

for m in $(cat /lib/modules/load); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
# virtio-blk probes as the module loads; the device nodes follow from devtmpfs.
n=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    n=$((n + 1)); [ $n -gt 500 ] && fail "no /dev/vda or /dev/vdb"
    usleep 10000
done
mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"

if [ "${vbd_prev_first:-0}" != 0 ]; then
    [ -e /mnt/store/superblock ] || fail "the store is gone after the cut"
    vbd-sim --power-cut-verify /mnt/store --floors /dev/vdb \
        --previous-first "$vbd_prev_first" --previous-flushed "${vbd_prev_flushed:-0}" || fail "verify"
fi
case "${vbd_mode:-}" in
    write)
        say "writing from $vbd_first"
        vbd-sim --crash-writer /mnt/store --first-sequence "$vbd_first" --announce-writes
        fail "the writer stopped by itself (status $?)"
        ;;
    verify)
        umount /mnt || fail "umount"
        say "DONE"
        halt_guest
        ;;
    *) fail "unknown vbd_mode '${vbd_mode:-}'" ;;
esac
