#!/usr/bin/env bash
# One QEMU guest (TCG, memory-backend-memfd,share=on) measures its virtio-blk disk with fio
# (scripts/disk-guest-init.sh, vbd_mode=fio: libaio, O_DIRECT, 4 KiB random read and random write
# at queue depth 1 and 32, each job time-bounded) on three back ends, one after the other, in one run:
#   qsd-vhost  qemu-storage-daemon's vhost-user-blk export of a raw file (the issue's reference)
#   vbd-vhost  vbdtool serve --vhost-user-blk (a fresh volume)
#   vbd-nbd    vbdtool serve over NBD on a unix socket, QEMU's NBD client under virtio-blk-pci
# Per job and back end it reports the guest's IOPS, the ratios vbd-vhost/qsd-vhost and
# vbd-vhost/vbd-nbd, the server's CPU time per request (utime + stime of the server process from
# /proc/PID/stat, sampled when the guest prints the job's start and end, over fio's completed
# requests), the guest's own CPU use as fio saw it and the interrupts the guest took from the disk
# per request (its request queues' lines in the guest's /proc/interrupts, read before and after each
# job); the load average beside each back end.
#   Benchmarks/vhost-user-blk.sh                      # VBDTOOL defaults to .build/release/vbdtool
#   RUNTIME=10 SERVERS="vbd-vhost qsd-vhost" Benchmarks/vhost-user-blk.sh
#   PROFILE="randread-4k-qd1 randwrite-4k-qd32" Benchmarks/vhost-user-blk.sh
#       # perf record -g of each server during those jobs: $OUT/perf-SERVER-JOB.data
#   TRACE="randread-4k-qd1" TRACE_SECONDS=3 Benchmarks/vhost-user-blk.sh
#       # the whole machine's scheduler events and read/write/poll system calls for TRACE_SECONDS
#       # from each such job's start: $OUT/trace-SERVER-JOB.data (perf sched timehist -i ...,
#       # Benchmarks/vhost-user-blk-trace.py: kick -> pickup -> completion -> call per request)
# OUT (default a new /tmp/vbd-vhost-bench.*) keeps the fio JSON reports, the server logs and the
# profiles. TCG emulates the guest's CPU, so absolute rates are far below KVM's and the guest's
# CPU may be what limits a job; the CPU per request on the server side does not depend on that.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
VBDTOOL=${VBDTOOL:-$root/.build/release/vbdtool}
RUNTIME=${RUNTIME:-20}
SPAN_MIB=${SPAN_MIB:-128}
SERVERS=${SERVERS:-"qsd-vhost vbd-vhost vbd-nbd"}
PROFILE=${PROFILE:-}
TRACE=${TRACE:-}
TRACE_SECONDS=${TRACE_SECONDS:-3}
# JOBS: a subset of the four jobs (for A/B runs of one of them); the tables need all four.
JOBS=${JOBS:-}
[ -x "$VBDTOOL" ] || { echo "vhost-user-blk.sh: no $VBDTOOL (swift build -c release)" >&2; exit 1; }
image=${DISK_GUEST_DIR:-$root/.build/disk-guest-fio}
bash "$root/scripts/disk-guest-image.sh" "$image" --fio >/dev/null 2>&1
OUT=${OUT:-$(mktemp -d /tmp/vbd-vhost-bench.XXXXXX)}
mkdir -p "$OUT"
"$here/warm-guest-memory.sh"   # once per boot (WARM_MEMORY=0 skips it)
work=$(mktemp -d /tmp/vbd-vhost-work.XXXXXX)
server_pid=""
cleanup() { [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
ticks=$(getconf CLK_TCK)
# utime + stime in clock ticks (fields 14 and 15; the command name, field 2, has no spaces here).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
guest_mib=512

wait_for_socket() {
    for _ in $(seq 1 300); do [ -S "$1" ] && return 0; sleep 0.1; done
    echo "vhost-user-blk.sh: no socket $1" >&2; exit 1
}

# guest NAME DISK_ARGS...: boots the fio guest on the given disk and follows its console: the
# server's CPU ticks at each job's start and end go to $OUT/NAME.cpu, fio's reports to $OUT/NAME.JOB.json.
guest() {
    local name=$1; shift
    local perf_pid="" line job result=FAIL
    : > "$OUT/$name.cpu"; : > "$OUT/$name.console"; : > "$OUT/$name.irq"
    while IFS= read -r line; do
        line=${line%$'\r'}
        echo "$line" >> "$OUT/$name.console"
        case $line in
            "disk-guest: job "*" start")
                job=${line#disk-guest: job }; job=${job% start}
                : > "$OUT/$name.$job.json"
                if [[ " $PROFILE " == *" $job "* ]]; then
                    perf record -q -g -p "$server_pid" -o "$OUT/perf-$name-$job.data" >/dev/null 2>&1 &
                    perf_pid=$!
                fi
                if [[ " $TRACE " == *" $job "* ]]; then
                    # Bounded by TRACE_SECONDS (sleep), started after the job began.
                    perf record -q -a -o "$OUT/trace-$name-$job.data" \
                        -e sched:sched_switch,sched:sched_wakeup,sched:sched_waking,sched:sched_migrate_task \
                        -e syscalls:sys_enter_write,syscalls:sys_exit_write,syscalls:sys_enter_read,syscalls:sys_exit_read \
                        -e syscalls:sys_enter_ppoll,syscalls:sys_exit_ppoll,syscalls:sys_enter_poll,syscalls:sys_exit_poll \
                        -e syscalls:sys_enter_pread64,syscalls:sys_enter_preadv,syscalls:sys_enter_pwritev,syscalls:sys_enter_pwrite64 \
                        -e syscalls:sys_enter_futex,syscalls:sys_exit_futex,syscalls:sys_enter_io_uring_enter \
                        -- sleep "$TRACE_SECONDS" >/dev/null 2>&1 &
                fi
                echo "$job start $(cpu_ticks "$server_pid")" >> "$OUT/$name.cpu" ;;
            "disk-guest: job "*" end")
                echo "$job end $(cpu_ticks "$server_pid")" >> "$OUT/$name.cpu"
                if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; perf_pid=""; fi ;;
            "disk-guest: json "*) echo "${line#disk-guest: json }" >> "$OUT/$name.$job.json" ;;
            "disk-guest: interrupts "*) echo "${line#disk-guest: interrupts }" >> "$OUT/$name.irq" ;;
            "disk-guest: PASS fio") result=PASS ;;
            "disk-guest: "*) echo "$name: ${line#disk-guest: }" >&2 ;;
        esac
    done < <(timeout -k 5 $((120 + 5 * RUNTIME * 3)) qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -machine q35 \
                 -m $guest_mib -smp 1 -nodefaults -display none -no-reboot -serial stdio \
                 -object memory-backend-memfd,id=mem,size=${guest_mib}M,share=on -numa node,memdev=mem \
                 -kernel "$image/vmlinux" -initrd "$image/initramfs.gz" \
                 -append "console=ttyS0 quiet panic=-1 no_timer_check vbd_mode=fio vbd_runtime=$RUNTIME vbd_span=$SPAN_MIB${JOBS:+ vbd_jobs=${JOBS// /,}}" \
                 "$@" 2>&1)
    [ "$result" = PASS ] || { echo "vhost-user-blk.sh: the $name guest did not pass (its console: $OUT/$name.console)" >&2; exit 1; }
}

run() {
    local name=$1
    case $name in
        vbd-vhost|vbd-nbd)
            export VBD_STORE=$work/$name-store
            "$VBDTOOL" init >/dev/null
            "$VBDTOOL" create vol --size 256M >/dev/null
            "$VBDTOOL" serve --unix "$work/nbd.sock" --vhost-user-blk "$work/vhost.sock=vol" >"$OUT/$name.log" 2>&1 &
            server_pid=$!
            wait_for_socket "$work/vhost.sock"; wait_for_socket "$work/nbd.sock" ;;
        qsd-vhost)
            # The raw file through the host's page cache, as vbd's store files are.
            truncate -s 256M "$work/raw.img"
            qemu-storage-daemon --blockdev "driver=file,node-name=f,filename=$work/raw.img" \
                --blockdev driver=raw,node-name=d,file=f \
                --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$work/vhost.sock,writable=on,num-queues=1" \
                >"$OUT/$name.log" 2>&1 &
            server_pid=$!
            wait_for_socket "$work/vhost.sock" ;;
        *) echo "vhost-user-blk.sh: unknown server $name" >&2; exit 1 ;;
    esac
    cut -d' ' -f1-3 /proc/loadavg > "$OUT/$name.load"
    echo "$server_pid" > "$OUT/$name.pid"
    if [ "$name" = vbd-nbd ]; then
        guest "$name" -blockdev "driver=nbd,node-name=d,server.type=unix,server.path=$work/nbd.sock,export=vol" \
                      -device virtio-blk-pci,drive=d
    else
        guest "$name" -chardev "socket,id=c,path=$work/vhost.sock" -device vhost-user-blk-pci,chardev=c,num-queues=1
    fi
    cut -d' ' -f1-3 /proc/loadavg >> "$OUT/$name.load"
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=""
    rm -rf "$work/vhost.sock" "$work/nbd.sock" "$work/raw.img" "$work/$name-store"
}

echo "vhost-user-blk.sh: $(date -u +%FT%TZ), $RUNTIME s per job over $SPAN_MIB MiB, reports in $OUT" >&2
for s in $SERVERS; do run "$s"; done
python3 "$here/vhost-user-blk-report.py" "$OUT" "$ticks" $SERVERS ${JOBS:+--jobs $JOBS}
