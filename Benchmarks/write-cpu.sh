#!/usr/bin/env bash
# CPU the server spends per byte written: `nbdcopy` writes SIZE_MIB of incompressible data to a
# fresh store through `vbdtool serve` (unix socket, one connection, REQUESTS requests in flight,
# 16 by default) at each request size, and the server's user+system CPU time, minor page faults
# (from /proc) and the copy's wall time are printed. With VBDTOOL_BASELINE set, each run is repeated with that binary, interleaved, so two
# builds can be compared on the same machine state.
#
#   swift build -c release --product vbdtool
#   Benchmarks/write-cpu.sh
#   VBDTOOL_BASELINE=/tmp/vbdtool-old REPEAT=3 Benchmarks/write-cpu.sh
#
# Bounded: each copy is killed after 120 s; servers are stopped after each run and on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
VBDTOOL="${VBDTOOL:-$repo/.build/release/vbdtool}"
VBDTOOL_BASELINE="${VBDTOOL_BASELINE:-}"
SIZE_MIB="${SIZE_MIB:-256}"
REQUEST_SIZES="${REQUEST_SIZES:-65536 1048576 4194304}"
REPEAT="${REPEAT:-2}"
REQUESTS="${REQUESTS:-16}"
for tool in nbdcopy; do command -v "$tool" >/dev/null || { echo "SKIP: $tool missing"; exit 77; }; done
[ -x "$VBDTOOL" ] || { echo "SKIP: $VBDTOOL not built (swift build -c release --product vbdtool)"; exit 77; }

"$here/warm-guest-memory.sh"   # once per boot (WARM_MEMORY=0 skips it)
work="$(mktemp -d /tmp/vbd-write-cpu.XXXXXX)"
server_pid=""
stop_server() { if [ -n "$server_pid" ]; then kill -INT "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=""; fi; }
trap 'stop_server; rm -rf "$work"' EXIT
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$work/data.img"
ticks_per_second="$(getconf CLK_TCK)"

run() { # binary request-size ; prints one table row
    local binary="$1" request="$2" store="$work/store" sock="$work/nbd.sock"
    rm -rf "$store"
    "$binary" init --store "$store" >/dev/null
    "$binary" create v --size "$((SIZE_MIB * 2))M" --store "$store" >/dev/null
    "$binary" serve --store "$store" --unix "$sock" >"$work/serve.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
    sleep 0.5
    read -r -a before < <(awk '{print $10, $14 + $15}' "/proc/$server_pid/stat")
    local started ended
    started=$(date +%s%N)
    timeout 120 nbdcopy --connections=1 --request-size="$request" --requests="$REQUESTS" "$work/data.img" "nbd+unix:///v?socket=$sock"
    ended=$(date +%s%N)
    read -r -a after < <(awk '{print $10, $14 + $15}' "/proc/$server_pid/stat")
    stop_server
    local cpu_ticks=$((after[1] - before[1])) faults=$((after[0] - before[0]))
    awk -v name="$binary" -v rs="$request" -v t="$cpu_ticks" -v hz="$ticks_per_second" -v mib="$SIZE_MIB" -v f="$faults" \
        -v ns="$((ended - started))" \
        'BEGIN { n = mib * 1048576 / rs; printf "| %s | %d KiB | %.2f | %.0f | %.1f | %.1f | %.1f |\n", name, rs / 1024, t / hz,
                 1000 * t / hz / (mib / 1024), f / (mib * 256), 1e6 * t / hz / n, ns / 1000 / n }'
}

echo "| binary | request size | server CPU (s) for $SIZE_MIB MiB | CPU ms per GiB | minor faults per 4 KiB written | server CPU us per request | wall us per request (QD $REQUESTS) |"
echo "|---|---|---|---|---|---|---|"
for request in $REQUEST_SIZES; do
    for _ in $(seq 1 "$REPEAT"); do
        [ -n "$VBDTOOL_BASELINE" ] && run "$VBDTOOL_BASELINE" "$request"
        run "$VBDTOOL" "$request"
    done
done
