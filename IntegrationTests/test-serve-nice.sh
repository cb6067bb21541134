#!/usr/bin/env bash
# `nice -n 5 vbdtool serve`: every thread that serves NBD requests (NIO's event loops "NIO-ELT-*",
# the read and write pools "TP-*") runs at nice 5, not at the nice value of the GCD thread that
# started them (0): a benchmark or an operator that sets the server's priority gets it. With
# VBD_IO_THREAD_SLICE_US=100 the event loops and the read pool ask for 100 µs scheduler slices and
# the write pool does not (checked where the kernel shows slices: se.slice in /proc/.../sched).
source "$(dirname "$0")/nbd-functions.sh"
requires nbdinfo qemu-io
requires_vbdtool_serve
make_store 16M
SOCK="$TMPDIR_TEST/nbd.sock"
VBD_IO_THREAD_SLICE_US=100 nice -n 5 "$VBDTOOL" serve --store "$STORE" --unix "$SOCK" > "$TMPDIR_TEST/serve.log" 2>&1 &
pid=$!
cleanup_fn "kill $pid 2>/dev/null; wait $pid 2>/dev/null"
for _ in $(seq 1 600); do
    [ -S "$SOCK" ] && nbdinfo --size "$(uri vol)" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || fail "server exited"
    sleep 0.1
done
qemu-io -f raw -c "write -P 0x5a 0 64k" -c "read -P 0x5a 0 64k" "$(uri vol)" >/dev/null || fail "qemu-io"
serving=0
for task in /proc/$pid/task/*; do
    name=$(cat "$task/comm" 2>/dev/null) || continue
    case "$name" in NIO-ELT-*|TP-*) ;; *) continue ;; esac
    nice=$(awk '{ print $19 }' "$task/stat")
    [ "$nice" = 5 ] || fail "thread $name ($(basename "$task")) runs at nice $nice, not 5"
    serving=$((serving + 1))
done
[ "$serving" -ge 3 ] || fail "found $serving serving threads"
if grep -q '^se.slice' "/proc/$pid/sched" 2>/dev/null; then
    short=0 long=0
    for task in /proc/$pid/task/*; do
        case "$(cat "$task/comm" 2>/dev/null)" in NIO-ELT-1-*|TP-*) ;; *) continue ;; esac
        slice=$(awk '$1 == "se.slice" { print $3 }' "$task/sched")
        if [ "$slice" = 100000 ]; then short=$((short + 1)); else long=$((long + 1)); fi
    done
    # Event loops plus the read pool ask; the write pool (as many threads as the read pool) does not.
    [ "$short" -gt "$long" ] && [ "$long" -ge 1 ] || fail "short slices on $short threads, $long without: expected the event loops and read pool only"
fi
echo PASS
