#!/usr/bin/env bash
# libFuzzer short mode (docs/TESTING.md, "Fuzzing"): builds the three targets against the debug
# build, replays the committed corpus (seeds and crash regressions), then fuzzes each target for
# 15 s. Fails on a crash, an invariant failure or a sanitizer report.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash Fuzz/run-fuzzers.sh --replay || exit 1
bash Fuzz/run-fuzzers.sh --short "${VBD_FUZZ_SECONDS:-15}"
