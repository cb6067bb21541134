#!/usr/bin/env bash
# qemu-io pattern writes/reads and qemu-img convert of a qcow2 into an export, then compare.
source "$(dirname "$0")/nbd-functions.sh"
requires qemu-io qemu-img nbdinfo
requires_vbdtool_serve
make_store 64M
start_server

# qemu-io exits 0 even when a command fails (it prints the error): check both.
out=$(qemu-io -f raw -c "write -P 0x3c 0 1M" -c "write -P 0x81 4M 512k" -c "write -z 4M 64k" -c flush "$(uri vol)" 2>&1) \
    || fail "qemu-io write exited $?: $out"
grep -qi "error\|failed" <<<"$out" && fail "qemu-io write: $out"
out=$(qemu-io -f raw -r -c "read -P 0x3c 0 1M" -c "read -P 0 4M 64k" -c "read -P 0x81 4160k 448k" -c "read -P 0 8M 1M" \
    "$(uri vol)" 2>&1) || fail "qemu-io read exited $?: $out"
grep -qi "error\|failed" <<<"$out" && fail "qemu-io read: $out"
# The check itself can fail: a wrong pattern is reported.
out=$(qemu-io -f raw -r -c "read -P 0x3d 0 4k" "$(uri vol)" 2>&1) || true
grep -q "Pattern verification failed" <<<"$out" || fail "a wrong pattern was not reported: $out"

img="$TMPDIR_TEST/source.qcow2"
qemu-img create -f qcow2 "$img" 16M >/dev/null || fail "qemu-img create"
out=$(qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x22 5M 3M" "$img" 2>&1) || fail "qemu-io qcow2 write exited $?: $out"
grep -qi "error\|failed" <<<"$out" && fail "qemu-io qcow2 write: $out"
qemu-img convert -n -f qcow2 -O raw "$img" "$(uri vol)" || fail "qemu-img convert"
qemu-img compare -f qcow2 -F raw "$img" "$(uri vol)" || fail "qemu-img compare"
# And compare can fail: one byte changed in the export makes it report a difference (exit 1).
qemu-io -f raw -c "write -P 0xff 5M 512" "$(uri vol)" >/dev/null || fail "qemu-io write 5M"
status=0; qemu-img compare -q -f qcow2 -F raw "$img" "$(uri vol)" || status=$?
[ "$status" = 1 ] || fail "qemu-img compare after a change exited $status, expected 1"
echo PASS
