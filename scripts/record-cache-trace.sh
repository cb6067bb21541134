#!/usr/bin/env bash
# Records the real-client cache trace used by VBDCacheTests (docs/CACHE.md, "Reproducing").
#
# Real NBD clients talk to nbdkit (file plugin + log filter) over a unix socket:
#   1. qemu-img convert writes a 64 MiB ext4 image (real files) onto the export,
#   2. fio (ioengine=nbd) does Zipf-distributed 4 KiB random reads,
#   3. nbdcopy scans the whole export while a second fio Zipf job keeps reading (a backup during load),
#   4. a last fio Zipf job runs after the scan (does the hot set come back quickly?).
# The log is converted to a compact binary trace of 4 KiB block indexes (format: scripts/cache-trace.py)
# with the content identity and LZ4-compressed size of every block, so the replay can dedup equal
# blocks and size the last-chance tier on real data without shipping the data.
#
# Usage: scripts/record-cache-trace.sh [output.vbdtrace]   (default: fixtures/traces/nbd-clients.vbdtrace,
# also copied to Tests/VBDCacheTests/Traces/). Bounded: a 64 MiB device, fixed I/O counts, ~1 minute.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-fixtures/traces/nbd-clients.vbdtrace}
for tool in nbdkit qemu-img nbdcopy fio mkfs.ext4 python3; do
    command -v "$tool" >/dev/null || { echo "record-cache-trace: $tool is required (scripts/setup.sh)" >&2; exit 77; }
done
work=$(mktemp -d)
pidfile="$work/nbdkit.pid"
cleanup() {
    if [ -s "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# A filesystem image with real, mixed content: text (compresses well) and shared objects (less so).
# Sorted file order keeps it repeatable on one machine.
mkdir "$work/root"
python3 - "$work/root" <<'PY'
import os, shutil, sys
dest, budget = sys.argv[1], 40 << 20
roots = ["/usr/share/doc", "/usr/lib/x86_64-linux-gnu", "/usr/share/perl5", "/usr/lib/python3"]
total = 0
for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            src = os.path.join(dirpath, name)
            if not os.path.isfile(src) or os.path.islink(src): continue
            size = os.path.getsize(src)
            if size == 0 or size > (4 << 20) or total + size > budget: continue
            target = os.path.join(dest, os.path.relpath(src, "/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(src, target)
            total += size
        if total >= budget - (64 << 10): break
print(f"record-cache-trace: staged {total >> 20} MiB of files", file=sys.stderr)
PY
truncate -s 64M "$work/source.raw"
mkfs.ext4 -q -F -b 4096 -d "$work/root" "$work/source.raw"
qemu-img convert -f raw -O qcow2 "$work/source.raw" "$work/source.qcow2"
rm -f "$work/source.raw"

truncate -s 64M "$work/export.raw"
nbdkit -U "$work/nbd.sock" -P "$pidfile" --filter=log file "$work/export.raw" logfile="$work/nbd.log"
for _ in $(seq 50); do [ -S "$work/nbd.sock" ] && break; sleep 0.1; done
uri="nbd+unix:///?socket=$work/nbd.sock"

fio_zipf() {   # $1 = job name, $2 = number of I/Os
    timeout 120 fio --name="$1" --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --size=64m \
        --random_distribution=zipf:1.1 --number_ios="$2" --iodepth=4 --randseed=4242 \
        --runtime=60 --time_based=0 --output=/dev/null
}

timeout 120 qemu-img convert -n -f qcow2 -O raw "$work/source.qcow2" "$uri"
fio_zipf warm 10000
fio_zipf during-scan 8000 &
fio_pid=$!
timeout 120 nbdcopy "$uri" null:
wait "$fio_pid"
fio_zipf after-scan 6000

kill "$(cat "$pidfile")"
for _ in $(seq 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
: >"$pidfile"

python3 scripts/cache-trace.py convert --log "$work/nbd.log" --image "$work/export.raw" --output "$out"
if [ "$out" = fixtures/traces/nbd-clients.vbdtrace ]; then
    cp "$out" Tests/VBDCacheTests/Traces/nbd-clients.vbdtrace
fi
python3 scripts/cache-trace.py describe "$out"
