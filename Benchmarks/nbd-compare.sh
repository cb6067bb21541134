#!/usr/bin/env bash
# fio over NBD: vbd against nbdkit (memory, file) and qemu-nbd (qcow2 overlay), same jobs, same data.
#
#   Benchmarks/nbd-compare.sh                       # every server found; vbd if $VBDTOOL is executable
#   VBDTOOL=.build/release/vbdtool Benchmarks/nbd-compare.sh
#   SERVERS="nbdkit-memory qemu-nbd" FIO_RUNTIME=5 Benchmarks/nbd-compare.sh
#
# Each server in turn: start it on 127.0.0.1, fill the 1 GiB disk with the data set image
# (fixtures/large/dataset.img, built by scripts/make-dataset.sh when missing), run every job in
# Benchmarks/fio/ (fio's libnbd engine, one connection), stop it. Reads therefore read real ext4
# blocks, and the write jobs write fresh, ~2:1 compressible data. Jobs run in a fixed order
# (reads first, then writes, then the mix) against a server that is started afresh.
# randwrite-dup-4k-qd32 writes one non-zero content over and over (duplicate writes); the table
# ends with its IOPS divided by randwrite-4k-qd32's (unique writes) for every server.
#
# Servers (SERVERS selects and orders them):
#   vbd            $VBDTOOL init/create/serve; the three commands can be replaced by VBD_INIT_CMD,
#                  VBD_CREATE_CMD and VBD_SERVE_CMD, in which {VBDTOOL} {STORE} {PORT} {NAME} {SIZE}
#                  are substituted. Filled through NBD with nbdcopy.
#   nbdkit-memory  nbdkit memory plugin (sparse RAM); filled through NBD with nbdcopy.
#   nbdkit-file    nbdkit file plugin on a raw copy of the image (cache=default: page cache).
#   qemu-nbd       qemu-nbd -f qcow2 on an empty qcow2 overlay whose backing file is a raw copy of
#                  the image; qemu's defaults (cache=writeback, aio=threads, no --discard): reads of
#                  unwritten clusters come from the backing file, writes allocate in the overlay.
#   qemu-nbd-direct  the same with --cache=none (O_DIRECT on overlay and backing file).
#
# Environment: FIO_RUNTIME (s per job, default 12), FIO_RAMP (s, default 2), PORT (default 10850),
# JOBS (fio job names, default all in a fixed order), OUT (results dir, default a new
# Benchmarks/results/nbd-compare-<UTC time>), DATASET, VBDTOOL, KEEP=1 keeps the work dir.
# Output: the table on stdout and in $OUT/table.md, raw fio JSON in $OUT/<server>/<job>.json.
# Columns: IOPS, p99 latency (submission to completion) and the server's CPU time per I/O (user +
# system, all threads, over the measured window; for a mixed job counted per read or write alike)
# per server, then vbd's IOPS divided by each peer's.
# Bounded: each fio run is killed after runtime+ramp+60 s; every server is stopped on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
FIO_RUNTIME="${FIO_RUNTIME:-12}"
FIO_RAMP="${FIO_RAMP:-2}"
PORT="${PORT:-10850}"
DATASET="${DATASET:-$repo/fixtures/large/dataset.img}"
VBDTOOL="${VBDTOOL:-$repo/.build/release/vbdtool}"
VBD_NAME="${VBD_NAME:-bench}"
vbd_overridden=0
[ -z "${VBD_SERVE_CMD:-}" ] || vbd_overridden=1
[ -n "${VBD_INIT_CMD:-}" ] || VBD_INIT_CMD='{VBDTOOL} init --store {STORE}'
[ -n "${VBD_CREATE_CMD:-}" ] || VBD_CREATE_CMD='{VBDTOOL} create {NAME} --size {SIZE} --store {STORE}'
[ -n "${VBD_SERVE_CMD:-}" ] || VBD_SERVE_CMD='{VBDTOOL} serve --store {STORE} --listen 127.0.0.1:{PORT}'
JOBS="${JOBS:-randread-4k-qd1 randread-4k-qd32 seqread-1m-qd8 randwrite-4k-qd1 randwrite-4k-qd32 randwrite-dup-4k-qd32 seqwrite-1m-qd8 randrw70-4k-qd16}"
SERVERS="${SERVERS:-vbd nbdkit-memory nbdkit-file qemu-nbd qemu-nbd-direct}"
OUT="${OUT:-$here/results/nbd-compare-$(date -u +%Y%m%dT%H%M%SZ)}"
PY=/usr/bin/python3

for tool in fio nbdkit qemu-nbd qemu-img nbdcopy nbdinfo; do
    command -v "$tool" >/dev/null || { echo "nbd-compare: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
if [ ! -f "$DATASET" ]; then
    echo "nbd-compare: building the data set ($DATASET)" >&2
    "$repo/scripts/make-dataset.sh" large >&2
fi
SIZE_BYTES=$(stat -c %s "$DATASET")
SIZE_G="$((SIZE_BYTES >> 30))G"
[ $((SIZE_BYTES % (1 << 30))) -eq 0 ] || { echo "nbd-compare: $DATASET is not a whole number of GiB" >&2; exit 1; }

"$here/warm-guest-memory.sh"   # once per boot (WARM_MEMORY=0 skips it)
work="$(mktemp -d /tmp/vbd-nbd-compare.XXXXXX)"
mkdir -p "$OUT"
server_pid=""

stop_server() {
    if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
cleanup() {
    stop_server
    if [ "${KEEP:-0}" = 1 ]; then echo "nbd-compare: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# server_cpu_ticks: user+system clock ticks the server process has used so far (all threads).
server_cpu_ticks() {
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$server_pid/stat" 2>/dev/null || echo 0
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for URI: up to 20 s for the server to answer a handshake.
wait_for() {
    for _ in $(seq 200); do
        if timeout 5 nbdinfo --size "$1" >/dev/null 2>&1; then return 0; fi
        if [ -n "$server_pid" ] && ! kill -0 "$server_pid" 2>/dev/null; then
            echo "nbd-compare: server exited early" >&2; return 1
        fi
        sleep 0.1
    done
    echo "nbd-compare: no NBD server at $1 after 20 s" >&2
    return 1
}

subst() {
    local s=$1
    s=${s//\{VBDTOOL\}/$VBDTOOL}; s=${s//\{STORE\}/$work/vbd-store}; s=${s//\{PORT\}/$PORT}
    s=${s//\{NAME\}/$VBD_NAME}; s=${s//\{SIZE\}/$SIZE_G}
    echo "$s"
}

# start_server NAME -> sets server_pid and uri; returns non-zero when the server failed to start.
# (Called in an `if`, where set -e is off: every step checks its own status.)
start_server() {
    local name=$1 log="$OUT/$1/server.log"
    mkdir -p "$OUT/$name"
    port_free "$PORT" || { echo "nbd-compare: port $PORT is in use" >&2; exit 1; }
    uri="nbd://127.0.0.1:$PORT/"
    case "$name" in
    vbd)
        rm -rf "$work/vbd-store"; mkdir -p "$work/vbd-store"
        # Commands are split on whitespace (no quoting inside them).
        # shellcheck disable=SC2046
        timeout 60 $(subst "$VBD_INIT_CMD") >>"$log" 2>&1 || return 1
        # shellcheck disable=SC2046
        timeout 60 $(subst "$VBD_CREATE_CMD") >>"$log" 2>&1 || return 1
        # shellcheck disable=SC2046
        $(subst "$VBD_SERVE_CMD") >>"$log" 2>&1 &
        server_pid=$!
        uri="nbd://127.0.0.1:$PORT/$VBD_NAME"
        wait_for "$uri" || return 1
        timeout 300 nbdcopy --flush "$DATASET" "$uri" || return 1
        ;;
    nbdkit-memory)
        nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$PORT" memory "$SIZE_BYTES" >>"$log" 2>&1 &
        server_pid=$!
        wait_for "$uri" || return 1
        timeout 300 nbdcopy --flush "$DATASET" "$uri" || return 1
        ;;
    nbdkit-file)
        cp --sparse=always "$DATASET" "$work/raw.img" || return 1
        nbdkit -f --exit-with-parent -i 127.0.0.1 -p "$PORT" file "$work/raw.img" >>"$log" 2>&1 &
        server_pid=$!
        wait_for "$uri" || return 1
        ;;
    qemu-nbd | qemu-nbd-direct)
        local cache=()
        [ "$name" = qemu-nbd-direct ] && cache=(--cache=none)
        cp --sparse=always "$DATASET" "$work/base.raw" || return 1
        rm -f "$work/overlay.qcow2"
        qemu-img create -q -f qcow2 -b "$work/base.raw" -F raw "$work/overlay.qcow2" || return 1
        qemu-nbd -t -b 127.0.0.1 -p "$PORT" -x "$VBD_NAME" -f qcow2 "${cache[@]}" "$work/overlay.qcow2" >>"$log" 2>&1 &
        server_pid=$!
        uri="nbd://127.0.0.1:$PORT/$VBD_NAME"
        wait_for "$uri" || return 1
        ;;
    *) echo "nbd-compare: unknown server $name" >&2; exit 1 ;;
    esac
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "command: ${0##*/} (FIO_RUNTIME=$FIO_RUNTIME FIO_RAMP=$FIO_RAMP SERVERS='$SERVERS')"
    echo "dataset: $DATASET ($SIZE_BYTES bytes)"
    echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); kernel $(uname -r)"
    echo "fio: $(fio --version); $(nbdkit --version); $(qemu-nbd --version | head -1); $(nbdinfo --version | tail -1)"
} | tee "$OUT/environment.txt"

ran=()
failed=()
for server in $SERVERS; do
    echo "== $server" >&2
    if [ "$server" = vbd ] && [ "$vbd_overridden" = 0 ] && [ ! -x "$VBDTOOL" ]; then
        echo "nbd-compare: skipping vbd: $VBDTOOL not found (set VBDTOOL or VBD_SERVE_CMD)" >&2
        echo "skipped vbd: $VBDTOOL not found" >> "$OUT/environment.txt"
        continue
    fi
    if ! start_server "$server"; then
        echo "nbd-compare: $server FAILED to start; see $OUT/$server/server.log" >&2
        echo "FAILED to start: $server" >> "$OUT/environment.txt"
        failed+=("$server")
        stop_server
        continue
    fi
    echo "load before $server: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/environment.txt"
    for job in $JOBS; do
        printf '   %-24s' "$job" >&2
        NBD_URI="$uri" FIO_RUNTIME="$FIO_RUNTIME" FIO_RAMP="$FIO_RAMP" \
            timeout $((FIO_RUNTIME + FIO_RAMP + 60)) \
            fio --output-format=json --output="$OUT/$server/$job.json" "$here/fio/$job.fio" >/dev/null &
        fio_pid=$!
        # Server CPU time over the measured window (after the ramp): CPU per I/O is far less
        # sensitive than IOPS to other load on a shared 2-core machine.
        sleep "$FIO_RAMP"
        cpu_start=$(server_cpu_ticks)
        wait "$fio_pid"
        cpu_end=$(server_cpu_ticks)
        echo "$((cpu_end - cpu_start))" > "$OUT/$server/$job.cpu-ticks"
        $PY - "$OUT/$server/$job.json" "$((cpu_end - cpu_start))" "$(getconf CLK_TCK)" >&2 <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
ios = sum(j[d]["total_ios"] for d in ("read", "write"))
cpu_us = int(sys.argv[2]) * 1e6 / int(sys.argv[3]) / ios if ios else 0
print(" ".join(f"{d} {j[d]['iops']:9.0f} IOPS p99 {j[d]['lat_ns']['percentile']['99.000000'] / 1000:8.0f} us"
               for d in ("read", "write") if j[d]["io_bytes"] > 0), f"server CPU {cpu_us:6.1f} us/IO")
EOF
    done
    stop_server
    ran+=("$server")
done

[ ${#ran[@]} -gt 0 ] || { echo "nbd-compare: no server ran${failed:+ (failed: ${failed[*]})}" >&2; exit 1; }
$PY - "$OUT" "$JOBS" "${ran[@]}" <<'EOF' | tee "$OUT/table.md"
import json, os, sys
out, jobs, servers = sys.argv[1], sys.argv[2].split(), sys.argv[3:]

def result(server, job, direction):
    path = os.path.join(out, server, job + ".json")
    if not os.path.exists(path):
        return None
    j = json.load(open(path))["jobs"][0][direction]
    if j["io_bytes"] == 0:
        return None
    both = json.load(open(path))["jobs"][0]
    ios = sum(both[d]["total_ios"] for d in ("read", "write"))
    ticks_path = os.path.join(out, server, job + ".cpu-ticks")
    ticks = int(open(ticks_path).read()) if os.path.exists(ticks_path) else 0
    cpu_us = ticks * 1e6 / os.sysconf("SC_CLK_TCK") / ios if ios else 0.0
    return j["iops"], j["lat_ns"]["percentile"]["99.000000"] / 1000.0, j["bw_bytes"] / (1 << 20), cpu_us

rows = []
for job in jobs:
    for direction in ("read", "write"):
        cells = {s: result(s, job, direction) for s in servers}
        if all(c is None for c in cells.values()):
            continue
        rows.append((f"{job} {direction}", cells))

peers = [s for s in servers if s != "vbd"]
head = (["workload"] + [f"{s} IOPS" for s in servers] + [f"{s} p99 us" for s in servers]
        + [f"{s} CPU us/IO" for s in servers])
if "vbd" in servers:
    head += [f"vbd/{p} IOPS" for p in peers]
print("| " + " | ".join(head) + " |")
print("|" + "|".join("---" for _ in head) + "|")
for name, cells in rows:
    line = [name]
    for s in servers:
        c = cells[s]
        line.append("-" if c is None else (f"{c[0]:.0f} ({c[2]:.0f} MiB/s)" if "1m" in name else f"{c[0]:.0f}"))
    for s in servers:
        c = cells[s]
        line.append("-" if c is None else f"{c[1]:.0f}")
    for s in servers:
        c = cells[s]
        line.append("-" if c is None else f"{c[3]:.1f}")
    if "vbd" in servers:
        v = cells["vbd"]
        for p in peers:
            c = cells[p]
            line.append("-" if v is None or c is None or c[0] == 0 else f"{v[0] / c[0]:.2f}")
    print("| " + " | ".join(line) + " |")

# Duplicate writes against unique ones, per server (issue 14's target for vbd: >= 2x).
pairs = []
for s in servers:
    dup, unique = result(s, "randwrite-dup-4k-qd32", "write"), result(s, "randwrite-4k-qd32", "write")
    if dup and unique and unique[0] > 0:
        pairs.append(f"{s} {dup[0] / unique[0]:.2f}x (CPU {dup[3]:.1f} / {unique[3]:.1f} us/IO)")
if pairs:
    print()
    print("duplicate / unique 4k write IOPS (randwrite-dup-4k-qd32 / randwrite-4k-qd32): " + "; ".join(pairs))
EOF
echo "nbd-compare: results in $OUT" >&2
[ ${#failed[@]} -eq 0 ] || { echo "nbd-compare: failed to start: ${failed[*]}" >&2; exit 1; }
