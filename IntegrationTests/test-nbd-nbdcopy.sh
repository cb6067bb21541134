#!/usr/bin/env bash
# nbdcopy of 256 MiB into an export and back, compared by sha256.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdcopy nbdinfo sha256sum
requires_vbdtool_serve
make_store 256M
start_server

src="$TMPDIR_TEST/src.img"; dst="$TMPDIR_TEST/dst.img"
head -c $((192 << 20)) /dev/urandom > "$src"
truncate -s 256M "$src"
timeout 300 nbdcopy "$src" "$(uri vol)" || fail "nbdcopy up"
timeout 300 nbdcopy "$(uri vol)" "$dst" || fail "nbdcopy down"
[ "$(sha256sum < "$src")" = "$(sha256sum < "$dst")" ] || fail "checksums differ"
echo PASS
