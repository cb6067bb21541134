#!/usr/bin/env python3
"""Per-suite test counts from Swift Testing's xUnit report, checked against a committed floor.

Usage: test-counts.py REPORT.xml FLOOR_FILE [--update]

Prints how many tests each suite ran and how many it skipped. Fails (exit 1) when
- a suite listed in FLOOR_FILE ran fewer tests than its floor, or did not run at all (a suite
  that vanishes because a tool is missing or an `.enabled(if:)` turned false is caught here);
- any test was skipped, unless VBD_ALLOW_SKIPS=1 (make test installs every tool a test needs, so
  a skip means a test that proved nothing).
--update rewrites FLOOR_FILE with the counts of this run (after adding tests on purpose).
"""
import os
import sys
import xml.etree.ElementTree as ET


def main():
    report, floor_file = sys.argv[1], sys.argv[2]
    update = "--update" in sys.argv[3:]
    ran, skipped = {}, {}
    for case in ET.parse(report).getroot().iter("testcase"):
        suite = case.get("classname", "?")
        if case.find("skipped") is not None:
            skipped.setdefault(suite, []).append(case.get("name"))
        else:
            ran[suite] = ran.get(suite, 0) + 1
    suites = sorted(set(ran) | set(skipped))
    width = max((len(s) for s in suites), default=10)
    print(f"{'SUITE':<{width}}  RAN  SKIPPED")
    for suite in suites:
        print(f"{suite:<{width}}  {ran.get(suite, 0):>3}  {len(skipped.get(suite, [])):>7}")
    total_skipped = sum(len(v) for v in skipped.values())
    print(f"swift test: {sum(ran.values())} tests ran in {len(ran)} suites, {total_skipped} skipped")

    if update:
        with open(floor_file, "w") as f:
            f.write("# Tests each suite must run at least (scripts/test-counts.py --update rewrites it).\n")
            for suite in sorted(ran):
                f.write(f"{suite} {ran[suite]}\n")
        print(f"wrote {floor_file}")
        return 0

    problems = []
    with open(floor_file) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            suite, floor = line.rsplit(" ", 1)
            if ran.get(suite, 0) < int(floor):
                problems.append(f"{suite} ran {ran.get(suite, 0)} tests, fewer than its floor of {floor}")
    if total_skipped and os.environ.get("VBD_ALLOW_SKIPS") != "1":
        for suite, names in skipped.items():
            problems.append(f"{suite} skipped {', '.join(names)}")
    for p in problems:
        print(f"FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
