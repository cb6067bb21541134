#!/usr/bin/env python3
"""Per-request timeline of a vhost-user-blk back end at queue depth 1, from a trace of
Benchmarks/vhost-user-blk.sh (TRACE=JOB): the whole machine's scheduler events.
    vhost-user-blk-trace.py TRACE.data SERVER_PID
For every kick (a QEMU thread wakes a thread of the server) up to the call (a server thread wakes a
QEMU thread) it measures, in microseconds:
  kick->run    from the kick's wake-up until the woken server thread runs (scheduling delay)
  run->call    from then until the server wakes QEMU (the server's service time, its own
               hand-offs between its threads included)
  call->qemu   from the call until the woken QEMU thread runs
  call->kick   from the call until the next kick (QEMU, the guest and fio: the rest of the loop),
               and the share of those a poll of the ring for 20, 50, 100 us after the call would catch
  hops         wake-ups between the server's own threads inside one request
  preempted    requests during which a server thread was switched out while runnable
  runqueue     every wait of a server thread for a CPU (from its wake-up, or from being switched
               out while runnable, until it runs): per request, and the waits of 1 ms or more
and the priority the server's threads ran at. Only meaningful at queue depth 1 (one request at a time).
A request the guest did not kick for (the server was still awake and took it from the ring) or
that was completed without a call (the guest did not want an interrupt) merges with its neighbour:
n counts kick-to-call cycles, and the tails (max) of run->call and call->kick may span several
requests; the medians are the figures to read."""
import re
import statistics
import subprocess
import sys

LINE = re.compile(r"^\s*(\S.*?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)$")


def percentiles(values):
    if not values:
        return "-"
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * len(v)))]
    return (f"mean {statistics.fmean(v):7.1f}  p50 {pick(0.5):7.1f}  p90 {pick(0.9):7.1f}  "
            f"p99 {pick(0.99):7.1f}  max {v[-1]:8.1f}  (n={len(v)})")


def main():
    data, server = sys.argv[1], int(sys.argv[2])
    out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,pid,tid,cpu,time,event,trace"],
                         capture_output=True, text=True).stdout
    tid_pid = {}
    qemu = set()
    events = []
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        comm, pid, tid, _cpu, t, event, rest = m.groups()
        pid, tid, t = int(pid), int(tid), float(t) * 1e6
        tid_pid[tid] = pid
        if comm.startswith("qemu-system"):
            qemu.add(pid)
        events.append((t, pid, tid, event, rest))
    server_tids = {t for t, p in tid_pid.items() if p == server}
    qemu_tids = {t for t, p in tid_pid.items() if p in qemu}
    kick_run, run_call, call_qemu, call_kick, hops, prios = [], [], [], [], [], {}
    preempted = 0
    ready_since, runqueue = {}, []
    state = None   # per request: dict
    last_call = None
    pending_qemu = None
    for t, pid, tid, event, rest in events:
        if event == "sched:sched_wakeup":
            target = int(re.search(r" pid=(\d+)", rest).group(1))
            if target in server_tids:
                ready_since.setdefault(target, t)
        if event == "sched:sched_waking":
            target = int(re.search(r" pid=(\d+)", rest).group(1))
            if tid in qemu_tids and target in server_tids and state is None:
                state = {"kick": t, "target": target, "run": None, "hops": 0, "preempted": False}
                if last_call is not None:
                    call_kick.append(t - last_call)
            elif state is not None and tid in server_tids and target in server_tids:
                state["hops"] += 1
            elif state is not None and state["run"] is not None and tid in server_tids and target in qemu_tids:
                run_call.append(t - state["run"])
                hops.append(state["hops"])
                preempted += state["preempted"]
                last_call = t
                pending_qemu = (t, target)
                state = None
        elif event == "sched:sched_switch":
            nxt = int(re.search(r"next_pid=(\d+)", rest).group(1))
            prio = int(re.search(r"next_prio=(\d+)", rest).group(1))
            prev_state = re.search(r"prev_state=(\S+)", rest).group(1)
            if nxt in server_tids:
                prios[prio] = prios.get(prio, 0) + 1
                if nxt in ready_since:
                    runqueue.append(t - ready_since.pop(nxt))
            if tid in server_tids and prev_state.startswith("R"):
                ready_since[tid] = t
            if state is not None and nxt == state["target"] and state["run"] is None:
                state["run"] = t
                kick_run.append(t - state["kick"])
            if state is not None and state["run"] is not None and tid in server_tids and prev_state.startswith("R"):
                state["preempted"] = True
            if pending_qemu is not None and nxt == pending_qemu[1]:
                call_qemu.append(t - pending_qemu[0])
                pending_qemu = None
    print(f"server {server}: threads {sorted(server_tids)}; priorities its threads ran at (switch-ins): {prios}")
    print(f"kick->run   {percentiles(kick_run)}")
    print(f"run->call   {percentiles(run_call)}")
    print(f"call->qemu  {percentiles(call_qemu)}")
    print(f"call->kick  {percentiles(call_kick)}")
    if call_kick:
        caught = ", ".join(f"{w} us: {100 * sum(g <= w for g in call_kick) / len(call_kick):.1f} %" for w in (20, 50, 100))
        print(f"next kick within (what polling the ring that long after a call would catch): {caught}")
    print(f"hops        {percentiles(hops)}")
    print(f"preempted   {preempted} of {len(run_call)} requests")
    if run_call:
        print(f"runqueue    {sum(runqueue) / len(run_call):.1f} us per request waiting for a CPU; "
              f"{sum(w >= 1000 for w in runqueue)} waits >= 1 ms, {sum(w for w in runqueue if w >= 1000) / 1000:.1f} ms in them; "
              f"{percentiles(runqueue)}")


if __name__ == "__main__":
    main()
