#!/usr/bin/env bash
# Open time of `vbdtool list`, alternating two binaries on their own copies of one store:
#   Benchmarks/open-ab.sh ROUNDS BIN_A STORE_A BIN_B STORE_B
# Each round: warm (files in the page cache), then cold (meta, superblock and journals dropped
# from the page cache with posix_fadvise(DONTNEED) first). Prints wall seconds per run. Without
# a server, `list` opens the store read-only: the superblock, the journal's replay and the image
# table, and (before format 4) the whole sector map. A format-3 vbdtool refuses a format-4 store:
# give it a copy whose superblock Benchmarks/superblock-format3.py rewrote (meta and data are the
# same in both formats).
set -euo pipefail
rounds=$1; shift
drop() {
    python3 - "$1" <<'PY'
import os, sys, glob
d = sys.argv[1]
for p in [d + "/meta", d + "/superblock"] + glob.glob(d + "/journal-*"):
    fd = os.open(p, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
PY
}
timed() { local s e; s=$(date +%s.%N); "$1" list --store "$2" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
bins=("$1" "$3"); stores=("$2" "$4")
for r in $(seq 1 "$rounds"); do
    for k in 0 1; do
        bin=${bins[$k]} store=${stores[$k]}
        w=$(timed "$bin" "$store"); drop "$store"; c=$(timed "$bin" "$store")
        printf 'round %d %s warm %.3f cold %.3f (load %s)\n' "$r" "$(basename "$bin")" "$w" "$c" "$(cut -d' ' -f1 /proc/loadavg)"
    done
done
