#!/usr/bin/env bash
# qemu-io pattern writes/reads and qemu-img convert of a qcow2 into an export, then compare.
source "$(dirname "$0")/nbd-functions.sh"
requires qemu-io qemu-img nbdinfo
requires_vbdtool_serve
make_store 64M
start_server

qemu-io -f raw -c "write -P 0x3c 0 1M" -c "write -P 0x81 4M 512k" -c "write -z 4M 64k" -c flush "$(uri vol)" \
    | grep -q error && fail "qemu-io write"
out=$(qemu-io -f raw -r -c "read -P 0x3c 0 1M" -c "read -P 0 4M 64k" -c "read -P 0x81 4160k 448k" "$(uri vol)")
echo "$out" | grep -q "Pattern verification failed" && fail "pattern mismatch: $out"

img="$TMPDIR_TEST/source.qcow2"
qemu-img create -f qcow2 "$img" 16M >/dev/null
qemu-io -f qcow2 -c "write -P 0x11 0 1M" -c "write -P 0x22 5M 3M" "$img" >/dev/null
qemu-img convert -n -f qcow2 -O raw "$img" "$(uri vol)" || fail "qemu-img convert"
qemu-img compare -f qcow2 -F raw "$img" "$(uri vol)" || fail "qemu-img compare"
echo PASS
