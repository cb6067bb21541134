#!/usr/bin/env bash
# Builds (Fuzz/build.py) and runs the libFuzzer targets, one at a time (the machine has 2 cores).
#   Fuzz/run-fuzzers.sh --short [SECONDS]   each target for SECONDS (default 15) from the seed corpus
#   Fuzz/run-fuzzers.sh --long [RUNS]       each target for RUNS executions (default 10 million);
#                                           VBD_FUZZ_MAX_SECONDS caps each target's time (default none)
#   Fuzz/run-fuzzers.sh --replay            each corpus input once (regressions), no fuzzing
# Seeds: fixtures/fuzz/<target>. The working corpus grows in .build/fuzz/corpus/<target> (the
# fixtures stay as committed); a failing input is saved in .build/fuzz/artifacts/<target>/
# (crash-*, oom-*, timeout-*) and fails the run. Prints per target: executions, seconds, crashes, sanitizer reports.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
mode=${1:---short}
targets=(nbd-handshake nbd-transmission control-framing)
out="$root/.build/fuzz"
python3 Fuzz/build.py "${targets[@]}" || exit 1

# No leak checking: the Swift runtime keeps metadata caches for the process's life by design.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:symbolize=1:quarantine_size_mb=64"
failed=0
for target in "${targets[@]}"; do
    binary="$out/$target/$target"
    corpus="$out/corpus/$target"
    artifacts="$out/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    case $target in
        control-framing) max_len=$((80 << 10));;  # above the 64 KiB request limit
        *) max_len=4096;;  # the recorded sessions are at most 2.6 KiB
    esac
    # One allocation above 256 MiB is a failure: nothing here may size memory by an announced length.
    common=(-max_len=$max_len -timeout=10 -malloc_limit_mb=256 -rss_limit_mb=2048 -print_final_stats=1
            -artifact_prefix="$artifacts/")
    log="$out/$target.log"
    started="$out/$target.started"
    touch "$started"
    case $mode in
        --short)
            seconds=${2:-15}
            "$binary" "${common[@]}" -max_total_time="$seconds" "$corpus" "fixtures/fuzz/$target" >"$log" 2>&1
            rc=$?;;
        --long)
            runs=${2:-10000000}
            "$binary" "${common[@]}" -runs="$runs" -max_total_time="${VBD_FUZZ_MAX_SECONDS:-0}" \
                "$corpus" "fixtures/fuzz/$target" >"$log" 2>&1
            rc=$?;;
        --replay)
            "$binary" "${common[@]}" -runs=0 "fixtures/fuzz/$target" >"$log" 2>&1
            rc=$?;;
        *) echo "usage: $0 --short [SECONDS] | --long [RUNS] | --replay"; exit 2;;
    esac
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    seconds=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    coverage=$(grep -o 'cov: [0-9]*' "$log" | tail -1)
    sanitizer=$(grep -c '^==[0-9]*==ERROR: \|^SUMMARY: .*Sanitizer' "$log")
    invariants=$(grep -c 'FUZZ INVARIANT FAILED' "$log")
    # crash-* (trap, sanitizer, invariant), oom-* (an allocation over the limit), timeout-*, leak-*.
    crashes=$(find "$artifacts" -newer "$started" \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) 2>/dev/null | wc -l)
    echo "$target: ${executions:-?} executions in ${seconds:-?} s, ${coverage:-cov: ?}, exit $rc, crashes $crashes, sanitizer reports $sanitizer, invariant failures $invariants"
    if [ "$rc" -ne 0 ] || [ "$sanitizer" -ne 0 ] || [ "$invariants" -ne 0 ]; then
        failed=1
        grep -B2 -A25 'FUZZ INVARIANT FAILED\|ERROR: \|deadly signal\|Fatal error' "$log" | head -60
        echo "    (full log: $log)"
    fi
done
exit $failed
