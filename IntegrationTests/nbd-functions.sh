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

# start_micro_cluster: a Ceph micro cluster (scripts/ceph-micro-cluster.sh) in a new $TMPDIR_TEST,
# stopped on exit (and by its watchdog should the script die without its cleanup); sets CONF to
# its ceph.conf.
start_micro_cluster() {
    TMPDIR_TEST=$(mktemp -d)
    cleanup_fn "rm -rf '$TMPDIR_TEST'"
    local script
    script="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/scripts/ceph-micro-cluster.sh"
    VBD_CEPH_OWNER_PID=$$ bash "$script" start "$TMPDIR_TEST/ceph" >/dev/null || fail "cannot start the micro cluster"
    cleanup_fn "bash '$script' stop '$TMPDIR_TEST/ceph' >/dev/null"
    CONF="$TMPDIR_TEST/ceph/ceph.conf"
    # The store options of a command run without a server, from host directory host-cli.
    R=(--rados vbd --ceph-conf "$CONF" --store "$TMPDIR_TEST/host-cli")
}

# refused ARGS...: vbdtool's output for a command that must fail (the caller checks the message);
# "(exit status 0)" is appended when it did not fail.
refused() { "$VBDTOOL" "$@" 2>&1 && echo "(exit status 0)"; true; }

# launch_server LOG serve-options...: vbdtool serve on $STORE in the background, its output in
# LOG; returns once the server logs "serving" (every listener is up, and the lines before it are
# in LOG), fails if it exits first. SERVER_PID is vbdtool's.
launch_server() {
    local log="$1"; shift
    local ready="$log.ready" state=""
    rm -f "$ready"; mkfifo "$ready"; : > "$log"
    # The watcher appends each line to LOG before looking at it, reports once (the line appeared,
    # or the output ended without it), then keeps draining so the server never blocks on output.
    "$VBDTOOL" serve --store "$STORE" "$@" > >(
        while IFS= read -r line; do
            printf '%s\n' "$line" >> "$log"
            if [[ $line == *serving* ]]; then echo ready > "$ready"; exec cat >> "$log"; fi
        done
        echo exited > "$ready") 2>&1 &
    SERVER_PID=$!
    cleanup_fn "kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null"
    exec 3<>"$ready"   # read-write: opening does not wait for the watcher
    read -r -t 120 state <&3 || true   # the bound only turns a hung server into a failure
    exec 3<&-
    [ "$state" = ready ] && return 0
    cat "$log"
    echo "FAIL: server did not start (${state:-no report in 120 s})"
    exit 1
}

# start_server [serve options...]: vbdtool serve on the unix socket $SOCK (see launch_server).
start_server() {
    SOCK="$TMPDIR_TEST/nbd.sock"
    launch_server "$TMPDIR_TEST/serve.log" --unix "$SOCK" "$@"
}

# start_tcp_server [serve options...]: vbdtool serve on 127.0.0.1 with a free port; sets PORT
# from the address the server logged.
start_tcp_server() {
    launch_server "$TMPDIR_TEST/serve.log" --listen 127.0.0.1:0 "$@"
    PORT=$(sed -n 's/.*addresses=.*127\.0\.0\.1:\([0-9]*\)\].*NBD server listening.*/\1/p' "$TMPDIR_TEST/serve.log" | head -1)
    [ -n "$PORT" ] || { cat "$TMPDIR_TEST/serve.log"; fail "server did not report its port"; }
}

# start_metrics_server LOG [serve options...]: vbdtool serve on $SOCK with --metrics on a free
# port; sets URL (the metrics address, read from the server's log).
start_metrics_server() {
    local log="$TMPDIR_TEST/$1"; shift
    SOCK="$TMPDIR_TEST/nbd.sock"
    launch_server "$log" --unix "$SOCK" --metrics 127.0.0.1:0 "$@"
    URL=$(grep -o 'http://127.0.0.1:[0-9]*/metrics' "$log" | head -1 || true)
    [ -n "$URL" ] || { cat "$log"; fail "server with metrics did not report its address"; }
}

uri() { echo "nbd+unix:///$1?socket=$SOCK"; }

fail() { echo "FAIL: $*"; [ -f "$TMPDIR_TEST/serve.log" ] && tail -n 20 "$TMPDIR_TEST/serve.log"; exit 1; }
