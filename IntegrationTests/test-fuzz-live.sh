#!/usr/bin/env bash
# Live-socket fuzzer (docs/TESTING.md, "Fuzzing"): mutated recorded client sessions against a
# running vbdtool serve, checked after every batch. Short mode (make test): 45 s / 20,000 sessions,
# whichever comes first. --long: the hour-equivalent, 115,200 sessions: 32 clients each opening
# one session a second for an hour (docs/TESTING.md, "Fuzzing").
source "$(dirname "$0")/nbd-functions.sh"
requires nbdinfo /usr/bin/python3
requires_vbdtool_serve
here=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" = "--long" ]; then
    exec /usr/bin/python3 "$here/nbd-live-fuzz.py" --vbdtool "$VBDTOOL" --sessions "${VBD_LIVE_FUZZ_SESSIONS:-115200}" \
        --seconds 7200 --batch 2000
fi
exec /usr/bin/python3 "$here/nbd-live-fuzz.py" --vbdtool "$VBDTOOL" --sessions 20000 --seconds "${VBD_LIVE_FUZZ_SECONDS:-45}"
