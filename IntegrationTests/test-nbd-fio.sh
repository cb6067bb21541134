#!/usr/bin/env bash
# fio with ioengine=nbd writing and verifying random 4k blocks.
source "$(dirname "$0")/nbd-functions.sh"
requires fio nbdinfo
requires_vbdtool_serve
fio --enghelp=nbd >/dev/null 2>&1 || { echo "SKIP: fio has no nbd engine"; exit 77; }
make_store 64M
start_server
timeout 300 fio --name=verify --ioengine=nbd --uri="$(uri vol)" --rw=randwrite --bs=4k --size=32M \
    --iodepth=16 --verify=crc32c --do_verify=1 --verify_fatal=1 --runtime=120 > "$TMPDIR_TEST/fio.log" 2>&1 \
    || { cat "$TMPDIR_TEST/fio.log"; fail "fio"; }
echo PASS
