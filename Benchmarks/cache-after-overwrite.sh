#!/usr/bin/env bash
# Does the block cache keep what was written? One server with the default cache: a 1 GiB volume
# filled with 1 MiB writes, then RUNTIME (default 8) s of 1 MiB overwrites, then 5 s of 4 KiB QD16
# random reads; the cache's line of `vbdtool stats` after each step and the reads' IOPS.
#   VBDTOOL=.build/release/vbdtool Benchmarks/cache-after-overwrite.sh
set -euo pipefail
vbdtool=${VBDTOOL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/vbdtool}
runtime=${RUNTIME:-8}
work=$(mktemp -d "${TMPDIR:-/tmp}/vbd-cache-overwrite.XXXXXX")
server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$vbdtool" init --store "$work/s" >/dev/null
"$vbdtool" create --store "$work/s" vol --size 1G >/dev/null
"$vbdtool" serve --store "$work/s" --unix "$work/sock" --log-level warning 2>"$work/err" &
server=$!
for _ in $(seq 1 600); do [ -S "$work/sock" ] && nbdinfo --size "nbd+unix:///vol?socket=$work/sock" >/dev/null 2>&1 && break; sleep 0.05; done
job() {  # prints read and write IOPS
    fio --name=j --ioengine=nbd --uri="nbd+unix:///vol?socket=$work/sock" --refill_buffers=1 \
        --buffer_compress_percentage=50 --buffer_compress_chunk=4096 --output-format=terse --terse-version=3 "$@" |
        awk -F';' '{ printf "  read %s IOPS, write %s IOPS\n", $8, $49 }'
}
cache() { "$vbdtool" stats --store "$work/s" | grep '^cache'; }
echo "fill (1 MiB writes):"; job --rw=write --bs=1M --iodepth=8 --size=1G; cache
echo "${runtime} s of 1 MiB overwrites:"; job --rw=write --bs=1M --iodepth=8 --size=1G --time_based=1 --runtime="$runtime"; cache
echo "5 s of 4 KiB QD16 random reads:"; job --rw=randread --bs=4k --iodepth=16 --time_based=1 --runtime=5; cache
