#!/usr/bin/env bash
# Accounting, leases and the audit log through the real server and CLI: a domain without a lease
# is refused, one with a lease is served and charged, a second domain cannot take a write lease,
# a revoked lease closes the holder's open connection, and `audit verify` catches tampering.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdsh python3
requires_vbdtool_serve

make_store 16M
"$VBDTOOL" domain bind vol alice --store "$STORE" >/dev/null
# The test runner's uid is alice (SO_PEERCRED on the unix socket). A small main cache (1 MiB, the
# smallest serve accepts) over a larger last-chance tier, so reads show both tiers.
start_metrics_server serve.log --enforce-leases --peer-domain "uid:$(id -u)=alice" --cache-size 1M --last-chance-size 32M

# No lease: alice's connection to vol is refused.
if nbdsh -u "$(uri vol)" -c 'h.pread(4096, 0)' 2>/dev/null; then fail "served without a lease"; fi

# With a lease: served and charged to alice.
"$VBDTOOL" lease grant vol --domain alice --duration 10m --store "$STORE" >/dev/null
"$VBDTOOL" snapshot vol@before --store "$STORE" >/dev/null
T1=$(date +%s.%N)
nbdsh -u "$(uri vol)" -c 'h.pwrite(b"\x5a" * (1 << 20), 0); h.flush(); assert h.pread(4096, 0) == b"\x5a" * 4096'
T2=$(date +%s.%N)
"$VBDTOOL" snapshot vol@after --store "$STORE" >/dev/null
written=$("$VBDTOOL" domain stats --json --store "$STORE" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print([d for d in s["domains"] if d["domain"] == "alice"][0]["usage"]["bytesWritten"])')
[ "$written" -ge $((1 << 20)) ] || fail "alice was charged $written bytes written, expected at least 1 MiB"

# The metrics endpoint shows the same charge.
python3 - "$URL" <<'PY' || fail "metrics do not show alice's writes"
import sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
line = [l for l in body.splitlines() if l.startswith('vbd_domain_written_bytes_total{domain="alice"}')][0]
assert float(line.split()[-1]) >= 1 << 20, line
PY

# Cache hits are charged to the domain that read: 8 MiB of distinct blocks written (the writes
# fill the cache; the 1 MiB main tier evicts most into the last-chance tier), then read twice.
nbdsh -u "$(uri vol)" -c '
blocks = [bytes([i % 251]) * 2048 + i.to_bytes(4, "little") * 512 for i in range(2048)]
h.pwrite(b"".join(blocks), 2 << 20)
for _ in range(2):
    assert h.pread(8 << 20, 2 << 20) == b"".join(blocks)'
"$VBDTOOL" stats --json --store "$STORE" > "$TMPDIR_TEST/stats.json"
"$VBDTOOL" domain stats --json --store "$STORE" | python3 -c '
import json, sys
s = json.load(sys.stdin)
store = json.load(open(sys.argv[1]))
alice = [d for d in s["domains"] if d["domain"] == "alice"][0]
u = alice["usage"]
assert u["cacheHits"] > 0 and u["lastChanceHits"] > 0, u
assert u["cacheHits"] + u["lastChanceHits"] <= 2 * 2048 + 1, u   # at most one hit per block read
# Storage: alice holds what vol stores; the per-domain shares add up to the bytes stored.
assert alice["storage"]["fairStoredBytes"] > 0 and alice["storage"]["images"][0] == "vol", alice["storage"]
total = sum(d["storage"]["fairStoredBytes"] for d in s["domains"])
assert abs(total - store["storedBytes"]) < 1, (total, store["storedBytes"])' "$TMPDIR_TEST/stats.json" \
    || fail "domain stats do not show alice's cache hits and storage"
"$VBDTOOL" domain stats --store "$STORE" | grep -q "STORED" || fail "domain stats table has no storage column"
python3 - "$URL" <<'PY' || fail "metrics do not show alice's cache hits and storage"
import sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
def value(prefix):
    return float([l for l in body.splitlines() if l.startswith(prefix)][0].split()[-1])
assert value('vbd_domain_cache_hits_total{domain="alice",tier="last_chance"}') > 0
assert value('vbd_domain_cache_hits_total{domain="alice",tier="main"}') > 0
assert value('vbd_domain_stored_bytes{domain="alice"}') > 0
PY

# Two domains never hold a write lease on one volume at once.
if "$VBDTOOL" lease grant vol --domain bob --store "$STORE" 2>/dev/null; then fail "bob got a write lease alice holds"; fi

# Revoking closes alice's open connection (after in-flight requests), and bob may then lease it.
python3 - "$(uri vol)" "$VBDTOOL" "$STORE" <<'PY' || fail "the revoked domain's connection stayed open"
import nbd, subprocess, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pread(4096, 0)
subprocess.run([sys.argv[2], "lease", "revoke", "vol", "--domain", "alice", "--store", sys.argv[3]], check=True,
               stdout=subprocess.DEVNULL)
# The server closes the connection after the revoke; requests until then are still answered,
# the first after it fails. (Bounded only so that a connection left open fails, not hangs.)
deadline = time.time() + 120
while time.time() < deadline:
    try:
        h.pread(4096, 0)
    except nbd.Error:
        sys.exit(0)          # closed, as it must be
sys.exit(1)
PY
"$VBDTOOL" lease grant vol --domain bob --mode write --duration 5m --store "$STORE" >/dev/null
"$VBDTOOL" lease list --store "$STORE" | grep -q bob || fail "bob's lease is not listed"

# The audit log has every step, chained, and verify catches an altered record.
"$VBDTOOL" audit --json --store "$STORE" | python3 -c '
import json, sys
ops = [r["operation"] for r in json.load(sys.stdin)]
for want in ["volume.create", "binding.set", "lease.grant", "lease.revoke"]:
    assert want in ops, (want, ops)'
"$VBDTOOL" audit verify --store "$STORE" >/dev/null || fail "audit verify failed on an untouched log"

# Forensics: between T1 and T2 alice held vol, and the snapshot diff shows her 1 MiB write.
"$VBDTOOL" audit forensics vol --from "$T1" --to "$T2" --json --store "$STORE" | python3 -c '
import json, sys
r = json.load(sys.stdin)
assert r["fromSnapshot"] == "vol@before" and r["toSnapshot"] == "vol@after", r
assert [h["domain"] for h in r["holders"]] == ["alice"], r["holders"]
assert r["changedRanges"] == [{"offset": 0, "length": 1 << 20}], r["changedRanges"]' || fail "forensics report is wrong"
kill -INT $SERVER_PID; wait $SERVER_PID || true
sed -i '2s/"binding.set"/"binding.xxx"/' "$STORE/audit.log"
if "$VBDTOOL" audit verify --store "$STORE" > "$TMPDIR_TEST/verify.out"; then fail "tampering not detected"; fi
grep -q "record 1" "$TMPDIR_TEST/verify.out" || fail "verify did not name the altered record: $(cat "$TMPDIR_TEST/verify.out")"
echo "tenancy ok"
