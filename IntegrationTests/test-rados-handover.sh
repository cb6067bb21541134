#!/usr/bin/env bash
# A RADOS store handed between two `vbdtool serve` processes (two hosts) on a micro Ceph cluster
# of its own, while an NBD client writes (rados-handover.py): A killed with SIGKILL mid-write and
# B taking over with --force loses no flushed write; an orderly handover (SIGTERM to A while B
# waits with --take-over) loses no acknowledged write and fences nobody (the client's longest stall
# is printed, not asserted); a stopped A that resumes after B took over cannot commit and exits.
# Before that, the store commands run on a RADOS store without a server: init, create, snapshot,
# share, list, stats, fsck.
# Without Ceph this fails (the cluster script names the missing binary): it never skips.
source "$(dirname "$0")/nbd-functions.sh"
requires_vbdtool_serve
here=$(cd "$(dirname "$0")" && pwd)

start_micro_cluster

# Store commands without a server: each opens the store on RADOS itself.
"$VBDTOOL" init "${R[@]}" --namespace cli | grep -q "initialised an empty store at rados:vbd/cli" || fail "init --rados"
refused init "${R[@]}" --namespace cli | grep -q "a store already exists at rados:vbd/cli" || fail "a second init was not refused"
refused list "${R[@]}" --namespace absent | grep -q "no store at rados:vbd/absent" || fail "list on a missing store"
"$VBDTOOL" create vol --size 16M "${R[@]}" --namespace cli >/dev/null || fail "create --rados"
"$VBDTOOL" snapshot vol@s1 "${R[@]}" --namespace cli >/dev/null || fail "snapshot --rados"
"$VBDTOOL" share vol@s1 clone "${R[@]}" --namespace cli >/dev/null || fail "share --rados"
"$VBDTOOL" list "${R[@]}" --namespace cli | grep -q "^clone .*vol@s1" || fail "list --rados does not show the share"
"$VBDTOOL" stats "${R[@]}" --namespace cli >/dev/null || fail "stats --rados"
"$VBDTOOL" fsck "${R[@]}" --namespace cli | grep -q "^clean" || fail "fsck --rados"
refused list --namespace cli | grep -q "needs --rados" || fail "--namespace without --rados was accepted"

# One store per scenario; the writers use at most 16384 blocks of 4 KiB.
for scenario in killed orderly fenced; do
    "$VBDTOOL" init "${R[@]}" --namespace "handover-$scenario" >/dev/null || fail "init handover-$scenario"
    "$VBDTOOL" create vol --size 64M "${R[@]}" --namespace "handover-$scenario" >/dev/null || fail "create in handover-$scenario"
done

# The system python has the libnbd bindings; the whole run is bounded.
timeout 500 /usr/bin/python3 "$here/rados-handover.py" --vbdtool "$VBDTOOL" --ceph-conf "$CONF" --tmp "$TMPDIR_TEST" \
    --blocks 16384 killed orderly fenced || fail "handover scenarios"

"$VBDTOOL" fsck "${R[@]}" --namespace handover-orderly | grep -q "^clean" || fail "fsck after the handovers"
echo PASS
