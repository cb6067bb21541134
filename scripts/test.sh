#!/usr/bin/env bash
# The whole suite: unit, property and simulation tests (swift test), then the real-client
# integration tests. Prints per-suite test counts; fails on any failure, on any skipped test or
# integration script, and when a suite runs fewer tests than Tests/test-counts.txt records
# (set VBD_ALLOW_SKIPS=1 to allow skips on a machine without the tools).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
swift build --build-tests || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
swift test --skip-build --xunit-output "$work/report.xml" 2>&1 | tee "$work/log" \
    | grep -Ev '(started|passed)( after [0-9.]+ seconds)?\.?$'
unit_rc=${PIPESTATUS[0]}
grep -E "Test run with|Executed [0-9]+ tests" "$work/log" | tail -n 2
counts_rc=0
if [ -f "$work/report-swift-testing.xml" ]; then
    python3 scripts/test-counts.py "$work/report-swift-testing.xml" Tests/test-counts.txt || counts_rc=1
else
    echo "FAIL: swift test wrote no report"; counts_rc=1
fi
bash IntegrationTests/run-all.sh
integ_rc=$?
if [ "$unit_rc" -ne 0 ]; then echo "swift test failed (exit $unit_rc)"; fi
[ "$unit_rc" -eq 0 ] && [ "$counts_rc" -eq 0 ] && [ "$integ_rc" -eq 0 ]
