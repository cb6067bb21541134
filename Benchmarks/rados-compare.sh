#!/usr/bin/env bash
# vbd on RADOS against RBD, on one micro Ceph cluster (scripts/ceph-micro-cluster.sh: one monitor,
# one memstore OSD, size 1), same data, same fio jobs (issue 17's targets):
#
#   Benchmarks/rados-compare.sh
#   SIZE=2G CLONE_WRITES=64 FIO_RUNTIME=12 VBDTOOL=.build/release/vbdtool Benchmarks/rados-compare.sh
#
# vbd:   `vbdtool serve --rados vbd` (the store in pool `vbd`), over NBD on 127.0.0.1 (fio's nbd engine).
# RBD:   an image in pool `rbd` (created here), served over NBD by qemu-nbd's rbd driver
#        (qemu-block-extra; --cache=$QEMU_CACHE), and also driven directly by fio's
#        rbd engine (librbd in the fio process).
# Steps, for each: fill the image (fio sequential 1 MiB writes, QD8, data about 2:1 compressible as
# in Benchmarks/fio/), 4k random read QD32 twice (the first warms the caches; the second is
# reported), 4k random write QD32. Then space: snapshot the image, make CLONES clones (vbd shares;
# RBD clones of a protected snapshot), write CLONE_WRITES random 4 KiB blocks of new data into each,
# stop vbd's server (flush and checkpoint) and sum the sizes of every object in each pool.
# Space is "object bytes": the sum of the RADOS objects' sizes (what `rados stat` reports; holes
# inside an object count, which counts against vbd's sparse metadata file more than against RBD).
#
# Environment: SIZE (image size, default 1G), CLONES (default 8), CLONE_WRITES (4 KiB writes per
# clone, default 64), FIO_RUNTIME (s, default 12), FIO_RAMP (s, default 2), VBDTOOL (default
# .build/release/vbdtool), PORT (vbd's NBD port, default 10871; qemu-nbd uses PORT+1), QEMU_CACHE
# (qemu-nbd's --cache, default writeback: librbd's cache on),
# OUT (results dir, default Benchmarks/results/rados-compare-<UTC time>), KEEP=1 keeps the work dir,
# VBD_SERVE_OPTIONS (more options for vbd's serve, e.g. "--lock-duration 120": on a machine at load
# 10 a 2 GiB fill starved the lock's renewal for 30 s, docs/RADOS.md "Known limits"),
# VBD_INIT_OPTIONS (more options for vbd's init, e.g. "--share-chunks-as bench": chunks as shared
# objects in namespace vbd-chunks of the same pool, counted in the space figure too), SPACE=0 (skip
# the space part: snapshot, clones and the object sizes, which stat every object of the pools).
# Output: a table on stdout and in $OUT/table.md; raw fio JSON in $OUT.
# Memory: memstore keeps everything in RAM: about SIZE for each image, plus RBD's copied-up objects
# (4 MiB for every object a clone writes into; with the defaults about 1.7 GiB).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
SIZE="${SIZE:-1G}"
CLONES="${CLONES:-8}"
CLONE_WRITES="${CLONE_WRITES:-64}"
FIO_RUNTIME="${FIO_RUNTIME:-12}"
FIO_RAMP="${FIO_RAMP:-2}"
VBDTOOL="${VBDTOOL:-$repo/.build/release/vbdtool}"
PORT="${PORT:-10871}"
QEMU_CACHE="${QEMU_CACHE:-writeback}"
QEMU_PORT=$((PORT + 1))
OUT="${OUT:-$here/results/rados-compare-$(date -u +%Y%m%dT%H%M%SZ)}"
PY=/usr/bin/python3

for tool in fio qemu-nbd rbd ceph jq; do
    command -v "$tool" >/dev/null || { echo "rados-compare: $tool missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
[ -x "$VBDTOOL" ] || { echo "rados-compare: $VBDTOOL is not built (swift build -c release --product vbdtool)" >&2; exit 1; }
fio --enghelp=rbd >/dev/null 2>&1 || { echo "rados-compare: this fio has no rbd engine" >&2; exit 1; }
qemu-img --help | grep -q "Supported formats:.* rbd" \
    || { echo "rados-compare: qemu has no rbd driver (install qemu-block-extra; scripts/setup.sh does)" >&2; exit 1; }

work="$(mktemp -d /tmp/vbd-rados-compare.XXXXXX)"
mkdir -p "$OUT"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    bash "$repo/scripts/ceph-micro-cluster.sh" stop "$work/ceph" >/dev/null 2>&1 || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$work"
}
trap cleanup EXIT

# memstore's OSD reports 1 GiB by default and the cluster stops taking writes when it is 95 % full
# (a 2 GiB fill as chunk objects got there at about 1.8 GB): 16 GiB of room, RAM used as written.
VBD_CEPH_MEMSTORE_BYTES=${VBD_CEPH_MEMSTORE_BYTES:-17179869184} VBD_CEPH_OWNER_PID=$$ \
    bash "$repo/scripts/ceph-micro-cluster.sh" start "$work/ceph" >/dev/null
conf="$work/ceph/ceph.conf"
export CEPH_CONF="$conf"   # fio's rbd engine and the rbd CLI read it
ceph -c "$conf" osd pool create rbd 8 8 replicated >/dev/null 2>&1
rbd -c "$conf" pool init rbd 2>>"$OUT/rbd.log"
R=(--rados vbd --ceph-conf "$conf" --namespace bench --store "$work/vbd-host")

# wait_port PORT: until something listens on 127.0.0.1:PORT (bounded).
wait_port() {
    for _ in $(seq 300); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "rados-compare: nothing listens on port $1" >&2; exit 1
}

# fio_run NAME ENGINE-OPTIONS... -- JOB-OPTIONS...: one fio job, JSON into $OUT/NAME.json, bounded.
fio_run() {
    local name=$1; shift
    timeout $((FIO_RUNTIME + FIO_RAMP + 600)) fio --output-format=json --output="$OUT/$name.json" --name="$name" \
        --refill_buffers=1 --buffer_compress_percentage=50 --buffer_compress_chunk=4096 --randrepeat=1 \
        --norandommap=1 "$@" >/dev/null
}
timed() { echo "--time_based=1 --runtime=$FIO_RUNTIME --ramp_time=$FIO_RAMP"; }
iops() { jq -r "[.jobs[0].read.iops, .jobs[0].write.iops] | add | floor" "$OUT/$1.json"; }

# measure PREFIX ENGINE-OPTIONS...: fill, warm + measured randread, randwrite.
measure() {
    local prefix=$1; shift
    fio_run "$prefix-fill" "$@" --rw=write --bs=1M --iodepth=8 --size="$SIZE"
    fio_run "$prefix-warmup" "$@" --rw=randread --bs=4k --iodepth=32 $(timed)
    fio_run "$prefix-randread-4k-qd32" "$@" --rw=randread --bs=4k --iodepth=32 $(timed)
    fio_run "$prefix-randwrite-4k-qd32" "$@" --rw=randwrite --bs=4k --iodepth=32 $(timed)
}

# object_bytes POOL: the sum of the sizes of every object in POOL, all namespaces.
object_bytes() {
    "$PY" - "$conf" "$1" <<'EOF'
import rados, sys
cluster = rados.Rados(conffile=sys.argv[1]); cluster.connect()
io = cluster.open_ioctx(sys.argv[2]); io.set_namespace(rados.LIBRADOS_ALL_NSPACES)
total = 0
for obj in io.list_objects():
    io.set_namespace(obj.nspace)
    total += io.stat(obj.key)[0]
    io.set_namespace(rados.LIBRADOS_ALL_NSPACES)
print(total)
EOF
}

echo "rados-compare: SIZE=$SIZE CLONES=$CLONES CLONE_WRITES=$CLONE_WRITES FIO_RUNTIME=$FIO_RUNTIME; $(fio --version); $(qemu-nbd --version | head -1); ceph $(ceph --version | awk '{print $3}')" | tee "$OUT/setup.txt"

# --- vbd on RADOS, over NBD ---
# shellcheck disable=SC2086 # VBD_INIT_OPTIONS is a list of options
"$VBDTOOL" init "${R[@]}" ${VBD_INIT_OPTIONS:-} >/dev/null
echo "rados-compare: vbd init options: ${VBD_INIT_OPTIONS:-(none)}" | tee -a "$OUT/setup.txt"
"$VBDTOOL" create bench --size "$SIZE" "${R[@]}" >/dev/null
# shellcheck disable=SC2086 # VBD_SERVE_OPTIONS is a list of options
"$VBDTOOL" serve "${R[@]}" --listen "127.0.0.1:$PORT" ${VBD_SERVE_OPTIONS:-} >"$OUT/vbd-serve.log" 2>&1 &
vbd_pid=$!; pids+=("$vbd_pid")
wait_port "$PORT"
echo "rados-compare: vbd serve options: ${VBD_SERVE_OPTIONS:-(none)}" | tee -a "$OUT/setup.txt"
measure vbd --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/bench"

# --- RBD: qemu-nbd over librbd, then fio's rbd engine ---
rbd -c "$conf" create --size "$SIZE" rbd/bench 2>>"$OUT/rbd.log"
qemu-nbd -f raw --cache="$QEMU_CACHE" -b 127.0.0.1 -p "$QEMU_PORT" -x bench --persistent --shared=4 \
    "rbd:rbd/bench:conf=$conf:id=admin" >"$OUT/qemu-nbd.log" 2>&1 &
qemu_pid=$!; pids+=("$qemu_pid")
wait_port "$QEMU_PORT"
measure qemu-nbd-rbd --ioengine=nbd --uri="nbd://127.0.0.1:$QEMU_PORT/bench"
kill "$qemu_pid"; wait "$qemu_pid" 2>/dev/null || true
rbd_engine=(--ioengine=rbd --clientname=admin --pool=rbd --rbdname=bench)
fio_run fio-rbd-warmup "${rbd_engine[@]}" --rw=randread --bs=4k --iodepth=32 $(timed)
fio_run fio-rbd-randread-4k-qd32 "${rbd_engine[@]}" --rw=randread --bs=4k --iodepth=32 $(timed)
fio_run fio-rbd-randwrite-4k-qd32 "${rbd_engine[@]}" --rw=randwrite --bs=4k --iodepth=32 $(timed)

# --- space: CLONES clones with CLONE_WRITES new 4 KiB blocks each ---
if [ "${SPACE:-1}" = 0 ]; then
    kill "$vbd_pid"; wait "$vbd_pid" || { echo "rados-compare: vbd's server did not stop cleanly" >&2; tail "$OUT/vbd-serve.log" >&2; exit 1; }
    {
        echo "| measure | vbd on RADOS (NBD) | RBD via qemu-nbd | RBD via fio rbd engine | vbd / qemu-nbd | vbd / fio rbd |"
        echo "|---|---|---|---|---|---|"
        for job in randread-4k-qd32 randwrite-4k-qd32; do
            v=$(iops "vbd-$job"); q=$(iops "qemu-nbd-rbd-$job"); f=$(iops "fio-rbd-$job")
            echo "| $job IOPS | $v | $q | $f | $(awk -v a="$v" -v b="$q" 'BEGIN { printf "%.2f", a / b }') | $(awk -v a="$v" -v b="$f" 'BEGIN { printf "%.2f", a / b }') |"
        done
    } | tee "$OUT/table.md"
    exit 0
fi
"$VBDTOOL" snapshot bench@base "${R[@]}" >/dev/null
rbd -c "$conf" snap create rbd/bench@base 2>>"$OUT/rbd.log"
rbd -c "$conf" snap protect rbd/bench@base 2>>"$OUT/rbd.log"
vbd_before=$(object_bytes vbd); rbd_before=$(object_bytes rbd)
for i in $(seq "$CLONES"); do
    "$VBDTOOL" share bench@base "clone$i" "${R[@]}" >/dev/null
    fio_run "vbd-clone$i" --ioengine=nbd --uri="nbd://127.0.0.1:$PORT/clone$i" --rw=randwrite --bs=4k --iodepth=8 \
        --size="$SIZE" --number_ios="$CLONE_WRITES" --randseed="$i" --end_fsync=1
    rbd -c "$conf" clone rbd/bench@base "rbd/clone$i" 2>>"$OUT/rbd.log"
    fio_run "rbd-clone$i" "${rbd_engine[@]/--rbdname=bench/--rbdname=clone$i}" --rw=randwrite --bs=4k --iodepth=8 \
        --size="$SIZE" --number_ios="$CLONE_WRITES" --randseed="$i"
done
kill "$vbd_pid"; wait "$vbd_pid" || { echo "rados-compare: vbd's server did not stop cleanly" >&2; tail "$OUT/vbd-serve.log" >&2; exit 1; }
grep -q "stopped cleanly" "$OUT/vbd-serve.log" || { echo "rados-compare: vbd's server did not stop cleanly" >&2; exit 1; }
vbd_after=$(object_bytes vbd); rbd_after=$(object_bytes rbd)

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
{
    echo "| measure | vbd on RADOS (NBD) | RBD via qemu-nbd | RBD via fio rbd engine | vbd / qemu-nbd | vbd / fio rbd |"
    echo "|---|---|---|---|---|---|"
    for job in randread-4k-qd32 randwrite-4k-qd32; do
        v=$(iops "vbd-$job"); q=$(iops "qemu-nbd-rbd-$job"); f=$(iops "fio-rbd-$job")
        echo "| $job IOPS | $v | $q | $f | $(ratio "$v" "$q") | $(ratio "$v" "$f") |"
    done
    echo "| image + its writes, object MiB | $(mib "$vbd_before") | $(mib "$rbd_before") | | $(ratio "$vbd_before" "$rbd_before") | |"
    echo "| $CLONES clones x $CLONE_WRITES 4 KiB writes, object MiB added | $(mib $((vbd_after - vbd_before))) | $(mib $((rbd_after - rbd_before))) | | $(ratio $((vbd_after - vbd_before)) $((rbd_after - rbd_before))) | |"
    echo "| all, object MiB | $(mib "$vbd_after") | $(mib "$rbd_after") | | $(ratio "$vbd_after" "$rbd_after") | |"
} | tee "$OUT/table.md"
