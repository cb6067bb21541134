#!/usr/bin/env bash
# Hostile-workload measurement through `vbdtool serve` (the real store, a real data file):
# a victim domain doing 4 KiB random reads at QD1 beside a "bulk" domain writing 1 MiB at QD64
# and a "flood" domain sending 512-byte reads at QD64. Three runs, each on a fresh server with the
# victim's blocks warmed into the cache, repeated ROUNDS times interleaved (medians at the end):
#   alone        victim only (serve without --schedule)
#   unscheduled  victim + both attackers, serve without --schedule (accounting only)
#   scheduled    victim + both attackers, serve --schedule (mClock; policies below)
# Prints the victim's p50/p99 completion latency (µs) and IOPS, and the attackers' rates.
#
#   VBDTOOL=.build/release/vbdtool Benchmarks/hostile.sh
#   ROUNDS=5 RUNTIME=8 VICTIM_RESERVATION=8000 BULK_LIMIT=600 FLOOD_LIMIT=1500 Benchmarks/hostile.sh
#   ATTACKERS=bulk MODES="alone scheduled" Benchmarks/hostile.sh   # one attacker, two of the runs
#
# Policies (I/O units/s; a unit is one request plus one per 64 KiB, docs/ACCOUNTING.md):
# victim reservation $VICTIM_RESERVATION weight 4 (the default 12000 covers what the victim asks
# for alone, ~8-10 k IOPS here); bulk limit $BULK_LIMIT; flood limit $FLOOD_LIMIT.
# Bounded: every fio run has a runtime and is killed after runtime + 60 s; the server is stopped
# after each run and on exit. Unix socket only.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
VBDTOOL="${VBDTOOL:-$repo/.build/release/vbdtool}"
RUNTIME="${RUNTIME:-5}"
VICTIM_RESERVATION="${VICTIM_RESERVATION:-12000}"
BULK_LIMIT="${BULK_LIMIT:-600}"
FLOOD_LIMIT="${FLOOD_LIMIT:-1500}"
ATTACKERS="${ATTACKERS:-bulk flood}"          # which attackers run beside the victim
MODES="${MODES:-alone unscheduled scheduled}" # which of the three runs to make
SCHEDULE_OPTIONS="${SCHEDULE_OPTIONS:-}"      # e.g. "--reserved-slots 0" for the scheduled run
ROUNDS="${ROUNDS:-3}"                         # the modes run interleaved this many times
QUIET_STEAL="${QUIET_STEAL:-5}"               # a round is "quiet" when every run had less steal (%)
for tool in fio python3 nbdcopy; do command -v "$tool" >/dev/null || { echo "SKIP: $tool missing"; exit 77; }; done
[ -x "$VBDTOOL" ] || { echo "SKIP: $VBDTOOL not built (swift build -c release --product vbdtool)"; exit 77; }
fio --enghelp=nbd >/dev/null 2>&1 || { echo "SKIP: fio has no nbd engine"; exit 77; }

work="$(mktemp -d /tmp/vbd-hostile.XXXXXX)"
server_pid=""
stop_server() { if [ -n "$server_pid" ]; then kill -INT "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; server_pid=""; fi; }
trap 'stop_server; rm -rf "$work"' EXIT
store="$work/store" sock="$work/nbd.sock"
uri() { echo "nbd+unix:///$1?socket=$sock"; }

"$VBDTOOL" init --store "$store" >/dev/null
for v in victim flood bulk; do
    "$VBDTOOL" create "$v" --size 256M --store "$store" >/dev/null
    "$VBDTOOL" domain bind "$v" "$v" --store "$store" >/dev/null
done
"$VBDTOOL" domain policy victim --reservation "$VICTIM_RESERVATION" --weight 4 --store "$store" >/dev/null
"$VBDTOOL" domain policy bulk --limit "$BULK_LIMIT" --store "$store" >/dev/null
"$VBDTOOL" domain policy flood --limit "$FLOOD_LIMIT" --store "$store" >/dev/null

start_server() {
    "$VBDTOOL" serve --store "$store" --unix "$sock" "$@" >"$work/serve.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do [ -S "$sock" ] && "$VBDTOOL" status --store "$store" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "server did not start"; cat "$work/serve.log"; exit 1
}

# Fill the read targets with incompressible data so reads reach the data file (holes are not read).
start_server
head -c 64M /dev/urandom > "$work/fill.img"
nbdcopy "$work/fill.img" "$(uri victim)"
nbdcopy "$work/fill.img" "$(uri flood)"
stop_server

run_fio() { # name export extra-args... ; writes $work/$name.json
    local name="$1" export="$2"; shift 2
    timeout $((RUNTIME + 60)) fio --name="$name" --ioengine=nbd --uri="$(uri "$export")" --size=64M \
        --time_based --output-format=json --output="$work/$name.json" "$@"
}

cpu_times() { head -1 /proc/stat; } # "cpu user nice system idle iowait irq softirq steal ..."

row() { # round mode cpu-before cpu-after ; prints a table row and appends "round mode p50 p99 steal" to $work/summary
    python3 - "$1" "$2" "$work" "$3" "$4" <<'PY'
import json, os, sys
rnd, mode, work = sys.argv[1], sys.argv[2], sys.argv[3]
# Share of the run's CPU time the hypervisor gave to other guests (steal): a noisy host shows here.
before, after = ([int(x) for x in a.split()[1:9]] for a in sys.argv[4:6])
delta = [b - a for a, b in zip(before, after)]
steal = 100 * delta[7] / max(1, sum(delta))
def job(name):
    path = os.path.join(work, name + ".json")
    if not os.path.exists(path): return None
    text = open(path).read(); return json.loads(text[text.index("{"):])["jobs"][0]
v = job("victim")["read"]
p = v["clat_ns"]["percentile"]
b, f = job("bulk"), job("flood")
p50, p99 = p['50.000000'] / 1000, p['99.000000'] / 1000
print(f"| {rnd} | {mode} | {p50:.0f} | {p99:.0f} | {v['iops']:.0f} | "
      f"{(b['write']['iops'] if b else 0):.0f} | {(f['read']['iops'] if f else 0):.0f} | {steal:.0f} |")
with open(os.path.join(work, "summary"), "a") as out: out.write(f"{rnd} {mode} {p50} {p99} {steal}\n")
PY
}

echo "| round | run | victim p50 (µs) | victim p99 (µs) | victim IOPS | bulk 1 MiB writes/s | flood IOPS | steal % |"
echo "|---|---|---|---|---|---|---|---|"
for round in $(seq 1 "$ROUNDS"); do
    for mode in $MODES; do
        rm -f "$work"/*.json
        if [ "$mode" = scheduled ]; then start_server --schedule $SCHEDULE_OPTIONS; else start_server; fi
        # Warm the victim's blocks into the cache, so every run measures the same (cache-hit) reads.
        nbdcopy "$(uri victim)" null:
        pids=()
        if [ "$mode" != alone ]; then
            case " $ATTACKERS " in *" bulk "*)
                run_fio bulk bulk --rw=randwrite --bs=1M --iodepth=64 --runtime=$((RUNTIME + 1)) & pids+=($!) ;; esac
            case " $ATTACKERS " in *" flood "*)
                run_fio flood flood --rw=randread --bs=512 --iodepth=64 --runtime=$((RUNTIME + 1)) & pids+=($!) ;; esac
            sleep 0.5
        fi
        cpu_before="$(cpu_times)"
        run_fio victim victim --rw=randread --bs=4k --iodepth=1 --runtime="$RUNTIME" --percentile_list=50:99
        cpu_after="$(cpu_times)"
        for pid in "${pids[@]}"; do wait "$pid"; done
        stop_server
        # Write back what this run left dirty (the unscheduled bulk writer leaves ~1 GiB), so the
        # kernel's writeback does not land in the next run.
        sync
        row "$round" "$mode" "$cpu_before" "$cpu_after"
    done
done
echo
# Medians over the rounds (runs are interleaved, so slow phases of a shared machine hit every mode).
python3 - "$work/summary" "$QUIET_STEAL" <<'PY'
import statistics, sys
runs = {}  # (round, mode) -> (p50, p99, steal)
for line in open(sys.argv[1]):
    rnd, mode, p50, p99, steal = line.split(); runs[(rnd, mode)] = (float(p50), float(p99), float(steal))
quiet_steal = float(sys.argv[2])
def summarize(title, rounds):
    rows = {}
    for (rnd, mode), run in runs.items():
        if rnd in rounds: rows.setdefault(mode, []).append(run)
    if not rows: return
    print(title)
    median = {m: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)) for m, rs in rows.items()}
    for m, (p50, p99) in median.items():
        print(f"  median {m}: p50 {p50:.0f} µs, p99 {p99:.0f} µs over {len(rows[m])} rounds")
    if "alone" in median and "scheduled" in median:
        print(f"  scheduled p99 / alone p99 (medians): {median['scheduled'][1] / median['alone'][1]:.2f}")
        ratios = [runs[(r, "scheduled")][1] / runs[(r, "alone")][1] for r in sorted(rounds, key=int)
                  if (r, "alone") in runs and (r, "scheduled") in runs]
        print("  per round: " + ", ".join(f"{x:.2f}" for x in ratios))
every = {rnd for rnd, _ in runs}
summarize(f"all {len(every)} rounds:", every)
# Rounds in which the host took little CPU away (steal below QUIET_STEAL % in every run of the round):
# steal makes latency bimodal and swamps what the scheduler does.
quiet = {rnd for rnd in every if all(run[2] < quiet_steal for (r, _), run in runs.items() if r == rnd)}
summarize(f"quiet rounds (steal < {quiet_steal:g} % in each run): {len(quiet)} of {len(every)}", quiet)
PY
echo "(load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores)"
