#!/usr/bin/env bash
# Boot storm: CLIENTS (32) writable clones of one 1 GiB image, each read in full, all at once.
#
#   Benchmarks/boot-storm.sh                        # qemu-nbd, and vbd if $VBDTOOL is executable
#   SERVERS=qemu-nbd CLIENTS=8 Benchmarks/boot-storm.sh
#
# What it measures, per server: wall time until every client has read its whole disk, the
# aggregate read throughput (CLIENTS x image size / wall time), and the server's peak resident
# memory (sum of VmRSS over its processes, sampled every 0.2 s). Each client is one
# `nbdcopy --no-extents -C 1 -R 4 URI null:` (one connection, 4 requests in flight, reads every
# byte including zero and unallocated ranges, discards them), as a guest's first full read would.
#
# Servers:
#   qemu-nbd  CLIENTS qcow2 overlays on one raw backing file (the image), one qemu-nbd process per
#             overlay on a unix socket (qemu-nbd serves one image per process). Cache mode
#             QEMU_CACHE (default: writeback, qemu's default), so the backing file is read through
#             the host page cache, which all processes share and which is not in their RSS.
#   vbd       vbdtool: a volume filled with the image through NBD, one snapshot, CLIENTS shares of
#             it, all served by one `vbdtool serve` on 127.0.0.1:PORT. The CLI is not on main yet:
#             every command can be replaced (VBD_INIT_CMD, VBD_CREATE_CMD, VBD_SERVE_CMD,
#             VBD_SNAPSHOT_CMD, VBD_SHARE_CMD) with {VBDTOOL} {STORE} {PORT} {NAME} {SIZE}
#             {SNAPSHOT} {SHARE} substituted. The snapshot and shares are made with the server
#             stopped, then the server is started again for the storm.
#
# Environment: CLIENTS (32), PORT (10870), DATASET (fixtures/large/dataset.img), SERVERS
# ("vbd qemu-nbd"), CLIENT_TIMEOUT (s, 900), OUT (results dir), KEEP=1 keeps the work dir.
# Needs about 2 x image size of free space in /tmp. Bounded and cleans up every server on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
CLIENTS="${CLIENTS:-32}"
PORT="${PORT:-10870}"
DATASET="${DATASET:-$repo/fixtures/large/dataset.img}"
SERVERS="${SERVERS:-vbd qemu-nbd}"
CLIENT_TIMEOUT="${CLIENT_TIMEOUT:-900}"
QEMU_CACHE="${QEMU_CACHE:-writeback}"
VBDTOOL="${VBDTOOL:-$repo/.build/release/vbdtool}"
VBD_NAME="${VBD_NAME:-base}"
VBD_SNAPSHOT="${VBD_SNAPSHOT:-gold}"
vbd_overridden=0
[ -z "${VBD_SERVE_CMD:-}" ] || vbd_overridden=1
[ -n "${VBD_INIT_CMD:-}" ] || VBD_INIT_CMD='{VBDTOOL} init --store {STORE}'
[ -n "${VBD_CREATE_CMD:-}" ] || VBD_CREATE_CMD='{VBDTOOL} create {NAME} --size {SIZE} --store {STORE}'
[ -n "${VBD_SERVE_CMD:-}" ] || VBD_SERVE_CMD='{VBDTOOL} serve --store {STORE} --listen 127.0.0.1:{PORT}'
[ -n "${VBD_SNAPSHOT_CMD:-}" ] || VBD_SNAPSHOT_CMD='{VBDTOOL} snapshot {NAME}@{SNAPSHOT} --store {STORE}'
[ -n "${VBD_SHARE_CMD:-}" ] || VBD_SHARE_CMD='{VBDTOOL} share {NAME}@{SNAPSHOT} {SHARE} --store {STORE}'
OUT="${OUT:-$here/results/boot-storm-$(date -u +%Y%m%dT%H%M%SZ)}"

for tool in nbdcopy nbdinfo qemu-nbd qemu-img; do
    command -v "$tool" >/dev/null || { echo "boot-storm: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
if [ ! -f "$DATASET" ]; then
    echo "boot-storm: building the data set ($DATASET)" >&2
    "$repo/scripts/make-dataset.sh" large >&2
fi
SIZE_BYTES=$(stat -c %s "$DATASET")
SIZE_G="$((SIZE_BYTES >> 30))G"

work="$(mktemp -d /tmp/vbd-boot-storm.XXXXXX)"
mkdir -p "$OUT"
server_pids=()
sampler_pid=""

stop_servers() {
    local pid
    [ -z "$sampler_pid" ] || { kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true; }
    sampler_pid=""
    for pid in "${server_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${server_pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    server_pids=()
}
cleanup() {
    # Clients are children of this shell: end them too.
    local pids
    pids=$(jobs -p) || true
    [ -z "$pids" ] || kill $pids 2>/dev/null || true
    stop_servers
    if [ "${KEEP:-0}" = 1 ]; then echo "boot-storm: kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for() {
    for _ in $(seq 200); do
        timeout 5 nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "boot-storm: no NBD server at $1 after 20 s" >&2
    return 1
}

subst() {
    local s=$1
    s=${s//\{VBDTOOL\}/$VBDTOOL}; s=${s//\{STORE\}/$work/vbd-store}; s=${s//\{PORT\}/$PORT}
    s=${s//\{NAME\}/$VBD_NAME}; s=${s//\{SIZE\}/$SIZE_G}; s=${s//\{SNAPSHOT\}/$VBD_SNAPSHOT}
    s=${s//\{SHARE\}/${2:-}}
    echo "$s"
}
run_vbd() { # COMMAND_TEMPLATE [SHARE]
    # shellcheck disable=SC2046
    timeout 120 $(subst "$1" "${2:-}") >>"$OUT/vbd/commands.log" 2>&1
}

# sample_rss FILE PID...: peak of the summed VmRSS (KiB) of PIDs, written to FILE every 0.2 s.
sample_rss() {
    local file=$1; shift
    local peak=0 sum pid rss
    while true; do
        sum=0
        for pid in "$@"; do
            rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
            sum=$((sum + ${rss:-0}))
        done
        [ "$sum" -le "$peak" ] || { peak=$sum; echo "$peak" > "$file"; }
        sleep 0.2
    done
}

# storm NAME URI...: read every URI in full, in parallel; prints and records the result line.
storm() {
    local name=$1; shift
    local rss_file="$OUT/$name/rss-peak-kib"
    echo 0 > "$rss_file"
    local idle_rss=0 pid
    for pid in "${server_pids[@]}"; do
        idle_rss=$((idle_rss + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)))
    done
    sample_rss "$rss_file" "${server_pids[@]}" &
    sampler_pid=$!
    local start end i=0 failed=0 clients=()
    start=$(date +%s.%N)
    for uri in "$@"; do
        timeout "$CLIENT_TIMEOUT" nbdcopy --no-extents -C 1 -R 4 "$uri" null: 2>"$OUT/$name/client-$i.err" &
        clients+=($!)
        i=$((i + 1))
    done
    for pid in "${clients[@]}"; do wait "$pid" || failed=$((failed + 1)); done
    end=$(date +%s.%N)
    kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true; sampler_pid=""
    local line
    line=$(awk -v s="$start" -v e="$end" -v n="$#" -v size="$SIZE_BYTES" -v peak="$(cat "$rss_file")" \
              -v idle="$idle_rss" -v procs="${#server_pids[@]}" -v failed="$failed" -v name="$name" 'BEGIN {
        t = e - s; bytes = n * size
        printf "| %s | %d | %d | %.1f | %.0f | %.0f | %.0f | %d |", name, n, procs, t, bytes / t / 1048576,
               idle / 1024, peak / 1024, failed }')
    echo "$line" | tee "$OUT/$name/result.md"
}

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "command: ${0##*/} (CLIENTS=$CLIENTS SERVERS='$SERVERS' QEMU_CACHE=$QEMU_CACHE)"
    echo "dataset: $DATASET ($SIZE_BYTES bytes)"
    echo "cpu: $(nproc) x $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'); kernel $(uname -r)"
    echo "$(nbdcopy --version | head -1); $(qemu-nbd --version | head -1)"
    echo "load at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$OUT/environment.txt"

results=()
for server in $SERVERS; do
    mkdir -p "$OUT/$server"
    echo "== $server" >&2
    case "$server" in
    qemu-nbd)
        cp --sparse=always "$DATASET" "$work/base.raw"
        uris=()
        for i in $(seq 0 $((CLIENTS - 1))); do
            qemu-img create -q -f qcow2 -b "$work/base.raw" -F raw "$work/overlay-$i.qcow2"
            qemu-nbd -t -k "$work/qemu-$i.sock" -x vm$i -f qcow2 --cache="$QEMU_CACHE" \
                "$work/overlay-$i.qcow2" >>"$OUT/$server/server.log" 2>&1 &
            server_pids+=($!)
            uris+=("nbd+unix:///vm$i?socket=$work/qemu-$i.sock")
        done
        for uri in "${uris[@]}"; do wait_for "$uri"; done
        results+=("$(storm "$server" "${uris[@]}")")
        stop_servers
        rm -f "$work"/overlay-*.qcow2 "$work/base.raw"
        ;;
    vbd)
        if [ "$vbd_overridden" = 0 ] && [ ! -x "$VBDTOOL" ]; then
            echo "boot-storm: skipping vbd: $VBDTOOL not found (set VBDTOOL)" >&2; continue
        fi
        mkdir -p "$work/vbd-store"
        run_vbd "$VBD_INIT_CMD"
        run_vbd "$VBD_CREATE_CMD"
        # shellcheck disable=SC2046
        $(subst "$VBD_SERVE_CMD") >>"$OUT/$server/server.log" 2>&1 &
        server_pids+=($!)
        wait_for "nbd://127.0.0.1:$PORT/$VBD_NAME"
        timeout 600 nbdcopy --flush "$DATASET" "nbd://127.0.0.1:$PORT/$VBD_NAME"
        stop_servers
        run_vbd "$VBD_SNAPSHOT_CMD"
        uris=()
        for i in $(seq 0 $((CLIENTS - 1))); do
            run_vbd "$VBD_SHARE_CMD" "vm$i"
            uris+=("nbd://127.0.0.1:$PORT/vm$i")
        done
        # shellcheck disable=SC2046
        $(subst "$VBD_SERVE_CMD") >>"$OUT/$server/server.log" 2>&1 &
        server_pids+=($!)
        wait_for "${uris[0]}"
        du -sk "$work/vbd-store" | awk '{ printf "store size after fill + shares: %.0f MiB\n", $1 / 1024 }' \
            | tee -a "$OUT/environment.txt" >&2
        results+=("$(storm "$server" "${uris[@]}")")
        # The universal cache against the image's unique data: one copy for all 32 shares.
        if [ "$vbd_overridden" = 0 ] && "$VBDTOOL" stats --json --store "$work/vbd-store" >"$OUT/$server/stats.json" 2>/dev/null; then
            python3 - "$OUT/$server/stats.json" <<'PY' | tee -a "$OUT/environment.txt" >&2
import json, sys
s = json.load(open(sys.argv[1]))
c = s.get("cache") or {}
held, unique = c.get("bytesHeld", 0), s["chunkRawBytes"]
print(f"cache after the storm: {held / 2**20:.1f} MiB held for {unique / 2**20:.1f} MiB of unique data "
      f"({held / max(unique, 1):.3f}x); hits {c.get('hits')}, last-chance hits {c.get('lastChanceHits')}, misses {c.get('misses')}")
PY
        fi
        stop_servers
        rm -rf "$work/vbd-store"
        ;;
    *) echo "boot-storm: unknown server $server" >&2; exit 1 ;;
    esac
done

{
    echo "| server | clients | server processes | wall s | aggregate MiB/s | idle RSS MiB | peak RSS MiB | failed clients |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${results[@]}"
} | tee "$OUT/table.md"
echo "boot-storm: results in $OUT" >&2
