#!/usr/bin/env bash
# nbdinfo --list --json and --map against vbdtool serve: exports, flags, holes, the x-vbd:sharing context.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdinfo qemu-io python3
requires_vbdtool_serve
make_store 64M
start_server

qemu-io -f raw -c "write -P 0x11 0 1M" "$(uri vol)" >/dev/null || fail "qemu-io write"
nbdinfo --list --json "nbd+unix:///?socket=$SOCK" > "$TMPDIR_TEST/list.json" || fail "nbdinfo --list"
python3 - "$TMPDIR_TEST/list.json" <<'PY' || fail "list JSON"
import json, sys
exports = {e["export-name"]: e for e in json.load(open(sys.argv[1]))["exports"]}
v = exports["vol"]
assert v["export-size"] == 64 << 20, v
assert v["is_read_only"] is False and v["can_multi_conn"] is True and v["can_trim"] is True, v
assert "base:allocation" in v["contexts"] and "x-vbd:sharing" in v["contexts"], v
PY
map=$(nbdinfo --map "$(uri vol)") || fail "nbdinfo --map"
echo "$map" | awk 'NR==1 { if ($1 != 0 || $2 != 1048576 || $3 != 0) exit 1 } END { if (NR < 2) exit 1 }' || fail "first extent is not 1M of data: $map"
echo "$map" | awk 'NR==2 { if ($1 != 1048576 || $3 != 3) exit 1 }' || fail "second extent is not a hole: $map"
nbdinfo --map=x-vbd:sharing "$(uri vol)" >/dev/null || fail "x-vbd:sharing map"
echo PASS
