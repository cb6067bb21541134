#!/usr/bin/env bash
# A real power cut (issue 18, item 5). The store's crash writer (vbd-sim --crash-writer) runs inside a
# QEMU guest (TCG) on an ext4 disk that is a host file opened with cache=none, so nothing the guest
# has not flushed to the virtual disk survives in a host page cache. The writer prints "flushed N" on
# the serial console after each store flush returns, and "wrote N" after each write returns; after a
# seeded number of flushed lines and then a seeded number (0-6) of written lines the host kills QEMU
# with SIGKILL, mid-stream between flushed and unflushed writes. The next boot opens the
# store, checks that every write a flush acknowledged is there (and nothing torn or misplaced), runs
# the store's fsck, prints PASS or FAIL, and writes on. A last boot only verifies; then e2fsck checks
# the ext4 image on the host.
#   test-power-cut.sh [--cuts N] [--seed S] [--keep]
# Defaults: 3 cuts (the make test budget); make power-cut-long runs 25. The seed is printed; rerun
# with the same --seed and --cuts for the same kill points (counted in flushed and written lines).
# Environment: VBD_SIM: a vbd-sim with the Swift runtime linked in (default: built by
# scripts/power-cut-image.sh); POWER_CUT_DIR: where the kernel and initramfs go (default .build/power-cut).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cuts=3
seed=""
keep=0
while [ $# -gt 0 ]; do
    case $1 in
        --cuts) cuts=$2; shift 2 ;;
        --seed) seed=$2; shift 2 ;;
        --keep) keep=1; shift ;;
        *) echo "usage: test-power-cut.sh [--cuts N] [--seed S] [--keep]" >&2; exit 2 ;;
    esac
done
[ -n "$seed" ] || seed=$(( $(od -An -N2 -tu2 /dev/urandom) + 1 ))
echo "power-cut: seed $seed, $cuts cuts (replay: IntegrationTests/test-power-cut.sh --seed $seed --cuts $cuts)"
RANDOM=$seed

for tool in qemu-system-x86_64 mkfs.ext4 e2fsck cpio xz busybox depmod; do
    command -v "$tool" >/dev/null || { echo "power-cut: FAIL: $tool is missing (scripts/setup.sh installs it)"; exit 1; }
done
image=${POWER_CUT_DIR:-$root/.build/power-cut}
bash "$root/scripts/power-cut-image.sh" "$image" ${VBD_SIM:+"$VBD_SIM"}

# Under the build directory, not /tmp: QEMU's cache=none needs O_DIRECT, which tmpfs refuses.
work=$(mktemp -d "$image/run.XXXXXX")
qemu_pid=""
cleanup() {
    [ -n "$qemu_pid" ] && kill -KILL "$qemu_pid" 2>/dev/null
    if [ "$keep" = 1 ]; then echo "power-cut: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT   # so that a timeout still runs cleanup and kills QEMU
# The disk under test, and the floors: what must survive, kept off that disk (PowerCutCheck.swift).
truncate -s 256M "$work/disk.img"
mkfs.ext4 -F -q "$work/disk.img"
truncate -s 1M "$work/floors.img"

# no_timer_check: on a loaded host the emulated timer can miss the kernel's boot-time IRQ check,
# which then panics ("IO-APIC + timer doesn't work").
# boot LOG MODE FIRST PREV_FIRST PREV_FLUSHED KILL_AFTER EXTRA_WRITES: runs one guest with its console
# on a pipe; with KILL_AFTER > 0, kills it with SIGKILL once that many "flushed" lines and then
# EXTRA_WRITES "wrote" lines have arrived. Sets last_flushed and last_written to the highest sequence a
# "flushed" or "wrote" line acknowledged (0 for none), cut_made to 1 when this script killed the
# guest, and guest_status to QEMU's exit status.
boot() {
    local log=$1 mode=$2 first=$3 prev_first=$4 prev_flushed=$5 kill_after=$6 extra_writes=$7
    local line seen=0 rc status armed=0 written_since=0
    last_flushed=0
    last_written=0
    coproc GUEST {
        exec qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -machine q35 -m 512 -smp 1 \
            -nodefaults -display none -no-reboot -serial stdio \
            -kernel "$image/vmlinux" -initrd "$image/initramfs.gz" \
            -append "console=ttyS0 quiet panic=-1 no_timer_check vbd_mode=$mode vbd_first=$first vbd_prev_first=$prev_first vbd_prev_flushed=$prev_flushed" \
            -drive "file=$work/disk.img,format=raw,if=none,id=disk,cache=none,aio=threads" -device virtio-blk-pci,drive=disk \
            -drive "file=$work/floors.img,format=raw,if=none,id=floors,cache=none,aio=threads" -device virtio-blk-pci,drive=floors \
            2>&1
    }
    qemu_pid=$GUEST_PID
    local out=${GUEST[0]}
    cut_made=0
    # A guest silent for 10 minutes is hung: the read times out, and it is killed (not counted as a cut).
    while :; do
        status=0
        IFS= read -r -t 600 line <&"$out" || status=$?
        if [ $status -gt 128 ]; then
            echo "power-cut: the guest printed nothing for 600 s" >> "$log"
            kill -KILL "$qemu_pid"
            break
        elif [ $status -ne 0 ]; then
            [ -n "$line" ] && echo "$line" >> "$log"   # the end of the output, maybe a last partial line
            break
        fi
        line=${line%$'\r'}
        echo "$line" >> "$log"
        case $line in
            "flushed "*)
                seen=$((seen + 1))
                last_flushed=${line#flushed }
                [ "$kill_after" -gt 0 ] && [ $seen -ge "$kill_after" ] && armed=1 ;;
            "wrote "*)
                last_written=${line#wrote }
                [ $armed = 1 ] && written_since=$((written_since + 1)) ;;
        esac
        if [ $armed = 1 ] && [ $written_since -ge "$extra_writes" ]; then
            kill -KILL "$qemu_pid"
            cut_made=1
            break
        fi
    done
    # Lines already in the pipe were printed before the cut: their flushes returned, so they count.
    while IFS= read -r line <&"$out"; do
        line=${line%$'\r'}
        echo "$line" >> "$log"
        case $line in
            "flushed "*) last_flushed=${line#flushed } ;;
            "wrote "*) last_written=${line#wrote } ;;
        esac
    done
    rc=0; { wait "$qemu_pid"; } 2>/dev/null || rc=$?   # (quiet: bash reports the killed coproc)
    qemu_pid=""
    guest_status=$rc
}

failed=0
prev_first=0
prev_flushed=0
for ((cut = 1; cut <= cuts; cut++)); do
    first=$((cut * 10000000))
    kill_after=$((RANDOM % 40 + 1))
    extra_writes=$((RANDOM % 7))
    log=$work/boot-$cut.log
    boot "$log" write "$first" "$prev_first" "$prev_flushed" "$kill_after" "$extra_writes"
    verdict=$(grep -E "^power-cut verify: (PASS|FAIL)" "$log" || true)
    if grep -q "^power-cut guest: FAIL" "$log" || grep -q "^power-cut verify: FAIL" "$log"; then
        echo "power-cut: cut $cut: FAIL before writing (seed $seed)"; sed 's/^/    /' "$log" | tail -n 30
        failed=1; break
    fi
    if [ "$cut_made" -ne 1 ]; then
        echo "power-cut: cut $cut: FAIL: the guest ended by itself (status $guest_status) before $kill_after flushes and $extra_writes writes"
        sed 's/^/    /' "$log" | tail -n 30
        failed=1; break
    fi
    echo "power-cut: cut $cut: ${verdict:+${verdict#power-cut verify: } -- }killed after $kill_after flushes and $extra_writes more writes: last flushed write $last_flushed, last acknowledged write $last_written"
    prev_first=$first
    prev_flushed=$last_flushed
done

if [ $failed -eq 0 ]; then
    log=$work/verify.log
    boot "$log" verify 0 "$prev_first" "$prev_flushed" 0 0
    verdict=$(grep -E "^power-cut verify: (PASS|FAIL)" "$log" || true)
    if [ "$guest_status" -ne 0 ] || ! grep -q "^power-cut guest: DONE" "$log" || [[ $verdict != "power-cut verify: PASS"* ]]; then
        echo "power-cut: final verify: FAIL (seed $seed, guest status $guest_status)"; sed 's/^/    /' "$log" | tail -n 30
        failed=1
    else
        echo "power-cut: final verify: ${verdict#power-cut verify: }"
    fi
fi
if [ $failed -eq 0 ]; then
    # The guest unmounted cleanly; ext4 itself must be consistent too.
    if ! e2fsck -fn "$work/disk.img" > "$work/e2fsck.log" 2>&1; then
        echo "power-cut: FAIL: e2fsck found problems in the ext4 image"; sed 's/^/    /' "$work/e2fsck.log" | tail -n 20
        failed=1
    fi
fi
if [ $failed -ne 0 ]; then
    keep=1
    echo "power-cut: FAIL (seed $seed; replay: IntegrationTests/test-power-cut.sh --seed $seed --cuts $cuts)"
    exit 1
fi
echo "power-cut: PASS, $cuts cuts, seed $seed"
