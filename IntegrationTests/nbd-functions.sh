# Helpers for the NBD integration tests (after nbdkit's tests/functions.sh.in).
# A test exits 0 (pass), 77 (skip: a client or vbdtool serve is missing) or anything else (fail).
set -euo pipefail

# nbdsh runs "python3 -m nbd": use the system python that has the libnbd bindings.
export PATH="/usr/bin:/bin:/usr/sbin:/sbin:$PATH"

requires() {
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || { echo "SKIP: $tool is not installed"; exit 77; }
    done
}

requires_vbdtool_serve() {
    if [ -z "${VBDTOOL:-}" ] || [ ! -x "$VBDTOOL" ]; then echo "SKIP: VBDTOOL not built"; exit 77; fi
    "$VBDTOOL" serve --help >/dev/null 2>&1 || { echo "SKIP: vbdtool serve is not available"; exit 77; }
}

cleanup_fns=()
cleanup_fn() { cleanup_fns+=("$*"); }
run_cleanup() {
    local i
    for (( i=${#cleanup_fns[@]}-1; i>=0; i-- )); do eval "${cleanup_fns[$i]}" || true; done
}
trap run_cleanup EXIT

# make_store SIZE: a fresh store with volume "vol" of SIZE; sets STORE and TMPDIR_TEST.
make_store() {
    TMPDIR_TEST=$(mktemp -d)
    cleanup_fn "rm -rf '$TMPDIR_TEST'"
    STORE="$TMPDIR_TEST/store"
    "$VBDTOOL" init --store "$STORE" >/dev/null
    "$VBDTOOL" create vol --size "$1" --store "$STORE" >/dev/null
}

# start_server: vbdtool serve on a unix socket in the background; returns once the server logs
# "serving" (its NBD and control listeners are up), fails if it exits first. SERVER_PID is vbdtool's.
start_server() {
    SOCK="$TMPDIR_TEST/nbd.sock"
    local ready="$TMPDIR_TEST/serve.ready" state=""
    mkfifo "$ready"
    # The watcher reports once -- the line appeared, or the log ended without it -- and keeps
    # draining, so the server never blocks on its stderr.
    "$VBDTOOL" serve --store "$STORE" --unix "$SOCK" >/dev/null 2> >(tee "$TMPDIR_TEST/serve.log" | {
        if grep -q 'serving'; then echo ready; else echo exited; fi > "$ready"; cat >/dev/null; }) &
    SERVER_PID=$!
    cleanup_fn "kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null"
    exec 3<>"$ready"   # read-write: opening does not wait for the watcher
    read -r -t 120 state <&3 || true   # the bound only turns a hung server into a failure
    exec 3<&-
    [ "$state" = ready ] && return 0
    cat "$TMPDIR_TEST/serve.log"
    echo "FAIL: server did not start (${state:-no report in 120 s})"
    exit 1
}

# start_tcp_server [serve options...]: vbdtool serve on 127.0.0.1 with a free port, in the
# background; sets SERVER_PID and PORT (read from the server's log) and waits until it listens.
start_tcp_server() {
    "$VBDTOOL" serve --store "$STORE" --listen 127.0.0.1:0 "$@" >"$TMPDIR_TEST/serve.log" 2>&1 &
    SERVER_PID=$!
    cleanup_fn "kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null"
    PORT=""
    for _ in $(seq 1 100); do
        PORT=$(sed -n 's/.*addresses=.*127\.0\.0\.1:\([0-9]*\)\].*NBD server listening.*/\1/p' "$TMPDIR_TEST/serve.log" | head -1)
        [ -n "$PORT" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMPDIR_TEST/serve.log"; fail "server exited"; }
        sleep 0.1
    done
    fail "server did not report its port"
}

# start_metrics_server LOG [serve options...]: vbdtool serve on $SOCK with --metrics on a free
# port; sets SERVER_PID and URL (the metrics address, read from the server's log).
start_metrics_server() {
    local log="$TMPDIR_TEST/$1"; shift
    SOCK="$TMPDIR_TEST/nbd.sock"
    "$VBDTOOL" serve --store "$STORE" --unix "$SOCK" --metrics 127.0.0.1:0 "$@" >"$log" 2>&1 &
    SERVER_PID=$!
    cleanup_fn "kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null"
    URL=""
    for _ in $(seq 1 100); do
        URL=$(grep -o 'http://127.0.0.1:[0-9]*/metrics' "$log" | head -1 || true)
        [ -n "$URL" ] && [ -S "$SOCK" ] && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$log"
    fail "server with metrics did not start"
}

uri() { echo "nbd+unix:///$1?socket=$SOCK"; }

fail() { echo "FAIL: $*"; [ -f "$TMPDIR_TEST/serve.log" ] && tail -n 20 "$TMPDIR_TEST/serve.log"; exit 1; }
