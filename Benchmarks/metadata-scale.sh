#!/usr/bin/env bash
# Metadata at scale (issue 15): builds a store of CHUNKS unique 4 KiB blocks and measures what the
# metadata costs as it grows.
#
#   VBDTOOL=.build/release/vbdtool Benchmarks/metadata-scale.sh CHUNKS [METADATA_CACHE]
#
# 1. fill: fio writes CHUNKS * 4 KiB of fresh, 2:1 compressible data over NBD (one chunk per
#    block: refill_buffers), then `vbdtool gc` commits it;
# 2. commit stall: a QD1 4 KiB random reader runs for STALL_SECONDS (default 20) beside a QD8
#    random writer of fresh data; `vbdtool gc` (a flush and a commit of every changed metadata
#    page) runs STALL_GC_COUNT times (default 3) in the middle. Printed: the reader's largest
#    latency, its p99.9, the same reader's largest latency with no gc and with no writer either
#    (earlier runs: the machine's own noise), and how long each gc took. With
#    VBD_LOCK_TRACE_MS=N the server prints every hold of the store lock longer than N ms;
# 3. open: the server stops cleanly (a commit), then `vbdtool list` (which opens the store
#    itself, reads the superblock and replays the journal) is timed, and so is a second serve's
#    start until its socket answers;
# 4. sizes: the data file, meta, and the server's peak RSS (VmHWM) against the metadata cache;
# 5. rates (RATES_SECONDS, default 15; 0 skips): 4 KiB random reads and writes at QD16 with a
#    metadata cache of a tenth of the metadata, then with one that holds all of it, and the ratio.
# COMPRESS (default 50) is fio's buffer_compress_percentage: 95 keeps a 32 M-chunk store's data
# file within a small disk (every block is still unique).
# Everything runs in a temporary directory (TMPDIR) that is removed at the end.
set -euo pipefail
chunks=${1:?usage: metadata-scale.sh CHUNKS [METADATA_CACHE]}
cache=${2:-256M}
vbdtool=${VBDTOOL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/vbdtool}
stall_seconds=${STALL_SECONDS:-20}
rates_seconds=${RATES_SECONDS:-15}
compress=${COMPRESS:-50}
gc_count=${STALL_GC_COUNT:-3}
work=$(mktemp -d "${TMPDIR:-/tmp}/vbd-scale.XXXXXX")
store=$work/store
sock=$work/nbd.sock
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

now() { date +%s.%N; }
serve() {  # [METADATA_CACHE]
    # A small block cache, so that the peak RSS is mostly metadata.
    # The lock trace (1 ms and longer) shows what each long hold of the store lock was doing.
    VBD_LOCK_TRACE_MS=${VBD_LOCK_TRACE_MS:-1} "$vbdtool" serve --store "$store" --unix "$sock" --metadata-cache "${1:-$cache}" \
        --cache-size 64M --last-chance-size 0 --log-level warning 2>>"$work/server.err" &
    server=$!
    for _ in $(seq 1 600); do
        [ -S "$sock" ] && nbdinfo --size "nbd+unix:///vol?socket=$sock" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "server did not start" >&2; exit 1
}
stop() { kill -TERM "$server"; wait "$server" || true; server=; }
fio_job() {  # name, extra fio options...
    local name=$1; shift
    fio --name="$name" --ioengine=nbd --uri="nbd+unix:///vol?socket=$sock" --output-format=json \
        --refill_buffers=1 --buffer_compress_percentage="$compress" --buffer_compress_chunk=4096 "$@"
}

bytes=$((chunks * 4096))
"$vbdtool" init --store "$store" >/dev/null
"$vbdtool" create --store "$store" vol --size "$bytes" >/dev/null
serve
echo "store: $chunks chunks ($((bytes >> 20)) MiB of unique 4 KiB blocks), metadata cache $cache, vbdtool $vbdtool"

t0=$(now)
fio_job fill --rw=write --bs=1M --iodepth=8 --size="$bytes" >"$work/fill.json"
t1=$(now)
"$vbdtool" gc --store "$store" >/dev/null
t2=$(now)
[ -z "${TRACE_OUT:-}" ] || cp "$work/server.err" "$TRACE_OUT.fill"   # TRACE_OUT=F keeps the traces
: >"$work/server.err"   # the lock summary below covers the stall runs, not the fill
printf 'fill: %.1f s (%.0f MiB/s), first gc (commit of the fill): %.2f s\n' \
    "$(echo "$t1 - $t0" | bc)" "$(echo "$bytes / 1048576 / ($t1 - $t0)" | bc -l)" "$(echo "$t2 - $t1" | bc)"

reader() {  # prints max and p99.9 latency in ms of a QD1 4k random reader
    fio_job reader --rw=randread --bs=4k --iodepth=1 --time_based=1 --runtime="$stall_seconds" \
        --lat_percentiles=1 --clat_percentiles=0 --percentile_list=99.9 >"$work/$1.json" 2>"$work/$1.err" || { cat "$work/$1.err" >&2; exit 1; }
    /usr/bin/python3 -c '
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]["read"]["lat_ns"]   # fio prints a line before its JSON
p = j.get("percentile", {})
print("%.1f %.2f" % (j["max"] / 1e6, float(next(iter(p.values()), 0)) / 1e6))' "$work/$1.json"
}
writer() {
    fio_job writer --rw=randwrite --bs=4k --iodepth=8 --time_based=1 --runtime="$stall_seconds" >/dev/null
}

# Baselines: the reader alone (the machine's own noise), then beside the writer with no gc.
alone=$(reader alone)
writer & w=$!
base=$(reader base)
wait $w
# With commits in the middle.
writer & w=$!
reader gc >"$work/gc-result" & r=$!
sleep $((stall_seconds / 4))
gcs=()
for _ in $(seq 1 "$gc_count"); do
    s=$(now); "$vbdtool" gc --store "$store" >/dev/null; e=$(now)
    gcs+=("$(printf '%.3f' "$(echo "$e - $s" | bc)")")
    sleep 1
done
wait $r; wait $w
withgc=$(cat "$work/gc-result")
echo "QD1 4k reader beside a QD8 writer, ${stall_seconds} s: max / p99.9 latency (ms)"
echo "  reader alone:    $alone"
echo "  without gc: $base"
echo "  with $gc_count gc: $withgc   (gc took ${gcs[*]} s)"

# The store lock's longest holds by a commit (prepare and completion) and by anything else,
# wall time and the holder's CPU time (the difference is time it waited for the CPU or a disk).
/usr/bin/python3 - "$work/server.err" <<'PY'
import re, sys
worst = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"vbd lock trace: held ([0-9.]+) ms \(([0-9.]+) ms on the CPU\), taken at (\S+)", line)
    if not m: continue
    wall, cpu, site = float(m.group(1)), float(m.group(2)), m.group(3)
    kind = "commit" if "Persistence" in site else "other"
    w = worst.setdefault(kind, [0.0, 0.0, 0.0, ""])
    if wall > w[0]: w[0], w[3] = wall, site
    w[1] = max(w[1], cpu)
    w[2] += 1
for kind, (wall, cpu, n, site) in sorted(worst.items()):
    print("store lock, %-6s holds of 1 ms or more during the stall runs: %5d, longest %.1f ms wall (%s), longest on the CPU %.1f ms" % (kind, n, wall, site, cpu))
PY
[ -z "${TRACE_OUT:-}" ] || cp "$work/server.err" "$TRACE_OUT"
: >"$work/server.err"
rss=$(awk '/VmHWM/ {print $2 " " $3}' "/proc/$server/status")
stop
s=$(now); "$vbdtool" list --store "$store" >/dev/null; e=$(now)
printf 'open after a clean stop: vbdtool list %.3f s\n' "$(echo "$e - $s" | bc)"
s=$(now); serve; e=$(now)
printf '                         serve until its socket answers %.3f s\n' "$(echo "$e - $s" | bc)"
stop
echo "data file $(du -h --apparent-size "$store/data" | cut -f1), meta $(du -h --apparent-size "$store/meta" | cut -f1) ($(du -h "$store/meta" | cut -f1) on disk), server peak RSS $rss"

[ "$rates_seconds" -gt 0 ] || exit 0
# Pages in use are half of meta (two slots per page); the small cache is a tenth of them.
metadata_bytes=$(( $(stat -c %s "$store/meta") / 2 ))
small=$(( metadata_bytes / 10 ))
large=$(( metadata_bytes * 2 ))
iops() {  # rw -> IOPS of a QD16 4 KiB job
    fio_job "$1" --rw="$1" --bs=4k --iodepth=16 --time_based=1 --runtime="$rates_seconds" >"$work/$1.json"
    /usr/bin/python3 -c '
import json, sys
text = open(sys.argv[1]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
print("%.0f" % (j["read"]["iops"] + j["write"]["iops"]))' "$work/$1.json"
}
declare -A rate
for size in "$small" "$large"; do
    serve "$size"
    rate[$size,randread]=$(iops randread)
    rate[$size,randwrite]=$(iops randwrite)
    stop
done
echo "4k QD16 rates, ${rates_seconds} s each (metadata $((metadata_bytes >> 20)) MiB):"
for rw in randread randwrite; do
    printf '  %-9s cache %6d MiB: %7d IOPS   cache %6d MiB: %7d IOPS   ratio %.2f\n' "$rw" \
        $((small >> 20)) "${rate[$small,$rw]}" $((large >> 20)) "${rate[$large,$rw]}" \
        "$(echo "${rate[$small,$rw]} / ${rate[$large,$rw]}" | bc -l)"
done

