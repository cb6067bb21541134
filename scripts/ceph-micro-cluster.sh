#!/usr/bin/env bash
# A throw-away Ceph cluster for tests: one monitor and one memstore OSD on 127.0.0.1, cephx with its
# own keyring, pool `vbd` with size 1, everything (data, logs, sockets, pid files) under DIR.
#
#   scripts/ceph-micro-cluster.sh start DIR [PORT]   start it; PORT defaults to a free one
#   scripts/ceph-micro-cluster.sh stop DIR           stop it (OSD first, then the monitor)
#
# After `start`, DIR/ceph.conf is all a client needs (it names the monitor and the client keyring),
# e.g. `rados -c DIR/ceph.conf -p vbd ls`. Several clusters in different directories can run at once.
# The data lives in RAM (memstore): stopping the cluster loses it; DIR is left for the caller to remove.
# With VBD_CEPH_OWNER_PID=PID in the environment, `start` also leaves a watchdog that stops the
# cluster and removes DIR once that process is gone, so a test run that crashes leaves nothing behind.
set -euo pipefail

script=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
usage() { echo "usage: $0 start DIR [PORT] | stop DIR" >&2; exit 2; }
fail() { echo "ceph-micro-cluster: $*" >&2; exit 1; }

# The caller's Ceph environment must not redirect our commands to another cluster.
unset CEPH_ARGS CEPH_CONF
# The daemons outlive this script: they must not inherit the caller's descriptors (a test runner's
# pipes and sockets would stay open as long as the cluster runs). 255 is bash's own script handle.
for fd_path in /proc/$$/fd/*; do
    fd=${fd_path##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

readonly START_TIMEOUT_SECONDS=60
# Daemons exit within 0.5 s of SIGTERM here, except a monitor whose OSD was killed (it lingers
# about 10 s); the data is throw-away, so a daemon still there after this is killed.
readonly STOP_TIMEOUT_SECONDS=3

# A daemon forks away from us and PID 1 may reap it late: `kill -0` succeeds on a zombie, so a
# process counts as running only when /proc says it is in a state other than Z (zombie) or X (dead).
running() {
    local pid=$1 state
    [ -r "/proc/$pid/stat" ] || return 1
    state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat" 2>/dev/null) || return 1
    [ "$state" != "Z" ] && [ "$state" != "X" ]
}

# Stops the daemon whose pid file is $1: SIGTERM, a bounded wait, then SIGKILL.
stop_daemon() {
    local pidfile=$1 pid waited=0
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if running "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        while running "$pid" && [ "$waited" -lt $((STOP_TIMEOUT_SECONDS * 10)) ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        if running "$pid"; then
            echo "ceph-micro-cluster: $(basename "$pidfile" .pid) (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_SECONDS}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            waited=0
            while running "$pid" && [ "$waited" -lt 50 ]; do sleep 0.1; waited=$((waited + 1)); done
        fi
    fi
    rm -f "$pidfile"
}

stop_cluster() {
    local dir=$1
    # The OSD first: stopped after the monitor, it waits for the monitor on its way down.
    stop_daemon "$dir/run/osd.0.pid"
    stop_daemon "$dir/run/mon.a.pid"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Runs "$@" until it succeeds or the start deadline passes.
retry_until_deadline() {
    local what=$1; shift
    while ! "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "ceph-micro-cluster: timed out waiting for $what" >&2; return 1; }
        sleep 0.1
    done
}

write_conf() {
    local dir=$1 port=$2 fsid=$3
    cat > "$dir/ceph.conf" <<EOF
# Written by scripts/ceph-micro-cluster.sh: a 1-monitor, 1-OSD test cluster on 127.0.0.1.
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$port]
mon initial members = a
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
ms bind msgr1 = false
ms bind ipv6 = false
public addr = 127.0.0.1
cluster addr = 127.0.0.1
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
# Without these a monitor on its own takes seconds per map change.
paxos propose interval = 0.01
paxos min wait = 0.001
# No manager runs: do not warn about it (or about the free space of the test's disk).
mon mgr mkfs grace = 315360000
mon data avail warn = 1
mon warn on insecure global id reclaim allowed = false
run dir = $dir/run
admin socket = $dir/run/\$name.asok
pid file = $dir/run/\$name.pid
log file = $dir/log/\$name.log
crash dir = $dir/crash
mon data = $dir/mon/ceph-\$id
osd data = $dir/osd/ceph-\$id
osd objectstore = memstore
# The size the OSD reports (Ceph's default 1 GiB): at the full ratio the cluster blocks writes, a
# lock's renewal among them. VBD_CEPH_MEMSTORE_BYTES raises it for benchmarks (RAM is not reserved).
memstore device bytes = ${VBD_CEPH_MEMSTORE_BYTES:-1073741824}
osd crush chooseleaf type = 0

[mon]
keyring = $dir/mon.keyring

[osd]
keyring = $dir/osd/ceph-\$id/keyring

[client]
keyring = $dir/client.admin.keyring
EOF
}

start_cluster() {
    local dir=$1 port=$2
    local conf=$dir/ceph.conf fsid osd_uuid osd_key osd_id
    mkdir -p "$dir/run" "$dir/log" "$dir/crash" "$dir/mon" "$dir/osd/ceph-0"
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    write_conf "$dir" "$port" "$fsid"

    ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$dir/client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/client.admin.keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" \
        > "$dir/log/mon-mkfs.out" 2>&1 || { cat "$dir/log/mon-mkfs.out" >&2; return 1; }
    ceph-mon -c "$conf" -i a > "$dir/log/mon-start.out" 2>&1 || { cat "$dir/log/mon-start.out" >&2; return 1; }

    # Each `ceph` command costs a Python start-up (0.3-2 s on a busy machine): use as few as possible.
    local ceph=(timeout 15 ceph -c "$conf" --connect-timeout 10)
    osd_key=$(ceph-authtool --gen-print-key)
    printf '{"cephx_secret": "%s"}\n' "$osd_key" > "$dir/osd-secret.json"
    # `osd new` with the same UUID is idempotent, so it doubles as the wait for the monitor.
    retry_until_deadline "the monitor" "${ceph[@]}" osd new "$osd_uuid" -i "$dir/osd-secret.json" || return 1
    osd_id=$("${ceph[@]}" osd new "$osd_uuid" -i "$dir/osd-secret.json")
    [ "$osd_id" = "0" ] || { echo "ceph-micro-cluster: expected OSD id 0, got '$osd_id'" >&2; return 1; }
    ceph-authtool --create-keyring "$dir/osd/ceph-0/keyring" --name osd.0 --add-key "$osd_key" >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" > "$dir/log/osd-mkfs.out" 2>&1 \
        || { cat "$dir/log/osd-mkfs.out" >&2; return 1; }
    ceph-osd -c "$conf" -i 0 > "$dir/log/osd-start.out" 2>&1 || { cat "$dir/log/osd-start.out" >&2; return 1; }

    # Size 1 comes from `osd pool default size` above.
    "${ceph[@]}" osd pool create vbd 8 8 replicated >/dev/null 2>&1
    # Usable once an object can be written and read back (the OSD is up and the PGs are active).
    local rados=(timeout 10 rados -c "$conf" -p vbd --rados-osd-op-timeout 5)
    retry_until_deadline "the OSD to serve pool vbd" "${rados[@]}" put micro-cluster-probe "$dir/monmap" || return 1
    "${rados[@]}" stat micro-cluster-probe >/dev/null
    "${rados[@]}" rm micro-cluster-probe
}

command=${1:-}
dir=${2:-}
[ -n "$command" ] && [ -n "$dir" ] || usage

case "$command" in
start)
    for binary in ceph-mon ceph-osd ceph ceph-authtool monmaptool rados python3 timeout; do
        command -v "$binary" >/dev/null || fail "'$binary' is not installed (run scripts/setup.sh: it installs ceph-mon ceph-osd ceph-common)"
    done
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    for pidfile in "$dir/run/mon.a.pid" "$dir/run/osd.0.pid"; do
        if [ -s "$pidfile" ] && running "$(cat "$pidfile")"; then
            fail "a cluster is already running in $dir (pid $(cat "$pidfile")); stop it first"
        fi
    done
    [ -z "$(ls -A "$dir")" ] || fail "$dir is not empty; give a new or empty directory"
    deadline=$((SECONDS + START_TIMEOUT_SECONDS))
    # A free port can be taken by someone else before the monitor binds it: try a few.
    attempts=3
    [ -z "${3:-}" ] || attempts=1
    for attempt in $(seq 1 "$attempts"); do
        port=${3:-$(free_port)}
        if start_cluster "$dir" "$port"; then
            if [ -n "${VBD_CEPH_OWNER_PID:-}" ]; then
                owner=$VBD_CEPH_OWNER_PID
                # Polls once a second: the owner's exit is no event this script can wait on.
                setsid bash -c "while [ -r /proc/$owner/stat ] && ! grep -q '^$owner ([^)]*) Z' /proc/$owner/stat; do sleep 1; done; bash '$script' stop '$dir'; rm -rf '$dir'" \
                    </dev/null >"$dir/log/watchdog.out" 2>&1 &
            fi
            echo "$dir/ceph.conf"
            exit 0
        fi
        echo "ceph-micro-cluster: start on port $port failed (attempt $attempt); monitor log tail:" >&2
        tail -n 5 "$dir/log/mon.a.log" >&2 2>/dev/null || true
        tail -n 5 "$dir/log/osd.0.log" >&2 2>/dev/null || true
        stop_cluster "$dir"
        [ "$attempt" -lt "$attempts" ] && [ "$SECONDS" -lt "$deadline" ] || break
        find "$dir" -mindepth 1 -delete
    done
    fail "could not start a cluster in $dir (logs in $dir/log)"
    ;;
stop)
    [ -d "$dir" ] || fail "no cluster directory $dir"
    stop_cluster "$dir"
    ;;
*)
    usage
    ;;
esac
