#!/usr/bin/env bash
# Hostile frames on the control socket of vbdtool serve (garbage, bad lengths, wrong types,
# absurd sizes and offsets): each is refused, the server keeps serving NBD and the control socket.
source "$(dirname "$0")/nbd-functions.sh"
requires python3 qemu-io
requires_vbdtool_serve
make_store 64M
start_server
qemu-io -f raw -c "write -P 0x61 0 1M" "$(uri vol)" >/dev/null || fail "qemu-io write"
python3 "$(dirname "$0")/control-garbage.py" "$STORE/control.sock" vol || fail "control socket"
kill -0 "$SERVER_PID" 2>/dev/null || fail "server died"
if grep -E "Fatal error|Program crashed" "$TMPDIR_TEST/serve.log"; then fail "server log shows a crash"; fi
qemu-io -f raw -c "read -P 0x61 0 1M" "$(uri vol)" >/dev/null || fail "data changed"
"$VBDTOOL" info vol --store "$STORE" | grep -q "64 MiB" || fail "volume size changed: $("$VBDTOOL" info vol --store "$STORE")"
echo PASS
