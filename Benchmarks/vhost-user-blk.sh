#!/usr/bin/env bash
# A QEMU guest (TCG) measures its disk: 4 KiB O_DIRECT writes then reads, one at a time
# (scripts/disk-guest-init.sh, vbd_mode=bench), on three back ends of the same guest:
#   vbd-vhost  vbdtool serve --vhost-user-blk (a fresh volume)
#   qsd-vhost  qemu-storage-daemon's vhost-user-blk export of a raw file (the issue's reference)
#   vbd-nbd    vbdtool serve over NBD on a unix socket, QEMU's NBD client under virtio-blk-pci
# and prints per back end the guest's elapsed time, operations per second and the server's CPU
# time per request (utime + stime of the server process over the run / requests).
#   Benchmarks/vhost-user-blk.sh                 # VBDTOOL defaults to .build/release/vbdtool
#   VBDTOOL=$PWD/.build/debug/vbdtool OPS=1024 Benchmarks/vhost-user-blk.sh
# TCG emulates the guest's CPU, so absolute rates are far below KVM's; the ratios between back ends
# in the same guest are what it shows. Bounded: each guest has 300 s.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
VBDTOOL=${VBDTOOL:-$root/.build/release/vbdtool}
OPS=${OPS:-4096}
SERVERS=${SERVERS:-"vbd-vhost qsd-vhost vbd-nbd"}
image=${DISK_GUEST_DIR:-$root/.build/disk-guest}
bash "$root/scripts/disk-guest-image.sh" "$image" >/dev/null 2>&1
work=$(mktemp -d /tmp/vbd-vhost-bench.XXXXXX)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

wait_for_socket() {
    for _ in $(seq 1 300); do [ -S "$1" ] && return 0; sleep 0.1; done
    echo "no socket $1" >&2; exit 1
}

# guest DISK_ARGS...: boots the bench guest with the given disk options; prints its bench lines.
guest() {
    timeout -k 5 300 qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -machine q35 -m 256 -smp 1 \
        -nodefaults -display none -no-reboot -serial stdio \
        -object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem \
        -kernel "$image/vmlinux" -initrd "$image/initramfs.gz" \
        -append "console=ttyS0 quiet panic=-1 no_timer_check vbd_mode=bench vbd_ops=$OPS" "$@" 2>&1 \
        | tr -d '\r' | grep '^disk-guest: bench'
}

run() {
    local name=$1 before after lines
    case $name in
        vbd-vhost|vbd-nbd)
            export VBD_STORE=$work/$name-store
            "$VBDTOOL" init >/dev/null
            "$VBDTOOL" create vol --size 256M >/dev/null
            "$VBDTOOL" serve --unix "$work/nbd.sock" --vhost-user-blk "$work/vhost.sock=vol" >"$work/$name.log" 2>&1 &
            server_pid=$!
            wait_for_socket "$work/vhost.sock"; wait_for_socket "$work/nbd.sock" ;;
        qsd-vhost)
            truncate -s 256M "$work/raw.img"
            qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$work/raw.img,cache.direct=on" \
                --blockdev driver=raw,node-name=d,file=f \
                --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$work/vhost.sock,writable=on,num-queues=1" \
                >"$work/$name.log" 2>&1 &
            server_pid=$!
            wait_for_socket "$work/vhost.sock" ;;
    esac
    before=$(cpu_ticks "$server_pid")
    if [ "$name" = vbd-nbd ]; then
        lines=$(guest -blockdev "driver=nbd,node-name=d,server.type=unix,server.path=$work/nbd.sock,export=vol,cache.direct=on" \
                      -device virtio-blk-pci,drive=d)
    else
        lines=$(guest -chardev "socket,id=c,path=$work/vhost.sock" -device vhost-user-blk-pci,chardev=c,num-queues=1)
    fi
    after=$(cpu_ticks "$server_pid")
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
    rm -f "$work/vhost.sock" "$work/nbd.sock"
    local cpu_us=$(( (after - before) * 1000000 / ticks ))
    echo "$lines" | while read -r _ _ job ops _ ms _; do
        printf '%-10s %-16s %6d ops %7d ms %8.0f ops/s\n' "$name" "$job" "$ops" "$ms" "$(awk -v o="$ops" -v m="$ms" 'BEGIN { print (m > 0 ? o * 1000 / m : 0) }')"
    done
    printf '%-10s server CPU %d us over %d requests: %.1f us per request\n' "$name" "$cpu_us" $((2 * OPS)) \
        "$(awk -v c="$cpu_us" -v n="$OPS" 'BEGIN { print c / (2 * n) }')"
}

for s in $SERVERS; do run "$s"; done
