#!/usr/bin/env bash
# The README quickstart, as a newcomer runs it: serve a store over TCP, write an image into a
# volume with qemu-img over NBD, snapshot it, share it twice, serve the shares (read and write
# them over NBD), and check with `vbdtool stats` that the shares use almost no new space.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/nbd-functions.sh"
requires qemu-img qemu-io nbdinfo jq
requires_vbdtool_serve

work=$(mktemp -d /tmp/vbdq-XXXXXX)
TMPDIR_TEST=$work   # where fail() looks for serve.log
cleanup_fn "rm -rf '$work'"
export VBD_STORE="$work/vbd-data"
image="$here/../fixtures/small/dataset-small.img"     # an 8 MiB ext4 file system image
[ -f "$image" ] || fail "missing fixture $image"
# The same image as qcow2, as a hypervisor would have it.
qemu-img convert -f raw -O qcow2 "$image" "$work/golden.qcow2"

"$VBDTOOL" init
# Port 0: the kernel picks a free port; `vbdtool status` tells which.
"$VBDTOOL" serve --listen 127.0.0.1:0 >"$work/serve.log" 2>&1 &
server=$!
cleanup_fn "kill $server 2>/dev/null; wait $server 2>/dev/null"
for _ in $(seq 1 200); do
    "$VBDTOOL" status >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { cat "$work/serve.log"; fail "server exited"; }
    sleep 0.1
done
address=$("$VBDTOOL" status --json | jq -r '.nbdAddresses[0]')
[ -n "$address" ] && [ "$address" != null ] || fail "no NBD address from vbdtool status"
nbd() { echo "nbd://$address/$1"; }
echo "serving on $address"

# 1. A volume the size of the image, filled by qemu-img over NBD.
size=$(qemu-img info --output=json "$work/golden.qcow2" | jq '."virtual-size"')
"$VBDTOOL" create golden --size "$size"
qemu-img convert -p -n -f qcow2 -O raw "$work/golden.qcow2" "$(nbd golden)"
qemu-img compare -f raw -F raw "$image" "$(nbd golden)" || fail "golden differs from the image"

# 2. Snapshot, and two shares of it.
"$VBDTOOL" snapshot golden@v1
before=$("$VBDTOOL" stats --json)
"$VBDTOOL" share golden@v1 vm1
"$VBDTOOL" share golden@v1 vm2
"$VBDTOOL" list

# 3. The shares are served at once (no restart): same contents, writable, independent.
for vm in vm1 vm2; do
    nbdinfo "$(nbd $vm)" | grep -q "export-size: $size" || fail "$vm not served with size $size"
    qemu-img compare -f raw -F raw "$image" "$(nbd $vm)" || fail "$vm differs from the image"
done
qemu-io -f raw -c "write -P 0x11 0 64k" "$(nbd vm1)" >/dev/null || fail "cannot write vm1"
qemu-io -f raw -c "read -P 0x11 0 64k" "$(nbd vm1)" >/dev/null || fail "vm1 lost its write"
qemu-img compare -f raw -F raw "$image" "$(nbd vm2)" || fail "a write to vm1 changed vm2"
qemu-img compare -f raw -F raw "$image" "$(nbd golden@v1)" || fail "a write to vm1 changed the snapshot"

# 4. The shares use almost no new space: the store grew by vm1's 64 KiB write at most
#    (its blocks compress well), vm2 owns nothing.
"$VBDTOOL" stats
after=$("$VBDTOOL" stats --json)
stored_before=$(jq .storedBytes <<<"$before")
stored_after=$(jq .storedBytes <<<"$after")
allocated_golden=$(jq '.images[] | select(.name=="golden") | .allocatedBytes' <<<"$after")
[ "$allocated_golden" -gt 1000000 ] || fail "golden holds only $allocated_golden bytes"
[ "$stored_after" -le $((stored_before + 65536)) ] || fail "store grew from $stored_before to $stored_after bytes"
[ "$(jq '.images[] | select(.name=="vm2") | .exclusiveStoredBytes' <<<"$after")" -eq 0 ] || fail "vm2 owns space"
[ "$(jq '.images[] | select(.name=="vm2") | .sharedBytes' <<<"$after")" -eq "$allocated_golden" ] || fail "vm2 does not share golden's blocks"
# vm1's 16 identical blocks are one chunk (dedup within the volume): it owns a few hundred bytes.
vm1_own=$(jq '.images[] | select(.name=="vm1") | .exclusiveStoredBytes' <<<"$after")
[ "$vm1_own" -gt 0 ] && [ "$vm1_own" -le 65536 ] || fail "vm1 owns $vm1_own bytes on disk, expected (0, 64 KiB]"
jq -e '.live and (.cache != null)' <<<"$after" >/dev/null || fail "stats of a served store lack cache figures"

# 5. Clean stop: SIGTERM flushes, checkpoints and removes the control socket.
kill -TERM "$server"
wait "$server" || fail "server exited with $?"
[ ! -e "$VBD_STORE/control.sock" ] || fail "control socket left behind"
"$VBDTOOL" fsck >/dev/null || fail "fsck after stop"
echo "PASS"
