#!/bin/busybox sh
# /init of the block-device guest (scripts/disk-guest-image.sh). The kernel command line sets
#   vbd_mode=write    make an ext4 file system on /dev/vda, write files and their checksums, sync,
#                     unmount, e2fsck, mount again and verify every file (read back from the disk)
#   vbd_mode=verify   for each of /dev/vda, /dev/vdb...(vbd_disks of them): e2fsck -fn, mount read-only,
#                     verify every file against the checksums written in write mode
#   vbd_mode=live     on the file system write mode made: write live-a files and their checksums, sync,
#                     print "disk-guest: synced" (the host snapshots the disk from then on), then write
#                     vbd_files more 1 MiB files (live-b), syncing after each, unmount and e2fsck
#   vbd_mode=recover  on a share of a snapshot taken during live mode: mount read-write (ext4 replays
#                     its journal), verify the write-mode files and the live-a files, count the live-b
#                     files that made it, unmount and e2fsck
#   vbd_mode=fio      on the raw disk /dev/vda (an initramfs built with disk-guest-image.sh --fio):
#                     fills the first vbd_span MiB with sequential 1 MiB writes, then runs fio's
#                     4 KiB random read and random write jobs at queue depth 1 and 32 (libaio,
#                     O_DIRECT), each for vbd_runtime seconds over that span (vbd_jobs=a,b: only those,
#                     named RW-4k-qdN). Around each job it
#                     prints "disk-guest: job NAME start" and "... end" (the host samples the server's
#                     CPU time there), "disk-guest: interrupts NAME N" (the disk's request-queue
#                     interrupts the guest took during the job, from /proc/interrupts), then fio's
#                     JSON report, each line prefixed "disk-guest: json "
#   vbd_files=N       files of 1 MiB to write (write and live modes; default 16)
# Prints "disk-guest: PASS <mode>" or "disk-guest: FAIL <reason>" on the console, then powers off.
/bin/busybox --install -s /bin
# busybox runs its own (smaller) mke2fs and e2fsck applets first: the real ones are called by path.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev

say() { echo "disk-guest: $*"; }
halt_guest() { sync; poweroff -f; }
fail() { say "FAIL $*"; halt_guest; }

for m in $(cat /lib/modules/load); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done
disks=${vbd_disks:-1}
letters="a b c d"
wait_for() {
    n=0
    while [ ! -b "$1" ]; do
        n=$((n + 1)); [ $n -gt 1000 ] && fail "no $1"
        usleep 10000
    done
}

case "${vbd_mode:-}" in
    write)
        wait_for /dev/vda
        say "$(cat /sys/block/vda/size) sectors, logical block $(cat /sys/block/vda/queue/logical_block_size), read-only $(cat /sys/block/vda/ro), $(ls /sys/block/vda/mq | wc -l) queues"
        /sbin/mke2fs -t ext4 -q -F /dev/vda || fail "mkfs.ext4"
        # mke2fs discards the whole disk first; -o discard sends DISCARD for freed blocks as well.
        mount -t ext4 -o discard /dev/vda /mnt || fail "mount"
        mkdir /mnt/data || fail "mkdir"
        i=0
        while [ $i -lt "${vbd_files:-16}" ]; do
            dd if=/dev/urandom of=/mnt/data/file-$i bs=64k count=16 2>/dev/null || fail "write file-$i"
            i=$((i + 1))
        done
        echo "vbd over vhost-user-blk" > /mnt/data/hello
        (cd /mnt/data && md5sum file-* hello > /mnt/checksums) || fail "md5sum"
        sync
        # A file written, synced and removed: its blocks are discarded.
        dd if=/dev/urandom of=/mnt/scratch bs=64k count=16 2>/dev/null && sync && rm /mnt/scratch && sync
        umount /mnt || fail "umount"
        /sbin/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck after writing"; }
        mount -t ext4 -o ro /dev/vda /mnt || fail "mount again"
        (cd /mnt/data && md5sum -c -s /mnt/checksums) || fail "the files read back differ from what was written"
        umount /mnt
        say "PASS write"
        ;;
    live)
        wait_for /dev/vda
        mount -t ext4 /dev/vda /mnt || fail "mount"
        mkdir /mnt/live || fail "mkdir"
        for i in 0 1 2 3 4 5 6 7; do
            dd if=/dev/urandom of=/mnt/live/a-$i bs=64k count=16 2>/dev/null || fail "write a-$i"
        done
        (cd /mnt/live && md5sum a-* > /mnt/live-a.md5) || fail "md5sum"
        sync
        say "synced"
        i=0
        while [ $i -lt "${vbd_files:-16}" ]; do
            dd if=/dev/urandom of=/mnt/live/b-$i bs=64k count=16 2>/dev/null || fail "write b-$i"
            sync
            i=$((i + 1))
        done
        say "wrote $i live-b files"
        umount /mnt || fail "umount"
        /sbin/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck after live writes"; }
        say "PASS live"
        ;;
    recover)
        wait_for /dev/vda
        mount -t ext4 /dev/vda /mnt || fail "mount (journal replay)"
        (cd /mnt/data && md5sum -c -s /mnt/checksums) || fail "the write-mode files differ"
        (cd /mnt/live && md5sum -c -s /mnt/live-a.md5) || fail "files synced before the snapshot differ or are missing"
        say "recovered: $(wc -l < /mnt/live-a.md5) synced files intact, $(ls /mnt/live | grep -c '^b-') files written after the sync present"
        umount /mnt || fail "umount"
        /sbin/e2fsck -fn /dev/vda >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck after recovery"; }
        say "PASS recover"
        ;;
    fio)
        wait_for /dev/vda
        span=${vbd_span:-128}M
        runtime=${vbd_runtime:-20}
        mkdir -p /tmp/fio
        # The disk's virtio device (virtioN); its request queues' MSI-X vectors are named
        # virtioN-req.Q in /proc/interrupts (virtioN alone when it shares a legacy INTx line).
        disk_device=$(basename "$(readlink -f /sys/block/vda/device)")
        disk_interrupts() {
            awk -v dev="$disk_device" '$NF == dev || index($NF, dev "-req.") == 1 {
                for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts
        }
        say "disk $disk_device, its interrupt lines: $(awk -v dev="$disk_device" 'index($NF, dev) == 1 { printf "%s ", $NF }' /proc/interrupts)"
        # Every job reads or writes the span the fill wrote, so reads find data on every back end
        # (not holes), and fio's default scramble_buffers keeps written blocks distinct (vbd
        # deduplicates identical blocks).
        run_job() {
            name=$1; shift
            irq_before=$(disk_interrupts)
            say "job $name start"
            /sbin/fio --name="$name" --filename=/dev/vda --direct=1 --size="$span" --output-format=json \
                --output="/tmp/fio/$name.json" "$@" >/tmp/fio/$name.log 2>&1 || { cat /tmp/fio/$name.log; fail "fio $name"; }
            say "job $name end"
            say "interrupts $name $(($(disk_interrupts) - irq_before))"
            sed 's/^/disk-guest: json /' "/tmp/fio/$name.json"
        }
        run_job fill --rw=write --bs=1M --ioengine=libaio --iodepth=4
        for job in $(echo "${vbd_jobs:-randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd1,randwrite-4k-qd32}" | tr , " "); do
            rw=${job%%-*}; qd=${job##*-qd}
            run_job "$job" --rw=$rw --bs=4k --ioengine=libaio --iodepth=$qd \
                --time_based --runtime="$runtime" --randrepeat=0 --norandommap
        done
        say "PASS fio"
        ;;
    verify)
        for letter in $letters; do
            [ "$disks" -gt 0 ] || break
            disks=$((disks - 1))
            dev=/dev/vd$letter
            wait_for $dev
            ro=$(cat /sys/block/vd$letter/ro)
            /sbin/e2fsck -fn $dev >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck $dev"; }
            mount -t ext4 -o ro,noload $dev /mnt || fail "mount $dev"
            (cd /mnt/data && md5sum -c -s /mnt/checksums) || fail "the files on $dev differ"
            files=$(wc -l < /mnt/checksums)
            umount /mnt
            say "verified $dev (read-only $ro): $files files"
        done
        say "PASS verify"
        ;;
    *) fail "unknown vbd_mode '${vbd_mode:-}'" ;;
esac
halt_guest
