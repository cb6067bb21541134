#!/usr/bin/env bash
# A backend killed under a running guest and started again (docs/VHOST-USER.md, "Requests in
# flight across a restart of vbd"): every write the guest saw complete must survive the kill,
# flushed or not (docs/INVARIANTS.md 2), or the guest, which did not crash, finds its file system
# broken.
#  1. A guest makes an ext4 file system on a volume served over vhost-user-blk and writes files
#     and their checksums (scripts/disk-guest-init.sh, mode write).
#  2. A second guest (mode live, -chardev ...,reconnect=1) writes and syncs files; when it says
#     "synced" the host kills the backend with SIGKILL while the guest writes on, and starts a new
#     one on the same socket. QEMU reconnects and passes the inflight area (INFLIGHT_SHMFD) back;
#     the guest must finish its writes and its own e2fsck must pass.
#  3. A third guest verifies the first guest's files; `vbdtool fsck` checks the store.
#   VBDTOOL=.build/debug/vbdtool bash IntegrationTests/test-vhost-user-blk-restart.sh          # vbd
#   BACKEND=qsd bash IntegrationTests/test-vhost-user-blk-restart.sh    # qemu-storage-daemon, raw file
# qemu-storage-daemon passes because a completed write sits in the host's page cache and survives
# the process; vbd passes because it acknowledges a write only once the journal records naming
# its data are written to the journal file (not synced), which the page cache keeps just as well.
# Bounded: each guest runs under `timeout 180` (TCG boots take about a minute here).
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
source "$here/nbd-functions.sh"
requires qemu-system-x86_64 mke2fs e2fsck cpio xz busybox depmod
requires_vbdtool_serve

image=${DISK_GUEST_DIR:-$root/.build/disk-guest}
bash "$root/scripts/disk-guest-image.sh" "$image"

fail() { echo "test-vhost-user-blk-restart: FAIL: $*"; exit 1; }
BACKEND=${BACKEND:-vbd}
make_store 256M
sock=$TMPDIR_TEST/vm.sock

# start_backend N: vbdtool serve (or qemu-storage-daemon on a raw file) on $sock; SERVER_PID.
start_backend() {
    if [ "$BACKEND" = qsd ]; then
        [ -f "$TMPDIR_TEST/raw.img" ] || truncate -s 256M "$TMPDIR_TEST/raw.img"
        rm -f "$sock"
        qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$TMPDIR_TEST/raw.img" \
            --blockdev driver=raw,node-name=d,file=f \
            --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$sock,writable=on,num-queues=1" \
            >> "$TMPDIR_TEST/serve-$1.log" 2>&1 &
        SERVER_PID=$!
        cleanup_fn "kill $SERVER_PID 2>/dev/null"
        for _ in $(seq 1 300); do [ -S "$sock" ] && return 0; sleep 0.1; done
        fail "qemu-storage-daemon did not listen"
    fi
    launch_server "$TMPDIR_TEST/serve-$1.log" --unix "$TMPDIR_TEST/nbd-$1.sock" --vhost-user-blk "$sock=vol"
}

# qemu MODE: the guest on $sock, reconnecting to it every second while it is gone.
qemu() {
    exec timeout -k 5 180 qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -machine q35 -m 256 -smp 1 \
        -nodefaults -display none -no-reboot -serial stdio \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$image/vmlinux" -initrd "$image/initramfs.gz" \
        -append "console=ttyS0 quiet panic=-1 no_timer_check vbd_mode=$1 vbd_disks=1 vbd_files=24" \
        -chardev "socket,id=c0,path=$sock,reconnect=1" -device vhost-user-blk-pci,chardev=c0,num-queues=1 2>&1
}

# guest NAME MODE [restart]: boots one guest; with "restart", kills the server on the guest's
# "synced" line and starts the next one. Fails unless the guest prints "disk-guest: PASS MODE".
guest() {
    local name=$1 mode=$2 restart=${3:-} log=$TMPDIR_TEST/$1.log line restarted=0 rc=0 start=$SECONDS
    coproc GUEST { qemu "$mode"; }
    local pid=$GUEST_PID
    while IFS= read -r line <&"${GUEST[0]}"; do
        line=${line%$'\r'}
        echo "$line" >> "$log"
        if [ -n "$restart" ] && [ "$line" = "disk-guest: synced" ] && [ $restarted = 0 ]; then
            kill -KILL "$SERVER_PID"
            wait "$SERVER_PID" 2>/dev/null || true   # 137: killed
            echo "disk-guest-host: server killed" >> "$log"
            start_backend 2
            echo "disk-guest-host: server restarted" >> "$log"
            restarted=1
        fi
    done
    wait "$pid" || rc=$?
    grep '^disk-guest' "$log" | sed "s/^/    $name: /"
    if [ $rc -ne 0 ] || ! grep -q "^disk-guest: PASS $mode" "$log" || { [ -n "$restart" ] && [ $restarted = 0 ]; }; then
        tail -n 40 "$log" | sed 's/^/    /'
        tail -n 20 "$TMPDIR_TEST"/serve*.log | sed 's/^/    serve: /'
        fail "guest $name (QEMU status $rc, restarted: $restarted)"
    fi
    echo "test-vhost-user-blk-restart: $name: PASS $mode in $((SECONDS - start)) s"
}

start_backend 1
guest write write
guest live live restart
if [ "$BACKEND" = vbd ]; then
    grep -q "front end connected" "$TMPDIR_TEST/serve-2.log" || fail "QEMU did not reconnect to the restarted server"
    echo "test-vhost-user-blk-restart: after the restart: $(grep -o 'serving again [0-9]* requests' "$TMPDIR_TEST/serve-2.log" || echo 'no request was in flight')"
fi
guest verify verify
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || fail "the restarted backend did not stop cleanly"
[ "$BACKEND" = qsd ] && { echo "test-vhost-user-blk-restart: PASS (qemu-storage-daemon)"; exit 0; }
"$VBDTOOL" fsck --store "$STORE" > "$TMPDIR_TEST/fsck.log" 2>&1 || { cat "$TMPDIR_TEST/fsck.log"; fail "vbdtool fsck"; }
echo "test-vhost-user-blk-restart: PASS"
