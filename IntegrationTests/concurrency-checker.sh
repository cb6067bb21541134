#!/usr/bin/env bash
# The concurrency checker (issue 12) against a fresh store served by $VBDTOOL:
#   IntegrationTests/concurrency-checker.sh            short mode: 40 s of load, ~1 minute in all (make test)
#   IntegrationTests/concurrency-checker.sh --long     long mode: 10 minutes of load (make check-concurrency-long)
# Further options go to concurrency-checker.py (--seed N, --duration S, --connections N, ...).
# A store elsewhere than a local directory: --store-args 'ARGS' (first, before the mode) adds ARGS
# to every vbdtool command (e.g. '--rados vbd --ceph-conf F --namespace NS'; the temporary
# directory is then only the host's directory), --init-args 'ARGS' to the init only
# (e.g. '--share-chunks-as DOMAIN'); IntegrationTests/test-rados-concurrency-checker.sh uses them.
# Exit 0: no anomaly; 1: anomalies (each printed with its request history); 77: no python3-libnbd.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
VBDTOOL="${VBDTOOL:-$root/.build/debug/vbdtool}"
# The system python has the libnbd bindings (python3-libnbd); a pyenv python on PATH would not.
PYTHON="${PYTHON:-/usr/bin/python3}"

store_args=""; init_args=""
while :; do
    case "${1:-}" in
        --store-args) store_args="$2"; shift 2;;
        --init-args) init_args="$2"; shift 2;;
        *) break;;
    esac
done
mode=(--duration 40)
if [ "${1:-}" = "--long" ]; then mode=(--duration 600 --connections 12 --max-volumes 8 --max-snapshots 10 --max-volume-size 16M); shift
elif [ "${1:-}" = "--short" ]; then shift
fi

[ -x "$VBDTOOL" ] || { echo "SKIP: $VBDTOOL is not built"; exit 77; }
"$PYTHON" -c "import nbd" 2>/dev/null || { echo "SKIP: $PYTHON has no nbd module (apt-get install python3-libnbd)"; exit 77; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086 # the store and init arguments are word lists
"$VBDTOOL" init --store "$work/store" $store_args $init_args >/dev/null || { echo "FAIL: vbdtool init"; exit 2; }
# A checkpoint whenever a flush finds 16 KiB of journal: checkpoints then race with the I/O.
"$PYTHON" "$here/concurrency-checker.py" --vbdtool "$VBDTOOL" --store "$work/store" --store-args "$store_args" --workdir "$work" \
    --checkpoint-journal-bytes 16K "${mode[@]}" "$@"
rc=$?
if [ $rc -ne 0 ] && [ -s "$work/serve.log" ]; then
    echo "--- last lines of the server log"; tail -n 15 "$work/serve.log"
fi
exit $rc
