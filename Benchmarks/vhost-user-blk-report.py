#!/usr/bin/env python3
"""Tables of Benchmarks/vhost-user-blk.sh's run: per fio job, each back end's IOPS, the ratios
vbd-vhost/qsd-vhost and vbd-vhost/vbd-nbd, the server's CPU time per request and the guest's CPU use.
    vhost-user-blk-report.py OUT_DIR CLK_TCK SERVER... [--jobs JOB...]
OUT_DIR holds SERVER.JOB.json (fio's report), SERVER.cpu (server CPU ticks at each job's start and
end), SERVER.irq (the disk's interrupts in the guest per job), SERVER.load (/proc/loadavg before
and after the guest) and SERVER.log (the server's log: vbd's door logs its kicks, calls and
completions per queue when the front end disconnects)."""
import json
import os
import re
import sys

JOBS = ["randread-4k-qd1", "randread-4k-qd32", "randwrite-4k-qd1", "randwrite-4k-qd32"]


def load(out, ticks, server):
    cpu = {}
    with open(os.path.join(out, f"{server}.cpu")) as f:
        for line in f:
            job, edge, value = line.split()
            cpu.setdefault(job, {})[edge] = int(value)
    results = {}
    for job in JOBS:
        with open(os.path.join(out, f"{server}.{job}.json")) as f:
            report = json.load(f)["jobs"][0]
        ios = report["read"]["total_ios"] + report["write"]["total_ios"]
        iops = report["read"]["iops"] + report["write"]["iops"]
        seconds = (cpu[job]["end"] - cpu[job]["start"]) / ticks
        results[job] = {
            "iops": iops,
            "ios": ios,
            "cpu_us_per_request": seconds * 1e6 / ios if ios else float("nan"),
            "server_cpu_s": seconds,
            "guest_cpu": report["usr_cpu"] + report["sys_cpu"],
            # fio's own CPU (usr + sys) over the job's run time, per request: what the guest's
            # submitting and reaping cost (interrupts taken while fio sleeps are not in it).
            "guest_cpu_us_per_request": (report["usr_cpu"] + report["sys_cpu"]) / 100 * report["job_runtime"] * 1000 / ios
            if ios else float("nan"),
            "lat_us": (report["read"]["clat_ns"]["mean"] if report["read"]["total_ios"] else report["write"]["clat_ns"]["mean"]) / 1000,
        }
    interrupts = {}
    irq_path = os.path.join(out, f"{server}.irq")
    if os.path.exists(irq_path):
        with open(irq_path) as f:
            for line in f:
                job, count = line.split()
                interrupts[job] = int(count)
    for job in JOBS:
        count = interrupts.get(job)
        ios = results[job]["ios"]
        results[job]["interrupts"] = count
        results[job]["irq_per_request"] = count / ios if count is not None and ios else float("nan")
    with open(os.path.join(out, f"{server}.load")) as f:
        loads = [line.strip() for line in f]
    return results, loads


def door_counters(out, server):
    """The vhost-user door's counts for the whole session (the fill and every job), summed over
    queues, from its "front end disconnected" log line; None for other servers or older builds."""
    path = os.path.join(out, f"{server}.log")
    if not os.path.exists(path):
        return None
    counts = {}
    with open(path, errors="replace") as f:
        for line in f:
            if "front end disconnected" not in line:
                continue
            for key in ("requests", "calls", "kicks"):
                m = re.search(key + r" per queue=([0-9,]+)", line)
                if m:
                    counts[key] = counts.get(key, 0) + sum(int(x) for x in m.group(1).split(","))
    return counts if "calls" in counts else None


def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"


def main():
    global JOBS
    out, ticks, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    if "--jobs" in servers:
        JOBS = servers[servers.index("--jobs") + 1:]
        servers = servers[:servers.index("--jobs")]
    data = {s: load(out, ticks, s) for s in servers}
    print("load average (1, 5, 15 min) before and after each guest:")
    for s in servers:
        print(f"  {s}: {' -> '.join(data[s][1])}")
    print()
    head = "| job | " + " | ".join(f"{s} IOPS" for s in servers)
    rule = "|---|" + "---:|" * len(servers)
    if "vbd-vhost" in servers and "qsd-vhost" in servers:
        head += " | vbd-vhost / qsd-vhost"; rule += "---:|"
    if "vbd-vhost" in servers and "vbd-nbd" in servers:
        head += " | vbd-vhost / vbd-nbd"; rule += "---:|"
    print(head + " |")
    print(rule)
    for job in JOBS:
        row = f"| {job} | " + " | ".join(f"{data[s][0][job]['iops']:.0f}" for s in servers)
        if "vbd-vhost" in servers and "qsd-vhost" in servers:
            row += " | " + ratio(data["vbd-vhost"][0][job]["iops"], data["qsd-vhost"][0][job]["iops"])
        if "vbd-vhost" in servers and "vbd-nbd" in servers:
            row += " | " + ratio(data["vbd-vhost"][0][job]["iops"], data["vbd-nbd"][0][job]["iops"])
        print(row + " |")
    print()
    print("server CPU per request (us; requests completed in the job) and the guest's CPU use (fio usr+sys):")
    print()
    print("| job | " + " | ".join(f"{s} CPU/req" for s in servers) + " | " + " | ".join(f"{s} guest CPU" for s in servers) + " |")
    print("|---|" + "---:|" * (2 * len(servers)))
    for job in JOBS:
        cells = [f"{data[s][0][job]['cpu_us_per_request']:.1f} ({data[s][0][job]['ios']})" for s in servers]
        cells += [f"{data[s][0][job]['guest_cpu']:.0f}%" for s in servers]
        print(f"| {job} | " + " | ".join(cells) + " |")
    print()
    print("per request: the disk's interrupts in the guest (its /proc/interrupts over the job; interrupts taken),")
    print("fio's CPU in the guest (us) and the server's CPU (us):")
    print()
    print("| job | " + " | ".join(f"{s} irq/req" for s in servers) + " | " + " | ".join(f"{s} guest us/req" for s in servers)
          + " | " + " | ".join(f"{s} server us/req" for s in servers) + " |")
    print("|---|" + "---:|" * (3 * len(servers)))
    for job in JOBS:
        cells = []
        for s in servers:
            r = data[s][0][job]
            cells.append("-" if r["interrupts"] is None else f"{r['irq_per_request']:.3f} ({r['interrupts']})")
        cells += [f"{data[s][0][job]['guest_cpu_us_per_request']:.1f}" for s in servers]
        cells += [f"{data[s][0][job]['cpu_us_per_request']:.1f}" for s in servers]
        print(f"| {job} | " + " | ".join(cells) + " |")
    for s in servers:
        counts = door_counters(out, s)
        if counts:
            requests = counts.get("requests", 0)
            per = lambda n: f"{n / requests:.3f}" if requests else "-"
            print(f"\n{s} door, whole session (fill included): {requests} requests, {counts['calls']} call signals "
                  f"({per(counts['calls'])} per request), {counts.get('kicks', 0)} kicks read ({per(counts.get('kicks', 0))} per request)")
    print()
    print("mean completion latency (us, fio clat):")
    print()
    print("| job | " + " | ".join(servers) + " |")
    print("|---|" + "---:|" * len(servers))
    for job in JOBS:
        print(f"| {job} | " + " | ".join(f"{data[s][0][job]['lat_us']:.0f}" for s in servers) + " |")


if __name__ == "__main__":
    main()
