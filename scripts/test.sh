#!/usr/bin/env bash
# The whole suite: unit, property and simulation tests (swift test), then the real-client
# integration tests. The last line is the integration summary "integration: N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
swift build --build-tests || exit 1
log=$(mktemp)
swift test --skip-build 2>&1 | tee "$log" | grep -Ev '(started|passed)( after [0-9.]+ seconds)?\.?$'
unit_rc=${PIPESTATUS[0]}
grep -E "Test run with|Executed [0-9]+ tests" "$log" | tail -n 2
rm -f "$log"
bash IntegrationTests/run-all.sh
integ_rc=$?
if [ "$unit_rc" -ne 0 ]; then echo "swift test failed (exit $unit_rc)"; fi
[ "$unit_rc" -eq 0 ] && [ "$integ_rc" -eq 0 ]
