#!/usr/bin/env bash
# A store whose chunks are shared RADOS objects (`init --rados ... --share-chunks-as DOMAIN`),
# served by `vbdtool serve` on a micro Ceph cluster of its own and written through NBD:
# - nbdcopy writes 1 MiB of random data (256 distinct 4 KiB blocks) with a flush: 256 chunk
#   objects appear in the pool's chunk namespace and the family's namespace gets no data stripe;
# - a block written and flushed with nbdsh survives a SIGKILL of the server: the restarted
#   server (taking over with --force) reads everything back (every chunk hash-checked on its
#   way); the object of a write answered but not flushed before the kill is released by the
#   restarted server's leak sweep;
# - trimming half of the data leaves the objects in place until the flush makes the trim
#   durable; after the flush 128 of them are gone;
# - a second family of the same domain, on a second host (its own server and host directory),
#   writing the same data adds no object: dedup across the two hosts' stores.
# Without Ceph this fails (the cluster script names the missing binary): it never skips.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdsh nbdcopy rados cmp
requires_vbdtool_serve

start_micro_cluster
DOMAIN=dom1

chunk_objects() { rados -c "$CONF" -p vbd -N vbd-chunks ls 2>/dev/null | grep -c "^chunk\.$DOMAIN-" || true; }
family_objects() { rados -c "$CONF" -p vbd -N "$1" ls 2>/dev/null; }
expect_objects() {
    local n; n=$(chunk_objects)
    [ "$n" = "$1" ] || fail "$2: $n chunk objects, expected $1"
    echo "$2: $n chunk objects"
}

STORE="$TMPDIR_TEST/host-a"
A=(--rados vbd --ceph-conf "$CONF" --namespace fam-a)
"$VBDTOOL" init "${A[@]}" --store "$STORE" --share-chunks-as "$DOMAIN" | grep -q "shared in domain $DOMAIN" || fail "init --share-chunks-as"
"$VBDTOOL" create vol --size 8M --group pool "${A[@]}" --store "$STORE" >/dev/null || fail "create"
head -c 1M /dev/urandom > "$TMPDIR_TEST/data"

start_server "${A[@]}"
nbdcopy --flush "$TMPDIR_TEST/data" "$(uri vol)" || fail "nbdcopy into the volume"
expect_objects 256 "after 1 MiB of random data"
if family_objects fam-a | grep -q '^stripe\.data\.'; then fail "the family's data file holds stripes"; fi
family_objects fam-a | grep -qx chunk-serials || fail "no serial reservation in the family's namespace"

# A flushed write survives a SIGKILL of the server; a write it answered but never flushed is
# lost (on RADOS a kill is a power cut), and the object that write stored is released by the
# next owner's open (the leak sweep after a takeover).
nbdsh -u "$(uri vol)" -c '
import time
h.pwrite(b"\x5a" * 4096, 300 * 4096)
h.flush()
h.pwrite(b"\x6b" * 4096, 400 * 4096)
print("written", flush=True)
time.sleep(60)
' > "$TMPDIR_TEST/nbdsh.out" 2>&1 &
NBDSH_PID=$!
cleanup_fn "kill $NBDSH_PID 2>/dev/null"
for _ in $(seq 300); do grep -q written "$TMPDIR_TEST/nbdsh.out" && break; sleep 0.1; done
grep -q written "$TMPDIR_TEST/nbdsh.out" || fail "nbdsh did not write: $(cat "$TMPDIR_TEST/nbdsh.out")"
kill -KILL "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
kill "$NBDSH_PID" 2>/dev/null; wait "$NBDSH_PID" 2>/dev/null || true
expect_objects 258 "after the flushed and the unflushed write"
# The killed server still holds the store's lock: the new one fences it, takes over and sweeps.
start_server "${A[@]}" --take-over --force
grep -q "released 1 chunk references the previous owner left unclaimed" "$TMPDIR_TEST/serve.log" || fail "no sweep after the takeover"
expect_objects 257 "after the takeover's sweep"
nbdcopy "$(uri vol)" "$TMPDIR_TEST/back" || fail "nbdcopy out of the restarted server"
cmp -n 1048576 "$TMPDIR_TEST/data" "$TMPDIR_TEST/back" || fail "the data read back after the restart differs"
cmp -i $((300 * 4096)):0 -n 4096 "$TMPDIR_TEST/back" <(head -c 4096 /dev/zero | tr '\0' '\132') || fail "the flushed block was lost"
cmp -i $((400 * 4096)):0 -n 4096 "$TMPDIR_TEST/back" /dev/zero || fail "the unflushed block came back"

# Trim half of the data: the objects go only once the flush made the trim durable.
COUNT="rados -c '$CONF' -p vbd -N vbd-chunks ls 2>/dev/null | grep -c '^chunk\.$DOMAIN-'" nbdsh -u "$(uri vol)" -c '
import os, subprocess
h.trim(512 * 1024, 0)
n = subprocess.run(["bash", "-c", os.environ["COUNT"]], capture_output=True, text=True).stdout.strip()
assert n == "257", f"{n} chunk objects after the trim, before its flush; expected 257"
h.flush()
' || fail "objects went before the trim was durable"
expect_objects 129 "after the trim's flush"
"$VBDTOOL" fsck "${A[@]}" --store "$STORE" | grep -q "^clean" || fail "fsck through the server"

# A second host's family in the same domain writes the same data: no new object.
SOCK_A=$SOCK; PID_A=$SERVER_PID
STORE="$TMPDIR_TEST/host-b"
B=(--rados vbd --ceph-conf "$CONF" --namespace fam-b)
"$VBDTOOL" init "${B[@]}" --store "$STORE" --share-chunks-as "$DOMAIN" >/dev/null || fail "init of the second family"
"$VBDTOOL" create vol --size 8M --group pool "${B[@]}" --store "$STORE" >/dev/null || fail "create in the second family"
SOCK="$TMPDIR_TEST/nbd-b.sock"
launch_server "$TMPDIR_TEST/serve-b.log" --unix "$SOCK" "${B[@]}"
nbdcopy --flush "$TMPDIR_TEST/data" "$(uri vol)" || fail "nbdcopy into the second family"
# The first family still holds the second half (128 objects) and the 0x5a block: only the 128
# trimmed blocks are new (385 without dedup across the families).
expect_objects 257 "after the second host wrote the same 1 MiB"
nbdcopy "$(uri vol)" "$TMPDIR_TEST/back-b" || fail "nbdcopy out of the second family"
cmp -n 1048576 "$TMPDIR_TEST/data" "$TMPDIR_TEST/back-b" || fail "the second family reads other data"
SOCK=$SOCK_A
nbdcopy "$(uri vol)" "$TMPDIR_TEST/back-a" || fail "nbdcopy out of the first family"
cmp -n 524288 -i 524288 "$TMPDIR_TEST/data" "$TMPDIR_TEST/back-a" || fail "the first family's data changed"
echo PASS
