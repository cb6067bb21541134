#!/usr/bin/env bash
# Every hold a client can take is bounded: a half-sent WRITE (--message-timeout), an idle
# connection (--idle-timeout), connections per peer (--connections-per-peer), and shutdown waits
# one grace period for all stuck connections together, not one after another.
source "$(dirname "$0")/nbd-functions.sh"
requires python3
requires_vbdtool_serve
make_store 64M
holds="$(dirname "$0")/nbd-holds.py"

start_tcp_server --message-timeout 2 --idle-timeout 3 --connections-per-peer 4
python3 "$holds" 127.0.0.1 "$PORT" vol half-write || fail "half-sent WRITE"
grep -q "deadline passed: a started request" "$TMPDIR_TEST/serve.log" || fail "no log of the expired request"
python3 "$holds" 127.0.0.1 "$PORT" vol steady 6 || fail "a slow, steady writer was cut off"
python3 "$holds" 127.0.0.1 "$PORT" vol half-close || fail "a half-closed client's requests were not all answered"
python3 "$holds" 127.0.0.1 "$PORT" vol idle || fail "idle connection"
grep -q "deadline passed: idle" "$TMPDIR_TEST/serve.log" || fail "no log of the idle close"
python3 "$holds" 127.0.0.1 "$PORT" vol per-peer 4 || fail "per-peer limit"
grep -q "holds 4 connections" "$TMPDIR_TEST/serve.log" || fail "no log of the per-peer refusal"
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true

# Six connections that never read their replies, a 4 s grace period: stopping takes one period.
start_tcp_server --shutdown-grace 4
# The clients print READY once all six hold their connections; the script waits for that line.
mkfifo "$TMPDIR_TEST/stuck.fifo"
python3 "$holds" 127.0.0.1 "$PORT" vol stuck 6 > "$TMPDIR_TEST/stuck.fifo" 2>&1 &
client=$!
cleanup_fn "kill $client 2>/dev/null"
exec 4<"$TMPDIR_TEST/stuck.fifo"
line=""
read -r -t 120 line <&4 || true   # the bound only turns a hang into a failure
[ "$line" = READY ] || fail "stuck clients did not start (${line:-no line in 120 s})"
started=$(date +%s%N)
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
stopped_ms=$(( ($(date +%s%N) - started) / 1000000 ))
kill "$client" 2>/dev/null; wait "$client" 2>/dev/null || true
exec 4<&-
echo "stop with 6 stuck connections and a 4 s grace period took $stopped_ms ms"
# One after another would take 6 x 4 s = 24 s; together it is one period plus closing.
[ "$stopped_ms" -lt 16000 ] || fail "shutdown took $stopped_ms ms: the grace periods ran one after another"
echo PASS
