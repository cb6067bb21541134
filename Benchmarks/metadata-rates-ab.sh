#!/usr/bin/env bash
# 4 KiB QD16 random read and write rates on a store kept by metadata-scale.sh (STORE=DIR), with a
# SMALL and a LARGE metadata cache in alternation, two rounds, so that a load that changes during
# the run shows up as a difference between rounds rather than as a ratio.
#   VBDTOOL=.build/release/vbdtool Benchmarks/metadata-rates-ab.sh STORE SMALL_BYTES LARGE_BYTES [SECONDS]
set -u
store=${1:?usage: metadata-rates-ab.sh STORE SMALL_BYTES LARGE_BYTES [SECONDS]}; small=$2; large=$3; secs=${4:-10}
vbdtool=${VBDTOOL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/vbdtool}
sock=$(mktemp -u "${TMPDIR:-/tmp}/vbd-rates.XXXXXX.sock")
# ABBA: round 1 runs the small cache first, round 2 the large one, so that the page cache warming
# up over the run (meta and the data file read from the disk) favours neither.
for round in 1 2; do
  order="$small $large"; [ $round = 2 ] && order="$large $small"
  for size in $order; do
    "$vbdtool" serve --store $store --unix $sock --metadata-cache $size --cache-size 64M --last-chance-size 0 --log-level warning 2>/dev/null &
    pid=$!
    for _ in $(seq 1 200); do [ -S $sock ] && nbdinfo --size "nbd+unix:///vol?socket=$sock" >/dev/null 2>&1 && break; sleep 0.05; done
    for rw in randread randwrite; do
      iops=$(fio --name=r --ioengine=nbd --uri="nbd+unix:///vol?socket=$sock" --rw=$rw --bs=4k --iodepth=16 --time_based=1 --runtime=$secs --refill_buffers=1 --buffer_compress_percentage=95 --buffer_compress_chunk=4096 --output-format=json 2>/dev/null | python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print("%.0f"%(j["read"]["iops"]+j["write"]["iops"]))')
      echo "round $round cache $size $rw $iops load $(cut -d' ' -f1 /proc/loadavg)"
    done
    kill -TERM $pid; wait $pid
  done
done
