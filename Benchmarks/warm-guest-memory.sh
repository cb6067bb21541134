#!/usr/bin/env bash
# Touches the machine's free memory once per boot, so that benchmarks do not pay for the first
# touch of memory the hypervisor has not backed yet.
#
#   Benchmarks/warm-guest-memory.sh          # once per boot; later calls return at once
#   WARM_MEMORY=0 Benchmarks/nbd-compare.sh  # the benchmark scripts skip it
#
# On this VM (firecracker, 24 GiB) the first write of a page the guest never used costs a host
# fault: writing a new 1 GiB file ran at 200-270 MB/s after a boot and at 2 GB/s once that memory
# had been touched and freed (Benchmarks/README.md, "Issue 14, fifth round"). vbd writes new chunks
# into new pages of its data file, where nbdkit-file overwrites pages it already has, so an
# unwarmed run charged vbd alone for the host. Touches all free memory but 2 GiB, at most 20 GiB,
# holding it at once so that the kernel cannot hand the same pages out twice; then frees it.
set -euo pipefail
[ "${WARM_MEMORY:-1}" = 1 ] || exit 0
marker="/tmp/vbd-memory-warmed-$(cat /proc/sys/kernel/random/boot_id)"
[ -e "$marker" ] && exit 0
free_kib=$(awk '/^MemFree:/ { print $2 }' /proc/meminfo)
gib=$(( free_kib / 1048576 - 2 ))
[ "$gib" -gt 20 ] && gib=20
if [ "$gib" -gt 0 ]; then
    echo "warm-guest-memory: touching ${gib} GiB once for this boot" >&2
    /usr/bin/python3 - "$gib" <<'PY'
import sys
held = []
for _ in range(int(sys.argv[1])):
    block = bytearray(1 << 30)
    block[::4096] = b"\x01" * len(range(0, len(block), 4096))
    held.append(block)
PY
fi
touch "$marker"
