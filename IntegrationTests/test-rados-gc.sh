#!/usr/bin/env bash
# The leak sweep outside a takeover, on a store whose chunks are shared RADOS objects
# (docs/RADOS.md, "The sweep in gc"), on a micro Ceph cluster of its own:
# - `vbdtool gc`, through the server's control socket, runs again and again while an NBD client
#   writes (new, repeated and overwritten blocks, a flush now and then): it reports the sweep
#   ("unclaimed chunk references released: N"), and never releases a reference a block still
#   needs: every block reads back its last write, in the same server and after a restart, and
#   fsck (which reads and verifies every chunk object) is clean;
# - a family deleted as a whole (every object of its namespace removed) leaves its references on
#   the shared objects; `vbdtool sweep-deleted-family` refuses while the store is there, and
#   afterwards releases them: the objects only it held go, the shared ones stay for the other
#   family, which still reads everything.
# Without Ceph this fails (the cluster script names the missing binary): it never skips.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdsh nbdcopy rados cmp
requires_vbdtool_serve

start_micro_cluster
DOMAIN=domgc
chunk_objects() { rados -c "$CONF" -p vbd -N vbd-chunks ls 2>/dev/null | grep -c "^chunk\.$DOMAIN-" || true; }

STORE="$TMPDIR_TEST/host-a"
A=(--rados vbd --ceph-conf "$CONF" --namespace fam-a)
"$VBDTOOL" init "${A[@]}" --store "$STORE" --share-chunks-as "$DOMAIN" >/dev/null || fail "init --share-chunks-as"
"$VBDTOOL" create vol --size 4M --group pool "${A[@]}" --store "$STORE" >/dev/null || fail "create"
start_server "${A[@]}"

# The writer: 8 s of 4 KiB writes at random blocks (a third repeat one of 8 contents), a flush
# every 40; then a flush, a read-back of every block against what it wrote last, and the image
# it expects, for the check after the restart.
EXPECTED="$TMPDIR_TEST/expected" nbdsh -u "$(uri vol)" -c '
import os, random, time
blocks = 1024
rng = random.Random(17)
image = bytearray(blocks * 4096)
repeated = [bytes([i + 1]) * 4096 for i in range(8)]
writes = 0
end = time.time() + 8
while time.time() < end:
    b = rng.randrange(blocks)
    data = rng.choice(repeated) if rng.random() < 0.33 else rng.randbytes(4096)
    h.pwrite(data, b * 4096)
    image[b * 4096:(b + 1) * 4096] = data
    writes += 1
    if writes % 40 == 0:
        h.flush()
h.flush()
back = h.pread(blocks * 4096, 0)
bad = [b for b in range(blocks) if back[b * 4096:(b + 1) * 4096] != image[b * 4096:(b + 1) * 4096]]
assert not bad, f"{len(bad)} blocks read back wrong, first {bad[:5]}"
open(os.environ["EXPECTED"], "wb").write(image)
print(f"verified {writes} writes", flush=True)
' > "$TMPDIR_TEST/writer.out" 2>&1 &
WRITER=$!
cleanup_fn "kill $WRITER 2>/dev/null"

RUNS=0
while kill -0 "$WRITER" 2>/dev/null; do
    "$VBDTOOL" gc "${A[@]}" --store "$STORE" > "$TMPDIR_TEST/gc.out" 2>&1 || fail "gc during writes: $(cat "$TMPDIR_TEST/gc.out")"
    grep -q "^unclaimed chunk references released: " "$TMPDIR_TEST/gc.out" || fail "gc did not report its sweep: $(cat "$TMPDIR_TEST/gc.out")"
    RUNS=$((RUNS + 1))
done
wait "$WRITER" || fail "the writer: $(cat "$TMPDIR_TEST/writer.out")"
[ "$RUNS" -ge 2 ] || fail "gc ran $RUNS times during the writes"
echo "gc ran $RUNS times during the writes; writer: $(cat "$TMPDIR_TEST/writer.out")"
"$VBDTOOL" gc "${A[@]}" --store "$STORE" --json | grep -q '"unclaimedChunkReferencesReleased"' || fail "gc --json lacks the sweep"
"$VBDTOOL" fsck "${A[@]}" --store "$STORE" | grep -q "^clean" || fail "fsck after gc during writes"

# A restart (SIGTERM hands over cleanly) reads back the same image.
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
start_server "${A[@]}"
nbdcopy "$(uri vol)" "$TMPDIR_TEST/back" || fail "nbdcopy out after the restart"
cmp "$TMPDIR_TEST/expected" "$TMPDIR_TEST/back" || fail "the image read back after the restart differs"
BEFORE=$(chunk_objects)

# A second family writes the same first 1 MiB (shared) and 1 MiB of its own, then is deleted.
head -c 1M "$TMPDIR_TEST/expected" > "$TMPDIR_TEST/b.img"
head -c 1M /dev/urandom >> "$TMPDIR_TEST/b.img"
B=(--rados vbd --ceph-conf "$CONF" --namespace fam-b --store "$TMPDIR_TEST/host-b")
"$VBDTOOL" init "${B[@]}" --share-chunks-as "$DOMAIN" >/dev/null || fail "init of the second family"
"$VBDTOOL" import "$TMPDIR_TEST/b.img" vol --format raw --group pool "${B[@]}" >/dev/null || fail "import into the second family"
WITH_B=$(chunk_objects)
[ "$WITH_B" = $((BEFORE + 256)) ] || fail "$WITH_B chunk objects with the second family, expected $BEFORE + 256 (its own MiB)"
# Its references: one per distinct non-zero block of the shared MiB, and its own 256.
SHARED=$(python3 -c '
import sys
d = open(sys.argv[1], "rb").read(1 << 20)
print(len({d[i:i + 4096] for i in range(0, len(d), 4096)} - {bytes(4096)}))' "$TMPDIR_TEST/b.img")
OUT=$(refused sweep-deleted-family "${B[@]}")
echo "$OUT" | grep -q "still holds a store" || fail "sweep-deleted-family of a live store: $OUT"
# shellcheck disable=SC2046
rados -c "$CONF" -p vbd -N fam-b rm $(rados -c "$CONF" -p vbd -N fam-b ls) 2>/dev/null || fail "removing the second family's objects"
[ -z "$(rados -c "$CONF" -p vbd -N fam-b ls)" ] || fail "objects left in the second family's namespace"
"$VBDTOOL" gc "${A[@]}" --store "$STORE" | grep -q "^unclaimed chunk references released: 0 " || fail "the first family's gc released the deleted family's references"
[ "$(chunk_objects)" = "$WITH_B" ] || fail "objects went before the deleted family's sweep"
OUT=$("$VBDTOOL" sweep-deleted-family "${B[@]}") || fail "sweep-deleted-family: $OUT"
echo "$OUT"
echo "$OUT" | grep -q "^released $((SHARED + 256)) chunk references .* (256 objects" || fail "sweep-deleted-family: expected $((SHARED + 256)) references released and 256 objects removed"
[ "$(chunk_objects)" = "$BEFORE" ] || fail "$(chunk_objects) chunk objects after the deleted family's sweep, expected $BEFORE"
nbdcopy "$(uri vol)" "$TMPDIR_TEST/back2" || fail "nbdcopy out of the first family"
cmp "$TMPDIR_TEST/expected" "$TMPDIR_TEST/back2" || fail "the first family's image changed"
"$VBDTOOL" fsck "${A[@]}" --store "$STORE" | grep -q "^clean" || fail "fsck after the deleted family's sweep"
echo PASS
