#!/usr/bin/python3
"""Hands a RADOS store between two `vbdtool serve` processes (hosts A and B) while an NBD client
writes through it; run by test-rados-handover.sh, which starts the micro cluster and creates the
stores. Every scenario checks the data the client was promised:

  killed   A dies (SIGKILL) mid-write; B takes over with --force (blocklisting A); the client
           reconnects to B, and every write a FLUSH acknowledged reads back.
  orderly  B waits with --take-over while A serves; A gets SIGTERM (flush, checkpoint, unlock);
           B serves without fencing anyone; the client reconnects and every acknowledged write
           (flushed or not) reads back. The longest stall the client saw is printed, not asserted.
  fenced   A is stopped (SIGSTOP) with a client connected; B takes over with --force; A resumes
           (SIGCONT): the client's write + flush on A fails, A logs the lost lock and exits with
           status 1, and B never sees that write.

Exit status 0 when every check passed, 1 otherwise (the reasons are printed).
"""
import os
import signal
import sys
import threading
import time

import nbd

from served_hosts import BLOCK, ServerProcess, check, client_arguments, connect, disconnect, failures, pattern


class Server(ServerProcess):
    """A host serving the scenario's store."""

    def __init__(self, name, args, tmp, store_args, extra=()):
        super().__init__(name, args.vbdtool, tmp, [*store_args, *extra])


class Writer(threading.Thread):
    """Writes blocks 0, 1, 2, ... (a FLUSH after every `flush_every`), counting what the server
    acknowledged. On an error it reconnects (to whichever of `uris` answers), checks that every
    block it must keep reads back, and goes on until `after` more blocks were written and flushed.
    `keep` is "flushed" (only flushed writes survive a crash) or "acknowledged" (a clean handover
    keeps every acknowledged write)."""

    def __init__(self, uris, keep, blocks, flush_every=8, milestone=512, after=256):
        super().__init__(daemon=True)
        self.uris, self.keep, self.blocks = uris, keep, blocks
        self.flush_every, self.milestone_blocks, self.after = flush_every, milestone, after
        self.acknowledged = 0      # writes of blocks below this were acknowledged
        self.flushed = 0           # ... and covered by an acknowledged FLUSH
        self.milestone = threading.Event()   # enough flushed writes: the handover may start
        self.reconnects = 0
        self.errors = []
        self.lost = []
        self.longest_stall = 0.0
        self.written = 0
        self.outcome = None

    def run(self):
        try:
            self.outcome = self._run()
        except Exception as error:   # reported by the scenario
            self.outcome = f"writer failed: {error}"
        self.milestone.set()

    def _progress(self, last_ok):
        now = time.monotonic()
        self.longest_stall = max(self.longest_stall, now - last_ok)
        return now

    def _verify(self, handle, upto, generation, last_ok):
        for index in range(upto):
            data = handle.pread(BLOCK, index * BLOCK)
            last_ok = self._progress(last_ok)
            if data != pattern(index, generation):
                self.lost.append(index)
        return last_ok

    def _run(self):
        handle = connect(lambda: self.uris, 30)
        last_ok = time.monotonic()
        index, resumed_at = 0, None
        while index < self.blocks:
            try:
                handle.pwrite(pattern(index, 1), index * BLOCK)
                last_ok = self._progress(last_ok)
                self.acknowledged = index + 1
                index += 1
                if index % self.flush_every == 0:
                    handle.flush()
                    last_ok = self._progress(last_ok)
                    self.flushed = index
                    if self.flushed >= self.milestone_blocks:
                        self.milestone.set()
                    if resumed_at is not None and index >= resumed_at + self.after:
                        break
            except nbd.Error as error:
                self.errors.append(str(error))
                if self.reconnects >= 3:
                    return f"gave up after {self.reconnects} reconnects: {self.errors}"
                self.reconnects += 1
                disconnect(handle)
                handle = connect(lambda: self.uris, 90)
                must_keep = self.flushed if self.keep == "flushed" else self.acknowledged
                # Checked before anything new is written: the new server has them from the start.
                last_ok = self._verify(handle, must_keep, 1, last_ok)
                index = resumed_at = must_keep
        handle.flush()
        last_ok = self._verify(handle, index, 1, last_ok)
        self.written = index
        disconnect(handle)
        return None


def start_writer(a, args, b_socket, keep):
    """Waits for A to serve and starts a writer on A that reconnects to B's socket; None on failure."""
    if not check(a.wait_for("serving", 60), "A did not start serving"):
        return None
    writer = Writer([a.uri(), "nbd+unix:///vol?socket=" + os.path.join(args.tmp, b_socket)], keep=keep, blocks=args.blocks)
    writer.start()
    if not check(writer.milestone.wait(120) and writer.outcome is None, f"the writer never got going: {writer.outcome}"):
        return None
    return writer


def scenario_killed(args, store_args):
    print("== killed: A dies with SIGKILL mid-write, B takes over with --force", flush=True)
    a = Server("killed-a", args, args.tmp, store_args)
    b = None
    try:
        writer = start_writer(a, args, "killed-b.sock", keep="flushed")
        if not writer:
            return
        a.process.kill()
        a.process.wait()
        at_kill = writer.flushed
        b = Server("killed-b", args, args.tmp, store_args, ["--take-over", "--force"])
        check(b.wait_for("serving", 90), "B did not start serving after the takeover")
        writer.join(300)
        check(not writer.is_alive(), "the writer did not finish")
        check(writer.outcome is None, f"writer: {writer.outcome}")
        check(writer.reconnects == 1, f"the writer reconnected {writer.reconnects} times (expected once): {writer.errors}")
        check(not writer.lost, f"{len(writer.lost)} flushed blocks lost after the takeover, e.g. {writer.lost[:8]}")
        check(b.logged("fenced the previous owner"), "B did not report fencing A")
        check(at_kill < args.blocks and writer.flushed > at_kill, "the kill did not happen mid-write")
        print(f"killed: {at_kill} blocks flushed when A was killed, all read back from B; "
              f"{writer.written} written in all; longest stall {writer.longest_stall:.2f} s "
              f"(includes starting B)", flush=True)
    finally:
        stop_both(a, b)


def stop_both(a, b):
    """Stops A and (if started) B, dumping their logs when a check failed; B must stop cleanly."""
    if failures:
        a.dump()
        if b:
            b.dump()
    a.stop()
    a.check_no_crash()
    if b:
        b.stop()
        b.check_no_crash()
        check(b.process.returncode == 0 and b.logged("stopped cleanly"), "B did not stop cleanly")


def scenario_orderly(args, store_args):
    print("== orderly: B waits with --take-over, A gets SIGTERM and hands over", flush=True)
    a = Server("orderly-a", args, args.tmp, store_args)
    b = None
    try:
        writer = start_writer(a, args, "orderly-b.sock", keep="acknowledged")
        if not writer:
            return
        b = Server("orderly-b", args, args.tmp, store_args, ["--take-over"])
        if not check(b.wait_for("waiting for the owner to hand the store over", 60), "B did not wait for A"):
            return
        at_handover = writer.acknowledged
        a.process.terminate()
        check(a.exit_status(60) == 0, f"A did not stop cleanly (status {a.process.poll()})")
        check(a.logged("stopped cleanly"), "A did not log a clean stop")
        check(b.wait_for("serving", 60), "B did not start serving after A handed over")
        writer.join(300)
        check(not writer.is_alive(), "the writer did not finish")
        check(writer.outcome is None, f"writer: {writer.outcome}")
        check(writer.reconnects == 1, f"the writer reconnected {writer.reconnects} times (expected once): {writer.errors}")
        check(not writer.lost, f"{len(writer.lost)} acknowledged blocks lost in the handover, e.g. {writer.lost[:8]}")
        check(not b.logged("fenced the previous owner"), "B fenced A although A handed the store over")
        check(at_handover < args.blocks, "the handover did not happen mid-write")
        print(f"orderly: {at_handover} blocks acknowledged when A was told to hand over, 0 lost; "
              f"{writer.written} written in all; longest stall {writer.longest_stall:.2f} s", flush=True)
    finally:
        stop_both(a, b)


def scenario_fenced(args, store_args):
    print("== fenced: A is stopped, B takes over with --force, A resumes and must not commit", flush=True)
    # A short lock, so that A notices the loss soon after it resumes (it renews every 2 s).
    a = Server("fenced-a", args, args.tmp, store_args, ["--lock-duration", "6"])
    b = None
    try:
        if not check(a.wait_for("serving", 60), "A did not start serving"):
            return
        client = connect(lambda: [a.uri()], 30)
        client.pwrite(pattern(0, 1), 0)
        client.flush()
        a.process.send_signal(signal.SIGSTOP)
        b = Server("fenced-b", args, args.tmp, store_args, ["--take-over", "--force"])
        check(b.wait_for("serving", 90), "B did not start serving")
        check(b.logged("fenced the previous owner"), "B did not report fencing A")
        a.process.send_signal(signal.SIGCONT)
        refused = None
        try:
            client.pwrite(pattern(0, 2), 0)
            client.flush()
        except nbd.Error as error:
            refused = error
        check(refused is not None, "A acknowledged a FLUSH after B had taken the store over")
        print(f"fenced: A answered the late write + flush with: {refused}", flush=True)
        disconnect(client)
        status = a.exit_status(60)
        check(status == 1, f"A did not exit with status 1 after losing the store (status {status})")
        check(a.logged("lost the ownership of the store"), "A did not log the lost lock")
        check(a.logged("stopped without committing"), "A did not log that it stopped without committing")
        reader = connect(lambda: [b.uri()], 30)
        check(reader.pread(BLOCK, 0) == pattern(0, 1), "A's late write reached the store B owns")
        disconnect(reader)
    finally:
        for server in (a, b):
            if server and failures:
                server.dump()
        a.stop()
        a.check_no_crash()
        if b:
            b.stop()
            b.check_no_crash()
            check(b.process.returncode == 0 and b.logged("stopped cleanly"), "B did not stop cleanly")


def main():
    parser = client_arguments("most blocks a writer writes (the volume's size)")
    parser.add_argument("scenario", nargs="+", choices=["killed", "orderly", "fenced"])
    parser.add_argument("--namespace-prefix", default="handover")
    args = parser.parse_args()
    scenarios = {"killed": scenario_killed, "orderly": scenario_orderly, "fenced": scenario_fenced}
    for name in args.scenario:
        store_args = ["--rados", args.pool, "--ceph-conf", args.ceph_conf, "--namespace", f"{args.namespace_prefix}-{name}"]
        scenarios[name](args, store_args)
    if failures:
        print(f"{len(failures)} check(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
