#!/usr/bin/env bash
# Real QEMU guests (TCG) on vbd's vhost-user-blk door (docs/VHOST-USER.md).
#  1. A share of an empty golden volume is served with `vbdtool serve --vhost-user-blk`; a guest
#     makes an ext4 file system on it, writes files and their checksums, syncs, runs e2fsck and
#     verifies the files read back (scripts/disk-guest-init.sh, mode write).
#  2. A second QEMU connects to the same socket (the door accepts again after the first one left)
#     and verifies the files.
#  3. A snapshot while a guest writes: the guest writes files, syncs, says so on its console and
#     writes on (syncing after each file); on that line the host runs `vbdtool snapshot`. A guest on
#     a share of that snapshot replays the ext4 journal and must find every file synced before it.
#  4. `vbdtool snapshot` of the share while it is served, and a share of that snapshot; a new
#     server serves the new share read-write and the snapshot read-only, and a guest verifies
#     both disks (the snapshot's disk must be read-only in the guest).
#     This server schedules I/O with mClock: the guests' requests take the scheduler's device slots.
#  5. Boot storm: four guests at once, each on its own share of the same snapshot, verify the files.
#     The cache is content-keyed, so it holds about one copy of what they read, not four: checked
#     against the bytes one guest read, and the cache's figures printed.
#  6. `vbdtool fsck` checks the store.
# Guest memory is memory-backend-memfd,share=on, as vhost-user requires. Every guest is bounded by
# `timeout`; a guest boot takes about 5-10 s here.
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
source "$here/nbd-functions.sh"
requires qemu-system-x86_64 mke2fs e2fsck cpio xz busybox depmod jq
requires_vbdtool_serve

image=${DISK_GUEST_DIR:-$root/.build/disk-guest}
bash "$root/scripts/disk-guest-image.sh" "$image"

fail() { echo "vhost-user-blk: FAIL: $*"; exit 1; }
make_store 256M
"$VBDTOOL" rm vol --store "$STORE" >/dev/null
"$VBDTOOL" create golden --size 256M --store "$STORE" >/dev/null
"$VBDTOOL" snapshot golden@empty --store "$STORE" >/dev/null
"$VBDTOOL" share golden@empty vm1 --store "$STORE" >/dev/null

# boot NAME MODE DISKS SOCKET...: one guest with a vhost-user-blk disk per socket; its console in
# $TMPDIR_TEST/NAME.log; fails unless it prints "disk-guest: PASS MODE" and powers off.
boot() {
    local name=$1 mode=$2 disks=$3 cpus=${CPUS:-1}; shift 3
    local log=$TMPDIR_TEST/$name.log args=() i=0 start=$SECONDS rc=0
    for sock in "$@"; do
        args+=(-chardev "socket,id=c$i,path=$sock" -device "vhost-user-blk-pci,chardev=c$i,num-queues=2")
        i=$((i + 1))
    done
    timeout -k 5 120 qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -machine q35 -m 256 -smp "$cpus" \
        -nodefaults -display none -no-reboot -serial stdio \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$image/vmlinux" -initrd "$image/initramfs.gz" \
        -append "console=ttyS0 quiet panic=-1 no_timer_check vbd_mode=$mode vbd_disks=$disks" \
        "${args[@]}" > "$log" 2>&1 || rc=$?
    tr -d '\r' < "$log" | { grep '^disk-guest:' || true; } | sed "s/^/    $name: /"
    if [ $rc -ne 0 ] || ! tr -d '\r' < "$log" | grep -q "^disk-guest: PASS $mode"; then
        tail -n 40 "$log" | sed 's/^/    /'
        tail -n 20 "$TMPDIR_TEST/serve.log" | sed 's/^/    serve: /'
        fail "guest $name (QEMU status $rc)"
    fi
    echo "vhost-user-blk: $name: PASS $mode in $((SECONDS - start)) s"
}

# boot_live: mode live on vm1.sock; snapshots vm1@live as soon as the guest says "synced", while
# it goes on writing.
boot_live() {
    local log=$TMPDIR_TEST/live.log line snapped=0 start=$SECONDS rc=0
    coproc LIVE {
        exec timeout -k 5 120 qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -machine q35 -m 256 -smp 1 \
            -nodefaults -display none -no-reboot -serial stdio \
            -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
            -kernel "$image/vmlinux" -initrd "$image/initramfs.gz" \
            -append "console=ttyS0 quiet panic=-1 no_timer_check vbd_mode=live vbd_files=24" \
            -chardev "socket,id=c0,path=$TMPDIR_TEST/vm1.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=1 2>&1
    }
    local pid=$LIVE_PID
    while IFS= read -r line <&"${LIVE[0]}"; do
        line=${line%$'\r'}
        echo "$line" >> "$log"
        if [ "$line" = "disk-guest: synced" ] && [ $snapped = 0 ]; then
            "$VBDTOOL" snapshot vm1@live --store "$STORE" >/dev/null || fail "vbdtool snapshot while the guest writes"
            snapped=1
            echo "disk-guest-host: snapshot taken" >> "$log"
        fi
    done
    wait "$pid" || rc=$?
    grep '^disk-guest' "$log" | sed "s/^/    live: /"
    if [ $rc -ne 0 ] || [ $snapped = 0 ] || ! grep -q "^disk-guest: PASS live" "$log"; then
        tail -n 40 "$log" | sed 's/^/    /'
        fail "guest live (QEMU status $rc, snapshot taken: $snapped)"
    fi
    echo "vhost-user-blk: live: PASS live in $((SECONDS - start)) s"
}

stop_server() {
    grep "front end disconnected" "$TMPDIR_TEST/serve.log" | sed -n 's/.*\(export=.*\) \[VhostUser\].*/    served: \1/p'
    mv "$TMPDIR_TEST/serve.log" "$TMPDIR_TEST/serve-$SECONDS.log"
    kill -TERM "$SERVER_PID"
    wait "$SERVER_PID" 2>/dev/null || fail "the server did not stop cleanly"
    grep -q "stopped cleanly" "$TMPDIR_TEST"/serve-*.log || fail "the server did not report a clean stop"
}

# 1 and 2: write, then a second QEMU on the same socket verifies. Leases are enforced: QEMU's uid
# is the domain "guests", which holds a write lease on vm1 and is charged for the guests' I/O.
"$VBDTOOL" lease grant vm1 --domain guests --mode write --duration 30m --store "$STORE" >/dev/null
launch_server "$TMPDIR_TEST/serve.log" --unix "$TMPDIR_TEST/nbd.sock" --vhost-user-blk "$TMPDIR_TEST/vm1.sock=vm1" \
    --enforce-leases --peer-domain "uid:$(id -u)=guests"
# Two vCPUs: the guest drives both queues (one per CPU).
CPUS=2 boot write write 1 "$TMPDIR_TEST/vm1.sock"
boot reconnect verify 1 "$TMPDIR_TEST/vm1.sock"
[ "$(grep -c 'front end connected' "$TMPDIR_TEST/serve.log")" -eq 2 ] || fail "expected two front-end connections on vm1.sock"

# 4 (first, on the disk as write left it): snapshot while serving, and its share.
"$VBDTOOL" snapshot vm1@done --store "$STORE" >/dev/null
"$VBDTOOL" share vm1@done vm2 --store "$STORE" >/dev/null
# 3: a snapshot while the guest writes, and a share of it.
boot_live
"$VBDTOOL" share vm1@live vm3 --store "$STORE" >/dev/null
usage=$("$VBDTOOL" domain stats --json --store "$STORE" | jq -c '.domains[] | select(.domain == "guests") | .usage | {bytesWritten, bytesRead, bytesDiscarded, failedOperations}')
echo "vhost-user-blk: charged to domain guests: $usage"
[ "$(echo "$usage" | jq '.bytesWritten')" -gt $((40 << 20)) ] || fail "the guests' writes were not charged to their domain"
stop_server
# This server schedules I/O (mClock, two device slots): the guests' requests wait for their slots
# in the queues the NBD clients use.
launch_server "$TMPDIR_TEST/serve.log" --unix "$TMPDIR_TEST/nbd.sock" --schedule --device-slots 2 \
    --vhost-user-blk "$TMPDIR_TEST/vm2.sock=vm2" --vhost-user-blk "$TMPDIR_TEST/done.sock=vm1@done" \
    --vhost-user-blk "$TMPDIR_TEST/vm3.sock=vm3"
boot recover recover 1 "$TMPDIR_TEST/vm3.sock"
boot snapshot verify 2 "$TMPDIR_TEST/vm2.sock" "$TMPDIR_TEST/done.sock"
tr -d '\r' < "$TMPDIR_TEST/snapshot.log" | grep -q "^disk-guest: verified /dev/vda (read-only 0)" || fail "the share vm2 was not writable in the guest"
tr -d '\r' < "$TMPDIR_TEST/snapshot.log" | grep -q "^disk-guest: verified /dev/vdb (read-only 1)" || fail "the snapshot was not read-only in the guest"
stop_server

# 5: boot storm on a fresh server (an empty cache).
storm=(storm1 storm2 storm3 storm4)
args=()
for vm in "${storm[@]}"; do
    "$VBDTOOL" share vm1@done "$vm" --store "$STORE" >/dev/null
    args+=(--vhost-user-blk "$TMPDIR_TEST/$vm.sock=$vm")
done
launch_server "$TMPDIR_TEST/serve.log" --unix "$TMPDIR_TEST/nbd.sock" --cache-size 512M "${args[@]}"
read_before=$("$VBDTOOL" domain stats --json --store "$STORE" | jq '[.domains[].usage.bytesRead] | add // 0')
pids=()
for vm in "${storm[@]}"; do
    boot "$vm" verify 1 "$TMPDIR_TEST/$vm.sock" &
    pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || fail "a storm guest failed"; done
stats=$("$VBDTOOL" stats --json --store "$STORE")
read_after=$("$VBDTOOL" domain stats --json --store "$STORE" | jq '[.domains[].usage.bytesRead] | add // 0')
per_guest=$(( (read_after - read_before) / ${#storm[@]} ))
held=$(echo "$stats" | jq '.cache.bytesHeld')
echo "vhost-user-blk: storm: ${#storm[@]} guests read $((read_after - read_before)) bytes ($per_guest each); cache holds $held bytes in $(echo "$stats" | jq '.cache.entries') blocks, $(echo "$stats" | jq '.cache.hits') hits, $(echo "$stats" | jq '.cache.misses') misses, saved by sharing $(echo "$stats" | jq '.cache.bytesSavedBySharing') bytes"
[ "$per_guest" -gt $((16 << 20)) ] || fail "each storm guest should have read its 17 files (read $per_guest bytes)"
# One copy, not four: the cache holds less than twice what one guest read.
[ "$held" -lt $((2 * per_guest)) ] || fail "the cache holds $held bytes for guests that read $per_guest bytes each: more than one copy"
stop_server

# 6: the store is consistent.
"$VBDTOOL" fsck --store "$STORE" > "$TMPDIR_TEST/fsck.log" 2>&1 || { cat "$TMPDIR_TEST/fsck.log"; fail "vbdtool fsck"; }
echo "vhost-user-blk: PASS"
