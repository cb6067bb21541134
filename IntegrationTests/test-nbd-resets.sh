#!/usr/bin/env bash
# Resets and hang-ups at every point of the handshake and of transmission, then 10,000
# GO+option+reset sessions from 8 clients at once, against vbdtool serve over TCP: the server
# must stay up with bounded memory and still serve a well-formed client correctly.
source "$(dirname "$0")/nbd-functions.sh"
requires python3 qemu-io nbdinfo
requires_vbdtool_serve
make_store 64M

start_tcp_server
URI="nbd://127.0.0.1:$PORT/vol"

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$SERVER_PID/status"; }

qemu-io -f raw -c "write -P 0x41 32M 1M" "$URI" >/dev/null || fail "qemu-io write before the resets"
# Every reset point, three times over, with and without structured replies.
python3 "$(dirname "$0")/nbd-resets.py" 127.0.0.1 "$PORT" vol --rounds 3 --flood 800 --clients 8 \
    || fail "reset scenarios"
kill -0 "$SERVER_PID" 2>/dev/null || fail "server died under resets"
# The interleaving that crashed the server: GO plus one more option, then RST. The first flood
# sets the allocator's high-water mark (on a loaded machine many connections are alive at once,
# and freed memory stays in the process); the second one shows whether connections leak.
python3 "$(dirname "$0")/nbd-resets.py" 127.0.0.1 "$PORT" vol --rounds 0 --flood 10000 --clients 8 \
    || fail "GO+option+reset flood"
kill -0 "$SERVER_PID" 2>/dev/null || fail "server died under the first GO+option+reset flood"
before=$(rss_kib)
python3 "$(dirname "$0")/nbd-resets.py" 127.0.0.1 "$PORT" vol --rounds 0 --flood 10000 --clients 8 \
    || fail "second GO+option+reset flood"
kill -0 "$SERVER_PID" 2>/dev/null || fail "server died under the second GO+option+reset flood"
after=$(rss_kib)
echo "server RSS: $((before / 1024)) MiB after a first flood, $((after / 1024)) MiB after 10,000 more connections"
# Connections leave nothing behind: 1.6 KiB kept per connection would exceed this.
[ $((after - before)) -lt $((16 * 1024)) ] || fail "server RSS grew by $(((after - before) / 1024)) MiB over the flood"
[ "$after" -lt $((512 * 1024)) ] || fail "server RSS is $((after / 1024)) MiB"

if grep -E "Fatal error|Program crashed" "$TMPDIR_TEST/serve.log"; then fail "server log shows a crash"; fi
# A well-formed client still reads and writes correctly.
qemu-io -f raw -c "read -P 0x41 32M 1M" "$URI" >/dev/null || fail "data written before the resets changed"
qemu-io -f raw -c "write -P 0x42 1M 2M" -c "flush" -c "read -P 0x42 1M 2M" "$URI" >/dev/null \
    || fail "qemu-io after the resets"
nbdinfo "$URI" | grep -q "export-size: 67108864" || fail "nbdinfo after the resets"
echo PASS
