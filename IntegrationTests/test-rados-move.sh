#!/usr/bin/env bash
# `vbdtool volume move`: one RADOS family handed between two live `vbdtool serve` processes (two
# hosts) on a micro Ceph cluster of its own, while NBD clients write to it and to the families
# that stay (rados-move.py: no acknowledged write lost, the other clients see no error, the moved
# client's longest stall printed, not asserted; refusals: a family the server does not own, a
# host where no server runs, a second move while one runs; a forced takeover of one of A's families
# by a third server stops only that family on A; a target that refuses the family leaves it served
# by the source again). Before that: a server refuses two
# families that hold the same export name, and the commands that work on one store refuse
# --namespace given twice.
# Without Ceph this fails (the cluster script names the missing binary): it never skips.
source "$(dirname "$0")/nbd-functions.sh"
requires_vbdtool_serve
here=$(cd "$(dirname "$0")" && pwd)

start_micro_cluster

for family in fam1 fam2 fam3 clash; do
    "$VBDTOOL" init "${R[@]}" --namespace "$family" >/dev/null || fail "init $family"
done
"$VBDTOOL" create vol1 --size 64M "${R[@]}" --namespace fam1 >/dev/null || fail "create vol1"
"$VBDTOOL" snapshot vol1@before "${R[@]}" --namespace fam1 >/dev/null || fail "snapshot vol1@before"
"$VBDTOOL" create vol2 --size 64M "${R[@]}" --namespace fam2 >/dev/null || fail "create vol2"
"$VBDTOOL" create vol3 --size 64M "${R[@]}" --namespace fam3 >/dev/null || fail "create vol3"
"$VBDTOOL" create vol2 --size 16M "${R[@]}" --namespace clash >/dev/null || fail "create vol2 in clash"

refused list "${R[@]}" --namespace fam1 --namespace fam2 | grep -q "only \`serve\` serves several families" \
    || fail "list took two families"
# Two families with one export name cannot be served together; the refusal names both and the name.
out=$(timeout 120 "$VBDTOOL" serve --store "$TMPDIR_TEST/host-clash" --unix "$TMPDIR_TEST/clash.sock" \
      --rados vbd --ceph-conf "$CONF" --namespace fam2 --namespace clash 2>&1) && fail "a server of two families holding vol2 started"
grep -q "the families fam2 and clash both hold vol2" <<<"$out" || fail "the clash was not named: $out"
# ... and it released the lock it had taken: another server owns fam2 at once.
"$VBDTOOL" info vol2 "${R[@]}" --namespace fam2 >/dev/null || fail "fam2 still locked after the refused start"

# The system python has the libnbd bindings; the whole run is bounded.
timeout 500 /usr/bin/python3 "$here/rados-move.py" --vbdtool "$VBDTOOL" --ceph-conf "$CONF" --tmp "$TMPDIR_TEST" \
    --blocks 16384 || fail "move scenario"

for family in fam1 fam2 fam3; do
    "$VBDTOOL" fsck "${R[@]}" --namespace "$family" | grep -q "^clean" || fail "fsck of $family after the moves"
done
echo PASS
