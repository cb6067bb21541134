#!/usr/bin/env bash
# The universal cache through the real server: two shares of one image read in full hold each
# block once (the second share's reads are all hits), NBD_CMD_CACHE loads a range, and the
# Prometheus endpoint of `vbdtool serve --metrics` shows it.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdsh nbdcopy python3
requires_vbdtool_serve

make_store 64M
"$VBDTOOL" create img --size 8M --store "$STORE" >/dev/null
start_metrics_server serve.log

metric() {  # metric SERIES: its value, 0 if absent
    python3 - "$URL" "$1" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
for line in body.splitlines():
    if line.startswith(sys.argv[2] + " "):
        print(int(float(line.split()[-1]))); break
else:
    print(0)
PY
}

# 8 MiB of distinct, compressible blocks into the image, then a snapshot and two shares.
nbdsh -u "$(uri img)" -c '
import os
block = bytearray(4096)
data = bytearray()
for i in range(2048):
    block[0:8] = i.to_bytes(8, "little")
    block[8:16] = os.urandom(8)
    data += block
h.pwrite(bytes(data), 0)
h.flush()
'
"$VBDTOOL" snapshot img@gold --store "$STORE" >/dev/null
"$VBDTOOL" share img@gold vm1 --store "$STORE" >/dev/null
"$VBDTOOL" share img@gold vm2 --store "$STORE" >/dev/null

nbdcopy "$(uri vm1)" null: 
hits1=$(metric 'vbd_cache_hits_total{tier="main"}')
miss1=$(metric 'vbd_cache_misses_total')
nbdcopy "$(uri vm2)" null:
hits2=$(metric 'vbd_cache_hits_total{tier="main"}')
miss2=$(metric 'vbd_cache_misses_total')
echo "after vm1: hits $hits1 misses $miss1; after vm2: hits $hits2 misses $miss2"
[ $((hits2 - hits1)) -ge 2048 ] || fail "reading the second share should hit the cache for all 2048 blocks"
[ "$miss2" -eq "$miss1" ] || fail "reading the second share missed the cache ($miss1 -> $miss2)"

# Per-volume counters and space figures are exposed.
v2=$(metric 'vbd_volume_cache_hits_total{tier="main",volume="vm2"}')
[ "$v2" -ge 2048 ] || fail "per-volume hits for vm2: $v2"
alloc=$(metric 'vbd_image_allocated_bytes{image="vm1"}')
[ "$alloc" -eq $((8 << 20)) ] || fail "vm1 allocated bytes $alloc"

# NBD_CMD_CACHE loads a range into a cold cache: restart the server, CACHE 1 MiB of vm1, then
# reading it hits for every block and misses nothing more.
kill -INT $SERVER_PID; wait $SERVER_PID || true
start_metrics_server serve2.log
h0=$(metric 'vbd_cache_hits_total{tier="main"}'); m0=$(metric 'vbd_cache_misses_total')
nbdsh -u "$(uri vm1)" -c 'assert h.can_cache(); h.cache(1 << 20, 0)'
h1=$(metric 'vbd_cache_hits_total{tier="main"}'); m1=$(metric 'vbd_cache_misses_total')
nbdsh -u "$(uri vm1)" -c 'h.pread(1 << 20, 0)'
h2=$(metric 'vbd_cache_hits_total{tier="main"}'); m2=$(metric 'vbd_cache_misses_total')
echo "cold: hits $h0 misses $m0; after CACHE: hits $h1 misses $m1; after reads: hits $h2 misses $m2"
[ $((m1 - m0)) -eq 256 ] || fail "CACHE of 1 MiB should load 256 blocks (misses $m0 -> $m1)"
[ $((h2 - h1)) -eq 256 ] && [ "$m2" -eq "$m1" ] || fail "reads after CACHE should all hit"
echo "cache-metrics ok"
