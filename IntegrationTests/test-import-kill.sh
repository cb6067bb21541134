#!/usr/bin/env bash
# `vbdtool import` is all or nothing (issue 18): killed with SIGKILL in the middle of copying, it
# leaves no volume under the name (nothing half-filled or empty that blocks a rerun); the rerun
# succeeds, its data is the image's, and fsck is clean. The kill is timed by the store's data file
# growing past 16 MiB (the import is copying), not by a sleep.
source "$(dirname "$0")/nbd-functions.sh"
requires python3 cmp
if [ -z "${VBDTOOL:-}" ] || [ ! -x "$VBDTOOL" ]; then echo "SKIP: VBDTOOL not built"; exit 77; fi

TMPDIR_TEST=$(mktemp -d)
cleanup_fn "rm -rf '$TMPDIR_TEST'"
STORE="$TMPDIR_TEST/store"
IMAGE="$TMPDIR_TEST/image.raw"
"$VBDTOOL" init --store "$STORE" >/dev/null
# Incompressible and unique: every block is new data, so the import takes a while to copy it.
head -c $((384 << 20)) /dev/urandom > "$IMAGE"

"$VBDTOOL" import "$IMAGE" vm --format raw --store "$STORE" >"$TMPDIR_TEST/first.log" 2>&1 &
pid=$!
cleanup_fn "kill -9 $pid 2>/dev/null"
threshold=$((16 << 20))
deadline=$(( $(date +%s) + 120 ))
while :; do
    size=$(stat -c %s "$STORE/data" 2>/dev/null || echo 0)
    [ "$size" -ge "$threshold" ] && break
    kill -0 "$pid" 2>/dev/null || fail "the import finished before it could be killed (data file $size bytes): $(cat "$TMPDIR_TEST/first.log")"
    [ "$(date +%s)" -lt "$deadline" ] || fail "the import did not start copying within 120 s"
    sleep 0.01
done
kill -9 "$pid"
wait "$pid" 2>/dev/null && fail "the import was not killed" || true
echo "killed the import at a data file of $size bytes"

# No volume named vm (and no hidden leftover) is listed after the kill.
listed=$("$VBDTOOL" list --json --store "$STORE" | python3 -c 'import json, sys; print(" ".join(i["name"] for i in json.load(sys.stdin)))')
[ -z "$listed" ] || fail "after the killed import the store lists: $listed"

# The rerun succeeds and its data is the image's.
"$VBDTOOL" import "$IMAGE" vm --format raw --store "$STORE" >"$TMPDIR_TEST/second.log" 2>&1 \
    || fail "re-running the import failed: $(cat "$TMPDIR_TEST/second.log")"
"$VBDTOOL" export vm "$TMPDIR_TEST/back.raw" --store "$STORE" >/dev/null
cmp "$IMAGE" "$TMPDIR_TEST/back.raw" || fail "the re-imported volume differs from the image"
listed=$("$VBDTOOL" list --json --store "$STORE" | python3 -c 'import json, sys; print(" ".join(i["name"] for i in json.load(sys.stdin)))')
[ "$listed" = "vm" ] || fail "after the rerun the store lists '$listed', expected 'vm'"
"$VBDTOOL" fsck --store "$STORE" >"$TMPDIR_TEST/fsck.log" 2>&1 || fail "fsck after the rerun: $(cat "$TMPDIR_TEST/fsck.log")"
echo "PASS: killed import left no volume; the rerun imported all $(( 384 )) MiB"
