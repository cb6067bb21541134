#!/usr/bin/env bash
# vbdtool serve --tls-cert/--tls-key/--tls-required: plain clients are refused, TLS clients served,
# and the control socket (local, owner-only) keeps working alongside.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/nbd-functions.sh"
requires openssl nbdinfo
requires_vbdtool_serve
make_store 1M
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$TMPDIR_TEST/key.pem" -out "$TMPDIR_TEST/cert.pem" \
    -days 2 -subj /CN=localhost >/dev/null 2>&1 || fail "openssl could not make a certificate"
SOCK="$TMPDIR_TEST/nbd.sock"
"$VBDTOOL" serve --store "$STORE" --unix "$SOCK" --tls-cert "$TMPDIR_TEST/cert.pem" --tls-key "$TMPDIR_TEST/key.pem" \
    --tls-required >"$TMPDIR_TEST/serve.log" 2>&1 &
SERVER_PID=$!
cleanup_fn "kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null"
for _ in $(seq 1 100); do "$VBDTOOL" status --store "$STORE" >/dev/null 2>&1 && break; sleep 0.1; done
"$VBDTOOL" status --store "$STORE" || fail "server not up"
tls="nbds+unix:///vol?socket=$SOCK&tls-verify-peer=false"
if nbdinfo "nbd+unix:///vol?socket=$SOCK" >/dev/null 2>&1; then fail "a plain client was served despite --tls-required"; fi
nbdinfo "$tls" | grep -q "with TLS" || fail "TLS client not served"
"$VBDTOOL" snapshot vol@s --store "$STORE" || fail "control socket"
nbdinfo "nbds+unix:///vol@s?socket=$SOCK&tls-verify-peer=false" | grep -q "export-size: 1048576" || fail "snapshot not served over TLS"
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || fail "unclean stop"
echo PASS
