#!/usr/bin/env bash
# One fio job against a fresh vbd server, with the server profiled by perf.
#
#   Benchmarks/profile-job.sh VBDTOOL JOB [SECONDS] [FOLDED]
#   Benchmarks/profile-job.sh .build/release/vbdtool randwrite-4k-qd32 8 /tmp/after.folded
#
# Creates a store in a temporary directory, a 1 GiB volume filled with the data set image through
# nbdcopy (FILL=0 skips it), serves it on 127.0.0.1:$PORT (default 10870), runs
# Benchmarks/fio/JOB.fio for SECONDS (default 8) while `perf record -g` samples the server from
# the second second on, and prints IOPS, bandwidth, p99 latency and the server's CPU per I/O
# (user + system over the job, ramp included). With FOLDED, writes the profile as folded stacks
# (Benchmarks/perf-fold.py). Needs perf (Debian's linux-perf), fio and nbdcopy; nothing in the
# build or the tests needs perf. Stops its server on exit. PROFILE=0 runs the job without perf
# (the rates and CPU per I/O alone); SERVE_ARGS adds options to `vbdtool serve`; PERF_DATA=FILE
# keeps perf's raw data (for `perf annotate -i FILE`).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
[ $# -ge 2 ] || { echo "usage: $0 VBDTOOL JOB [SECONDS] [FOLDED]" >&2; exit 2; }
vbdtool=$1 job=$2 seconds=${3:-8} folded=${4:-}
port=${PORT:-10870}
dataset=${DATASET:-$repo/fixtures/large/dataset.img}
profile=${PROFILE:-1}
tools="fio nbdcopy"; [ "$profile" = 1 ] && tools="$tools perf"
for tool in $tools; do command -v "$tool" >/dev/null || { echo "$0: $tool missing" >&2; exit 1; }; done
[ -f "$here/fio/$job.fio" ] || { echo "$0: no job $here/fio/$job.fio" >&2; exit 2; }
"$here/warm-guest-memory.sh"   # once per boot (WARM_MEMORY=0 skips it)
work=$(mktemp -d /tmp/vbd-profile.XXXXXX)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$vbdtool" init --store "$work/store" >/dev/null || exit 1
"$vbdtool" create bench --size 1G --store "$work/store" >/dev/null || exit 1
# shellcheck disable=SC2086
"$vbdtool" serve --store "$work/store" --listen "127.0.0.1:$port" ${SERVE_ARGS:-} >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 200); do grep -q serving "$work/serve.log" && break; sleep 0.05; done
grep -q serving "$work/serve.log" || { echo "$0: the server did not start" >&2; cat "$work/serve.log" >&2; exit 1; }
if [ "${FILL:-1}" = 1 ]; then
    [ -f "$dataset" ] || "$repo/scripts/make-dataset.sh" large >&2
    nbdcopy "$dataset" "nbd://127.0.0.1:$port/bench" || exit 1
fi
profiler=""
if [ "$profile" = 1 ]; then
    (sleep 2; perf record -F 2000 -g -p "$server" -o "$work/perf.data" -- sleep $((seconds - 2)) >/dev/null 2>&1) &
    profiler=$!
fi
ticks_before=$(awk '{print $14 + $15}' "/proc/$server/stat")
NBD_URI="nbd://127.0.0.1:$port/bench" FIO_RUNTIME=$seconds FIO_RAMP=1 timeout $((seconds + 60)) \
    fio --output-format=json "$here/fio/$job.fio" >"$work/fio.json" 2>/dev/null
ticks_after=$(awk '{print $14 + $15}' "/proc/$server/stat")
[ -z "$profiler" ] || wait "$profiler"
/usr/bin/python3 - "$work/fio.json" $((ticks_after - ticks_before)) "$(getconf CLK_TCK)" <<'PY'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
ios = 0
for kind in ("read", "write"):
    r = job[kind]
    if r["io_bytes"] > 0:
        ios += r["total_ios"]
        print(f'{kind}: {r["iops"]:.0f} IOPS, {r["bw"] / 1024:.0f} MiB/s, p99 {r["lat_ns"]["percentile"]["99.000000"] / 1000:.0f} us')
seconds = int(sys.argv[2]) / int(sys.argv[3])
print(f"server CPU: {seconds:.2f} s, {seconds * 1e6 / max(ios, 1):.1f} us per I/O")
PY
if [ -n "$folded" ] && [ "$profile" = 1 ]; then
    perf script -i "$work/perf.data" 2>/dev/null | /usr/bin/python3 "$here/perf-fold.py" >"$folded"
    echo "folded stacks: $folded"
fi
if [ -n "${PERF_DATA:-}" ] && [ "$profile" = 1 ]; then cp "$work/perf.data" "$PERF_DATA"; echo "perf data: $PERF_DATA"; fi
