#!/usr/bin/env bash
# Runs every IntegrationTests/test-*.sh against the built vbdtool; prints "N passed, N failed".
# A test exits 0 (pass), 77 (skipped: a required client is missing) or anything else (fail).
# A skip fails the run too (make test installs every client), unless VBD_ALLOW_SKIPS=1.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
export VBDTOOL="${VBDTOOL:-$root/.build/debug/vbdtool}"
passed=0; failed=0; skipped=0; failures=()
for t in "$here"/test-*.sh; do
    [ -e "$t" ] || continue
    name=$(basename "$t" .sh)
    out=$(mktemp)
    if timeout 600 bash "$t" >"$out" 2>&1; then rc=0; else rc=$?; fi
    case $rc in
        0) passed=$((passed+1)); echo "PASS $name";;
        77) skipped=$((skipped+1)); echo "SKIP $name";;
        *) failed=$((failed+1)); failures+=("$name"); echo "FAIL $name (exit $rc)"; tail -n 40 "$out" | sed 's/^/    /';;
    esac
    rm -f "$out"
done
echo "integration: $passed passed, $failed failed, $skipped skipped"
if [ $skipped -gt 0 ] && [ "${VBD_ALLOW_SKIPS:-0}" != 1 ]; then
    echo "FAIL: $skipped integration tests skipped (a missing tool; set VBD_ALLOW_SKIPS=1 to allow)"
    exit 1
fi
[ $failed -eq 0 ]
