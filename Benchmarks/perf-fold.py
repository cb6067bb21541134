#!/usr/bin/env python3
"""Folds `perf script` output into flame-graph stacks: one line per distinct stack,
"root;...;leaf COUNT", the format flamegraph.pl and speedscope read.

    perf record -F 2000 -g -p PID -o perf.data -- sleep 8
    perf script -i perf.data | Benchmarks/perf-fold.py > profile.folded

Symbols keep their Swift mangling (demangle with `swift demangle` if needed); frames are kept
whole, offsets dropped. Reads stdin, writes stdout, heaviest stacks first."""
import collections
import re
import sys


def fold(lines):
    counts = collections.Counter()
    stack = []
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if stack:
                counts[";".join(reversed(stack))] += 1
            stack = []
            continue
        if line[0] not in " \t":
            stack = []  # sample header: comm pid time event
            continue
        parts = line.split(None, 1)
        if len(parts) < 2:
            continue
        symbol = re.sub(r"\+0x[0-9a-f]+$", "", parts[1].split(" (")[0])
        stack.append(symbol or "[unknown]")
    if stack:
        counts[";".join(reversed(stack))] += 1
    return counts


if __name__ == "__main__":
    for stack, count in fold(sys.stdin).most_common():
        print(f"{stack} {count}")
