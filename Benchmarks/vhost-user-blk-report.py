#!/usr/bin/env python3
"""Tables of Benchmarks/vhost-user-blk.sh's run: per fio job, each back end's IOPS, the ratios
vbd-vhost/qsd-vhost and vbd-vhost/vbd-nbd, the server's CPU time per request and the guest's CPU use.
    vhost-user-blk-report.py OUT_DIR CLK_TCK SERVER... [--jobs JOB...]
OUT_DIR holds SERVER.JOB.json (fio's report), SERVER.cpu (server CPU ticks at each job's start and
end) and SERVER.load (/proc/loadavg before and after the guest)."""
import json
import os
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
            "lat_us": (report["read"]["clat_ns"]["mean"] if report["read"]["total_ios"] else report["write"]["clat_ns"]["mean"]) / 1000,
        }
    with open(os.path.join(out, f"{server}.load")) as f:
        loads = [line.strip() for line in f]
    return results, loads


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
    print("mean completion latency (us, fio clat):")
    print()
    print("| job | " + " | ".join(servers) + " |")
    print("|---|" + "---:|" * len(servers))
    for job in JOBS:
        print(f"| {job} | " + " | ".join(f"{data[s][0][job]['lat_us']:.0f}" for s in servers) + " |")


if __name__ == "__main__":
    main()
