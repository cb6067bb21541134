#!/usr/bin/env bash
# vbdtool serve with TLS and client certificates, against a real store, with certificates made by
# openssl (make-test-certificates.sh): plain clients are refused with --tls-required; a client is
# the domain its verified certificate names (structured subject match, --certificate-domain), and
# nothing else: a certificate from another CA, an expired one, none at all, or one whose subject is
# crafted to read like another tenant's gets no export, while the server keeps serving the others.
# Without --tls-ca a certificate is not verified and proves nothing. The control socket (local,
# owner-only) keeps working alongside.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/nbd-functions.sh"
requires openssl nbdinfo nbdsh python3
requires_vbdtool_serve
make_store 1M
CERTS="$TMPDIR_TEST/certs"
bash "$here/make-test-certificates.sh" "$CERTS" || fail "openssl could not make the certificates"
SOCK="$TMPDIR_TEST/nbd.sock"
TENANT_A="CN=tenant-a,O=tenants"   # unmapped: the domain is the subject's RFC 4514 text
"$VBDTOOL" create vol-a --size 1M --store "$STORE" >/dev/null
"$VBDTOOL" create vol-b --size 1M --store "$STORE" >/dev/null
"$VBDTOOL" domain bind vol-a "$TENANT_A" --store "$STORE" >/dev/null
"$VBDTOOL" domain bind vol-b bee --store "$STORE" >/dev/null
"$VBDTOOL" lease grant vol-a --domain "$TENANT_A" --duration 10m --store "$STORE" >/dev/null
"$VBDTOOL" lease grant vol-b --domain bee --duration 10m --store "$STORE" >/dev/null

serve() {
    "$VBDTOOL" serve --store "$STORE" --unix "$SOCK" --tls-cert "$CERTS/server-cert.pem" \
        --tls-key "$CERTS/server-key.pem" "$@" >"$TMPDIR_TEST/serve.log" 2>&1 &
    SERVER_PID=$!
    cleanup_fn "kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null"
    for _ in $(seq 1 200); do
        grep -q "serving" "$TMPDIR_TEST/serve.log" && [ -S "$SOCK" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || fail "server exited"
        sleep 0.1
    done
    fail "server did not start"
}
stop() { kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || fail "unclean stop"; }
# session EXPORT CLIENT CODE: nbdsh over TLS with the certificates of $CERTS/CLIENT (libnbd's
# tls-certificates layout) runs CODE on EXPORT; exit 0 when it connected and CODE succeeded.
session() {
    nbdsh -c "
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates('$CERTS/$2')
h.set_tls_verify_peer(False)
h.set_export_name('$1')
h.connect_unix('$SOCK')
$3
h.shutdown()" >"$TMPDIR_TEST/client.out" 2>&1
}
# writes EXPORT CLIENT BYTE: the client writes 64 KiB of BYTE at 0 and reads it back (exit 0), or is refused.
writes() {
    session "$1" "$2" "h.pwrite(bytes([$3]) * 65536, 0); h.flush(); assert h.pread(65536, 0) == bytes([$3]) * 65536"
}
charged() {
    "$VBDTOOL" domain stats --json --store "$STORE" | python3 -c '
import json, sys
# operations is encoded as [kind, count, kind, count, ...]
print(json.dumps({d["domain"]: sum(d["usage"]["operations"][1::2]) for d in json.load(sys.stdin)["domains"]
                  if sum(d["usage"]["operations"][1::2])}, sort_keys=True))'
}

serve --tls-required --tls-ca "$CERTS/ca-cert.pem" --enforce-leases --certificate-domain "bee=CN=tenant-b,O=tenants"
if nbdinfo "nbd+unix:///vol-a?socket=$SOCK" >/dev/null 2>&1; then fail "a plain client was served despite --tls-required"; fi
writes vol-a tenant-a 0xa1 || fail "tenant-a was refused its own volume: $(cat "$TMPDIR_TEST/client.out")"
writes vol-b tenant-b 0xb2 || fail "tenant-b (domain bee) was refused its own volume: $(cat "$TMPDIR_TEST/client.out")"
writes vol-b tenant-a 0x66 && fail "tenant-a wrote bee's volume"
writes vol-b crafted 0x66 && fail "a certificate with subject O=\"tenants,CN=tenant-b\" wrote bee's volume"
writes vol-a crafted 0x66 && fail "the crafted certificate wrote tenant-a's volume"
writes vol-b crafted-cn 0x66 && fail "a certificate with subject CN=\"tenant-b,O=tenants\" wrote bee's volume"
writes vol-b wrong-ca 0x66 && fail "a certificate signed by an untrusted CA was served"
writes vol-b expired 0x66 && fail "an expired certificate was served"
writes vol-b no-cert 0x66 && fail "a TLS client without a certificate was served (the export's binding is no identity)"
writes vol-a no-cert 0x66 && fail "a TLS client without a certificate was served"
writes vol-b tenant-b 0xb3 || fail "the server stopped serving tenant-b after refusing the others"
# Only the two verified tenants were served and charged (the crafted subject is a domain of its
# own, "O=tenants\,CN\=tenant-b", with no lease and no binding, so it never got a request in).
[ "$(charged)" = "{\"$TENANT_A\": 3, \"bee\": 6}" ] || fail "charges: $(charged)"
"$VBDTOOL" snapshot vol-a@s --store "$STORE" || fail "control socket"
# A snapshot is leased by its full name; vol-a's binding covers it, so only tenant-a may open it.
"$VBDTOOL" lease grant vol-a@s --domain "$TENANT_A" --mode read --duration 10m --store "$STORE" >/dev/null
session vol-a@s tenant-b 'pass' && fail "tenant-b opened a snapshot of tenant-a's volume"
session vol-a@s tenant-a 'assert h.get_size() == 1048576' || fail "snapshot not served over TLS to its volume's tenant"
stop

# What the store holds is what the two tenants wrote, and nothing the refused clients sent.
for pair in "vol-a a1" "vol-b b3"; do
    read -r volume byte <<<"$pair"
    "$VBDTOOL" export "$volume" "$TMPDIR_TEST/$volume.img" --store "$STORE" >/dev/null
    python3 - "$TMPDIR_TEST/$volume.img" "$byte" <<'PY' || fail "$volume does not hold its tenant's data"
import sys
data = open(sys.argv[1], "rb").read()
assert data[:65536] == bytes([int(sys.argv[2], 16)]) * 65536 and data[65536:] == bytes(len(data) - 65536)
PY
done

# Without --tls-ca the server verifies no client certificate, so tenant-b's proves nothing.
if "$VBDTOOL" serve --store "$STORE" --unix "$SOCK" --tls-cert "$CERTS/server-cert.pem" --tls-key "$CERTS/server-key.pem" \
    --certificate-domain "bee=CN=tenant-b,O=tenants" >"$TMPDIR_TEST/refused.log" 2>&1; then
    fail "--certificate-domain was accepted without --tls-ca"
fi
grep -q "needs --tls-ca" "$TMPDIR_TEST/refused.log" || fail "no clear error: $(cat "$TMPDIR_TEST/refused.log")"
serve --tls-required --enforce-leases
writes vol-b tenant-b 0x66 && fail "an unverified certificate was taken as an identity"
writes vol-b no-cert 0x66 && fail "a TLS client without a certificate was served as the export's bound domain"
grep -q "proved no identity" "$TMPDIR_TEST/serve.log" || fail "the refusal does not say why"
stop
# Nor without --enforce-leases: a bound export stays its domain's; an unbound one is anonymous's.
"$VBDTOOL" create open --size 1M --store "$STORE" >/dev/null
serve --tls-required
writes vol-b no-cert 0x66 && fail "a TLS client without a certificate opened bee's bound volume"
writes open no-cert 0x0f || fail "a TLS client without a certificate was refused an unbound volume"
"$VBDTOOL" domain stats --json --store "$STORE" | python3 -c '
import json, sys
ops = {d["domain"]: sum(d["usage"]["operations"][1::2]) for d in json.load(sys.stdin)["domains"]}
assert ops.get("anonymous") == 3 and ops.get("bee") == 6, ops' || fail "the unauthenticated session was not charged to anonymous alone"
stop
echo PASS
