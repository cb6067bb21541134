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
#    (earlier runs: the machine's own noise), and how long each gc took; then, from fio's log of
#    every read and the server's commit trace (both in wall-clock time), the largest latency of the
#    reads that overlapped a commit (gc's or one the writer started) and of the others. With
#    VBD_LOCK_TRACE_MS=N the server prints every hold of the store lock longer than N ms;
# 3. open: the server stops cleanly (a commit), then `vbdtool list` (which opens the store
#    itself, reads the superblock and replays the journal) is timed, and so is a second serve's
#    start until its socket answers;
# 4. sizes: the data file, meta, and the server's peak RSS (VmHWM) against the metadata cache;
# 5. rates (RATES_SECONDS, default 15; 0 skips): 4 KiB random reads and writes at QD16 with a
#    metadata cache of a tenth of the metadata, then with one that holds all of it, and the ratio.
# READER_SIZE=N confines the stall runs' reader to the volume's first N bytes, read once before
# them (see below).
# COMPRESS (default 50) is fio's buffer_compress_percentage: 95 keeps a 32 M-chunk store's data
# file within a small disk (every block is still unique).
# SERVE_ARGS adds flags to every serve (an A/B of a serve option, e.g. "--data-write-back 0").
# Everything runs in a temporary directory (TMPDIR) that is removed at the end, except the store
# when STORE=DIR names where it lives: then it is kept (DIR.filled records the chunks), a later run
# with the same DIR measures it without filling again, and FILL_ONLY=1 stops after the fill.
set -euo pipefail
chunks=${1:?usage: metadata-scale.sh CHUNKS [METADATA_CACHE]}
cache=${2:-256M}
vbdtool=${VBDTOOL:-$(cd "$(dirname "$0")/.." && pwd)/.build/release/vbdtool}
stall_seconds=${STALL_SECONDS:-20}
rates_seconds=${RATES_SECONDS:-15}
compress=${COMPRESS:-50}
gc_count=${STALL_GC_COUNT:-3}
"$(dirname "$0")/warm-guest-memory.sh"   # once per boot (WARM_MEMORY=0 skips it)
work=$(mktemp -d "${TMPDIR:-/tmp}/vbd-scale.XXXXXX")
# STORE=DIR keeps the store in DIR after the run, and a later run with the same DIR (and CHUNKS)
# skips the fill: a 32 M-chunk fill can run while the machine is busy and the measurements later.
store=${STORE:-$work/store}
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
        --cache-size 64M --last-chance-size 0 --log-level warning ${SERVE_ARGS:-} 2>>"$work/server.err" &
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
filled=0
if [ -n "${STORE:-}" ] && [ -e "$store.filled" ]; then
    [ "$(cat "$store.filled")" = "$chunks" ] || { echo "$store holds a store of $(cat "$store.filled") chunks, not $chunks" >&2; exit 1; }
    filled=1
else
    "$vbdtool" init --store "$store" >/dev/null
    "$vbdtool" create --store "$store" vol --size "$bytes" >/dev/null
fi
serve
echo "store: $chunks chunks ($((bytes >> 20)) MiB of unique 4 KiB blocks), metadata cache $cache, vbdtool $vbdtool"

cache_peak() {  # the metadata cache's largest count at the end of a commit in the server's trace
    /usr/bin/python3 -c '
import re, sys
sizes = [int(m.group(1)) for m in re.finditer(r"vbd commit trace: .*?cache (\d+) KiB", open(sys.argv[1], errors="replace").read())]
print("%d commits, metadata cache at most %.1f MiB after one" % (len(sizes), max(sizes) / 1024.0) if sizes else "no commit traced")' "$work/server.err"
}
if [ $filled = 0 ]; then
    t0=$(now)
    fio_job fill --rw=write --bs=1M --iodepth=8 --size="$bytes" >"$work/fill.json"
    t1=$(now)
    "$vbdtool" gc --store "$store" >/dev/null
    t2=$(now)
    [ -z "${TRACE_OUT:-}" ] || cp "$work/server.err" "$TRACE_OUT.fill"   # TRACE_OUT=F keeps the traces
    echo "fill: $(cache_peak) (budget $cache)"
    printf 'fill: %.1f s (%.0f MiB/s), first gc (commit of the fill): %.2f s\n' \
        "$(echo "$t1 - $t0" | bc)" "$(echo "$bytes / 1048576 / ($t1 - $t0)" | bc -l)" "$(echo "$t2 - $t1" | bc)"
    [ -z "${STORE:-}" ] || echo "$chunks" >"$store.filled"
else
    echo "fill: skipped, $store was filled by an earlier run"
fi
: >"$work/server.err"   # the lock summary below covers the stall runs, not the fill
[ -z "${FILL_ONLY:-}" ] || exit 0   # FILL_ONLY=1 (with STORE): fill and stop

# READER_SIZE=N (bytes, fio's suffixes): the reader reads only the volume's first N bytes, read once
# before the runs, so that its reads find their data in the page cache and what it waits for is
# the commits, not a disk holding a data file larger than the page cache (unset: the whole volume).
reader_span=()
if [ -n "${READER_SIZE:-}" ]; then
    reader_span=(--size="$READER_SIZE")
    s=$(now); fio_job warm --rw=read --bs=1M --iodepth=8 --size="$READER_SIZE" >/dev/null; e=$(now)
    printf 'reader: the first %s of the volume, read once beforehand in %.1f s\n' "$READER_SIZE" "$(echo "$e - $s" | bc)"
fi
reader() {  # prints max and p99.9 latency in ms of a QD1 4k random reader; every I/O in $work/$1_lat.1.log
    fio_job reader --rw=randread --bs=4k --iodepth=1 --time_based=1 --runtime="$stall_seconds" "${reader_span[@]}" \
        --write_lat_log="$work/$1" --log_avg_msec=0 --log_unix_epoch=1 --lat_percentiles=1 --clat_percentiles=0 --percentile_list=99.9 >"$work/$1.json" 2>"$work/$1.err" || { cat "$work/$1.err" >&2; exit 1; }
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

# The reader's I/Os that overlapped a commit (from its start, which syncs the data file, to its
# end; the server's commit trace gives both in wall-clock time): the stall a commit causes,
# apart from the stalls the writer and the machine cause at other times.
/usr/bin/python3 - "$work/server.err" "$work/base_lat.1.log" "$work/gc_lat.1.log" <<'PY'
import bisect, re, sys
trace = open(sys.argv[1], errors="replace").read()
commits = sorted((float(a), float(b)) for a, b in re.findall(r"vbd commit trace: .* from ([0-9.]+) to ([0-9.]+)", trace))
starts = [c[0] for c in commits]
# Each commit's phases, as (name, start, end): the name is the step that ends at `end`.
phases = {}
for a, b, listed in re.findall(r"vbd commit trace: .* from ([0-9.]+) to ([0-9.]+), phases ended:((?: \S+ [0-9.]+)*) finished", trace):
    steps, since = [], float(a)
    for name, t in re.findall(r"(\S+) ([0-9.]+)", listed):
        steps.append((name, since, float(t))); since = float(t)
    steps.append(("finished", since, float(b)))
    phases[float(a)] = steps
holds = [(float(r) - float(h) / 1000, float(r), float(h)) for h, r in
         re.findall(r"vbd lock trace: held ([0-9.]+) ms .*?, released at ([0-9.]+),", open(sys.argv[1], errors="replace").read())]
for name, path in (("without gc", sys.argv[2]), ("with gc", sys.argv[3])):
    during, outside, seen = [], [], set()
    worst = (0, 0.0, 0.0)
    worst_during = (0, 0.0, 0.0, None)
    for line in open(path):
        fields = line.split(",")
        end, latency = int(fields[0]) / 1000.0, int(fields[1])
        start = end - latency / 1e9
        worst = max(worst, (latency, start, end))
        # fio stamps the completion in whole milliseconds: widen the I/O by one on each side.
        i = bisect.bisect_right(starts, end + 0.001)
        hit = next((k for k in range(i - 1, max(-1, i - 4), -1) if commits[k][1] >= start - 0.001), None)
        if hit is None: outside.append(latency)
        else:
            during.append(latency); seen.add(hit)
            worst_during = max(worst_during, (latency, start, end, hit), key=lambda w: w[0])
    top = lambda xs: "%.1f ms" % (max(xs) / 1e6) if xs else "-"
    print("  %-10s reader I/Os during the %d commits they overlapped: %d, max %s; at other times: %d, max %s"
          % (name, len(seen), len(during), top(during), len(outside), top(outside)))
    if worst_during[3] is not None:
        steps = phases.get(commits[worst_during[3]][0], [])
        overlapped = [n for n, a, b in steps if b >= worst_during[1] - 0.001 and a <= worst_during[2] + 0.001]
        print("  %-10s the slowest read during a commit overlapped its phases: %s (prepared: the first sync and the freeze;"
              " finished: punches, releases, old journals, trim)" % ("", " ".join(overlapped) or "?"))
    overlapping = [h for h in holds if h[1] >= worst[1] - 0.001 and h[0] <= worst[2] + 0.001]
    print("  %-10s the slowest read overlapped %d store-lock holds of 1 ms or more, the longest %.1f ms"
          % ("", len(overlapping), max((h[2] for h in overlapping), default=0)))
PY
echo "stall runs: $(cache_peak) (budget $cache)"
# The store lock's longest holds by a commit (prepare and completion) and by anything else,
# wall time and the holder's CPU time (the difference is time it waited for the CPU or a disk).
/usr/bin/python3 - "$work/server.err" <<'PY'
import re, sys
worst = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"vbd lock trace: held ([0-9.]+) ms \(([0-9.]+) ms on the CPU\), released at [0-9.]+, taken at (\S+)", line)
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

