#!/usr/bin/env bash
# Who a client is (issue 13), through vbdtool serve, a real store and real clients:
# - a unix-socket client is its uid/gid as `serve --peer-domain` maps it, and nobody when unmapped;
# - an export binding never makes a client its domain: a plain TCP client (or an unmapped local
#   user) opening a bound export is refused, with or without --enforce-leases, and with
#   --enforce-leases a client that proved nothing gets no export at all, while the server goes on
#   serving the others;
# - leases and bindings follow the image: after `rm vol` and `create vol` neither applies;
# - `audit verify` with an anchor catches records dropped and then written over by new ones.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdsh nbdinfo python3
requires_vbdtool_serve

make_store 4M
"$VBDTOOL" create free --size 1M --store "$STORE" >/dev/null
"$VBDTOOL" domain bind vol alice --store "$STORE" >/dev/null
"$VBDTOOL" lease grant vol --domain alice --duration 10m --store "$STORE" >/dev/null
"$VBDTOOL" lease grant free --domain alice --duration 10m --store "$STORE" >/dev/null
SOCK="$TMPDIR_TEST/nbd.sock"
me=$(id -u)
group=$(id -g)

# serve OPTIONS...: vbdtool serve on $SOCK and on 127.0.0.1 (free port, sets PORT); waits for both.
serve() {
    "$VBDTOOL" serve --store "$STORE" --unix "$SOCK" --listen 127.0.0.1:0 "$@" >"$TMPDIR_TEST/serve.log" 2>&1 &
    SERVER_PID=$!
    cleanup_fn "kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null"
    PORT=""
    for _ in $(seq 1 200); do
        PORT=$(sed -n 's/.*nbd=127\.0\.0\.1:\([0-9]*\),.*/\1/p' "$TMPDIR_TEST/serve.log" | head -1)
        [ -n "$PORT" ] && [ -S "$SOCK" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited"
        sleep 0.1
    done
    fail "server did not start"
}
stop() { kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || fail "unclean stop"; }
tcp() { echo "nbd://127.0.0.1:$PORT/$1"; }
# opens URI EXPORT: the client reads 4 KiB of the export (exit 0) or is refused (exit 1).
opens() { nbdsh -u "$1" -c 'h.pread(4096, 0)' >/dev/null 2>&1; }
# charged DOMAIN: operations charged to DOMAIN so far (0 if none).
charged() {
    "$VBDTOOL" domain stats --json --store "$STORE" | python3 -c '
import json, sys
rows = [d for d in json.load(sys.stdin)["domains"] if d["domain"] == sys.argv[1]]
# operations is encoded as [kind, count, kind, count, ...]
print(sum(rows[0]["usage"]["operations"][1::2]) if rows else 0)' "$1"
}

# 1. Leases enforced, the runner's uid mapped to alice: served over the unix socket, charged to
#    alice; a TCP client proved nothing and gets neither the bound export nor the unbound one.
serve --enforce-leases --peer-domain "uid:$me=alice"
opens "$(uri vol)" || fail "alice (uid $me) was refused her leased, bound volume"
opens "$(tcp vol)" && fail "a plain TCP client opened alice's bound volume under --enforce-leases"
opens "$(tcp free)" && fail "a plain TCP client opened an export under --enforce-leases"
grep -q "proved no identity" "$TMPDIR_TEST/serve.log" || fail "the refusal does not say why"
opens "$(uri free)" || fail "the server stopped serving alice after refusing the TCP clients"
[ "$(charged alice)" -ge 2 ] || fail "alice's reads were not charged to her"
[ "$(charged anonymous)" -eq 0 ] || fail "an unauthenticated client was charged (it was served)"
stop

# 2. The uid is not mapped (another one is): nothing, though alice holds the lease and the binding.
serve --enforce-leases --peer-domain "uid:$((me + 1))=alice"
opens "$(uri vol)" && fail "an unmapped uid opened alice's volume by its binding"
stop

# 3. The gid mapped instead: served as alice.
serve --enforce-leases --peer-domain "gid:$group=alice"
opens "$(uri vol)" || fail "gid $group mapped to alice was refused"
stop

# 4. Leases not enforced: a client that proved nothing is anonymous on unbound exports and
#    refused on bound ones; a mapped uid of another domain is refused on alice's export too.
before=$(charged alice)
serve --peer-domain "uid:$me=bob"
opens "$(tcp vol)" && fail "a plain TCP client opened alice's bound volume (bindings must not grant identity)"
opens "$(tcp free)" || fail "a plain TCP client was refused an unbound export without --enforce-leases"
opens "$(uri vol)" && fail "bob (uid $me) opened alice's bound volume"
opens "$(uri free)" || fail "bob was refused an unbound export"
[ "$(charged anonymous)" -ge 1 ] || fail "the TCP client's read was not charged to anonymous"
[ "$(charged bob)" -ge 1 ] || fail "bob's read was not charged to bob"
[ "$(charged alice)" -eq "$before" ] || fail "someone else's reads were charged to alice"
stop

# 5. Leases and bindings follow the image: rm drops them, a new image named vol has neither.
"$VBDTOOL" rm vol --store "$STORE" >/dev/null
"$VBDTOOL" create vol --size 4M --store "$STORE" >/dev/null
"$VBDTOOL" lease list --json --store "$STORE" | python3 -c '
import json, sys
leases = json.load(sys.stdin)
assert [l["volume"] for l in leases] == ["free"], leases' || fail "the deleted volume's lease outlived it"
serve --enforce-leases --peer-domain "uid:$me=alice"
opens "$(uri vol)" && fail "alice's lease on the deleted vol admitted her to the new vol"
stop
serve --peer-domain "uid:$me=bob"
opens "$(uri vol)" || fail "the deleted vol's binding to alice still refuses bob on the new vol"
stop
"$VBDTOOL" audit --json --store "$STORE" | python3 -c '
import json, sys
ops = [(r["operation"], r["target"]) for r in json.load(sys.stdin)]
assert ("lease.drop", "vol") in ops and ("binding.drop", "vol") in ops, ops' || fail "rm did not audit the dropped lease and binding"

# 6. The audit anchor: the head kept now still verifies after more records, but not once records
#    up to it were dropped and the log written on from there.
anchor=$("$VBDTOOL" audit verify --json --store "$STORE" | python3 -c '
import json, sys
r = json.load(sys.stdin); print(r["headSequence"], r["headHash"])')
read -r anchor_sequence anchor_hash <<<"$anchor"
"$VBDTOOL" snapshot vol@one --store "$STORE" >/dev/null
"$VBDTOOL" audit verify --anchor-sequence "$anchor_sequence" --anchor-hash "$anchor_hash" --store "$STORE" >/dev/null \
    || fail "the anchor does not verify a log that only grew"
head -n -4 "$STORE/audit.log" > "$TMPDIR_TEST/audit.cut"   # drops the lease.drop among others
cat "$TMPDIR_TEST/audit.cut" > "$STORE/audit.log"
for name in a b c d e; do "$VBDTOOL" create "$name" --size 1M --store "$STORE" >/dev/null; done
"$VBDTOOL" audit verify --store "$STORE" >/dev/null || fail "the rewritten tail should be a valid chain on its own"
set +e
"$VBDTOOL" audit verify --anchor-sequence "$anchor_sequence" --anchor-hash "$anchor_hash" --store "$STORE" \
    > "$TMPDIR_TEST/verify.out" 2>&1
status=$?
set -e
[ "$status" -eq 2 ] || fail "audit verify with the anchor exited $status after records were dropped and rewritten: $(cat "$TMPDIR_TEST/verify.out")"
grep -q "record $anchor_sequence" "$TMPDIR_TEST/verify.out" || fail "verify did not name the anchored record: $(cat "$TMPDIR_TEST/verify.out")"
echo "identity ok"
