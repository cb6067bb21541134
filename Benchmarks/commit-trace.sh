#!/usr/bin/env bash
# What a commit holds the store lock for, under 4 KiB random writes (issue 15).
#
#   Benchmarks/commit-trace.sh VBDTOOL STORE SECONDS OUT
#
# Serves STORE (an existing store with a volume "vol", such as one Benchmarks/metadata-scale.sh
# kept) with VBD_LOCK_TRACE_MS=0.5, writes fresh 4 KiB blocks at random at QD8 for SECONDS, stops
# the server, and prints from its trace (kept in OUT): how many commits prepared, their longest
# holds split into steps, the longest holds of any site, and the largest commit batches.
set -euo pipefail
vbdtool=${1:?usage: commit-trace.sh VBDTOOL STORE SECONDS OUT} store=${2:?} secs=${3:?} out=${4:?}
work=$(mktemp -d "${TMPDIR:-/tmp}/vbd-commit-trace.XXXXXX")
sock=$work/nbd.sock
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
VBD_LOCK_TRACE_MS=0.5 nice -n -15 "$vbdtool" serve --store "$store" --unix "$sock" --metadata-cache 256M \
    --cache-size 64M --last-chance-size 0 --log-level warning 2> "$out" &
server=$!
for _ in $(seq 1 200); do nbdinfo --size "nbd+unix:///vol?socket=$sock" >/dev/null 2>&1 && break; sleep 0.05; done
nice -n -15 fio --name=w --ioengine=nbd --uri="nbd+unix:///vol?socket=$sock" --rw=randwrite --bs=4k --iodepth=8 \
    --runtime="$secs" --time_based --refill_buffers --buffer_compress_percentage=95 --size=128G \
    --output=/dev/null >/dev/null 2>&1
kill "$server"; wait "$server" 2>/dev/null || true
server=
echo "commit preparations traced: $(grep -c 'image-table' "$out" || true)"
echo "longest commit preparations (ms wall, ms CPU, steps):"
grep 'image-table' "$out" | sed 's/.*held \([0-9.]*\) ms (\([0-9.]*\) ms on the CPU).*Persistence.swift:[0-9]*\(.*\)/\1 \2\3/' | sort -n | tail -5 || true
echo "longest freeze steps (ms wall, ms CPU):"
grep 'freeze-step' "$out" | grep -v 'image-table' | sed 's/.*held \([0-9.]*\) ms (\([0-9.]*\) ms on the CPU).*/\1 \2/' | sort -n | tail -3 || true
echo "holds of 0.5 ms or more: $(grep -c 'lock trace' "$out" || true); the longest (ms wall, ms CPU, site):"
grep 'lock trace' "$out" | sed 's/.*held \([0-9.]*\) ms (\([0-9.]*\) ms on the CPU).*taken at \([^ ]*\).*/\1 \2 \3/' | sort -n | tail -5 || true
echo "largest commit batches (pages):"
grep 'commit trace' "$out" | sed 's/.*generation [0-9]*: pages \([0-9]*\).*/\1/' | sort -n | tail -3 || true
