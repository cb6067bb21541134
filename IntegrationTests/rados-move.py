#!/usr/bin/python3
"""Moves one RADOS family between two live `vbdtool serve` processes (hosts A and B) with
`vbdtool volume move` while NBD clients write; run by test-rados-move.sh, which starts the micro
cluster and creates the families fam1 (volume vol1 and snapshot vol1@before), fam2 (vol2), fam3
(vol3) and clash (another vol2).

A serves fam1 and fam2, B serves fam3 and clash. Three clients write 4 KiB blocks of a known pattern with a
FLUSH after every 8: one on vol1 (fam1) at A, one on vol2 (fam2) at A, one on vol3 (fam3) at B.
Refused first, while the clients write: moving a family A does not own (fam3, and a name nobody
serves), moving to a host where no server runs, and a second move while one runs (A waits
--move-delay seconds inside a move, so the second one finds it running). Then fam1 moves to B:
the vol1 client loses its connection, reconnects where the command said, reads back every write
A acknowledged before writing anything new, and writes on; the vol2 and vol3 clients never see an
error. The vol1 client's longest stall is printed, not asserted. Afterwards the family moves back
by a volume's name (vol1) and A reads what the client wrote on B. A move of fam2 to B fails (B
serves another vol2) and leaves fam2 served by A again. Last, a third server C takes
fam2 from A by force (fencing A's fam2 client): A loses only fam2 and keeps serving fam1. Every
server stops cleanly; A and B fence nobody.

Exit status 0 when every check passed, 1 otherwise (the reasons are printed).
"""
import json
import os
import subprocess
import sys
import threading
import time

import nbd

from served_hosts import BLOCK, ServerProcess, check, client_arguments, connect, disconnect, failures, pattern


class Server(ServerProcess):
    """A host serving RADOS families of the pool."""

    def __init__(self, name, args, extra):
        super().__init__(name, args.vbdtool, args.tmp, ["--rados", args.pool, "--ceph-conf", args.ceph_conf, *extra])

    def stop(self):
        super().stop(timeout=60)

    def check_stopped_cleanly(self):
        self.check_no_crash()
        check(self.process.returncode == 0 and self.logged("stopped cleanly"),
              f"{self.name} did not stop cleanly (status {self.process.returncode})")
        check(not self.logged("fenced the previous owner"), f"{self.name} fenced somebody, though every family was handed over")


def vbdtool(args, *words):
    """Runs a vbdtool command; returns (exit status, stdout, stderr)."""
    done = subprocess.run([args.vbdtool, *words], capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


class Writer(threading.Thread):
    """Writes blocks 0, 1, 2, ... of EXPORT (a FLUSH after every 8) until `stop` is set, counting
    what the server acknowledged. On an error it reconnects to whatever `uris()` says then,
    checks that every acknowledged block reads back before writing anything new, and goes on.
    At the end it flushes and reads everything back."""

    def __init__(self, name, uris, blocks, flush_every=8):
        super().__init__(daemon=True)
        self.name_, self.uris, self.blocks, self.flush_every = name, uris, blocks, flush_every
        self.acknowledged = 0
        self.stop = threading.Event()
        self.errors = []
        self.lost = []
        self.reconnects = 0
        self.longest_stall = 0.0
        self.outcome = None
        self.generation = 1

    def run(self):
        try:
            self.outcome = self._run()
        except Exception as error:
            self.outcome = f"{self.name_}: writer failed: {error}"

    def _progress(self, last_ok):
        now = time.monotonic()
        self.longest_stall = max(self.longest_stall, now - last_ok)
        return now

    def _verify(self, handle, upto, last_ok):
        for index in range(upto):
            data = handle.pread(BLOCK, index * BLOCK)
            last_ok = self._progress(last_ok)
            if data != pattern(index, self.generation):
                self.lost.append(index)
        return last_ok

    def _run(self):
        handle = connect(self.uris, 30)
        last_ok = time.monotonic()
        index = 0
        while not self.stop.is_set():
            if index >= self.blocks:   # wrap around with a new pattern, every earlier block rewritten
                handle.flush()
                self.generation += 1
                index = 0
                self.acknowledged = 0
            try:
                handle.pwrite(pattern(index, self.generation), index * BLOCK)
                last_ok = self._progress(last_ok)
                index += 1
                self.acknowledged = max(self.acknowledged, index)
                if index % self.flush_every == 0:
                    handle.flush()
                    last_ok = self._progress(last_ok)
            except nbd.Error as error:
                self.errors.append(str(error))
                if self.reconnects >= 3:
                    return f"{self.name_}: gave up after {self.reconnects} reconnects: {self.errors}"
                self.reconnects += 1
                disconnect(handle)
                handle = connect(self.uris, 90)
                last_ok = self._verify(handle, self.acknowledged, last_ok)
                index = self.acknowledged
        handle.flush()
        self._verify(handle, self.acknowledged, time.monotonic())
        disconnect(handle)
        return None


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def families_of(args, server):
    status, out, _ = vbdtool(args, "status", "--store", server.host, "--json")
    return json.loads(out).get("families") if status == 0 else None


def main():
    parser = client_arguments("blocks a writer cycles through (the volume's size)")
    args = parser.parse_args()

    # A short lock for A, so that it notices the forced takeover of fam2 soon (it renews every 2 s).
    a = Server("a", args, ["--namespace", "fam1", "--namespace", "fam2", "--move-delay", "2", "--lock-duration", "6"])
    b = Server("b", args, ["--namespace", "fam3", "--namespace", "clash"])
    writers = []
    c = None
    try:
        if not (check(a.wait_for("serving", 90), "A did not start serving")
                and check(b.wait_for("serving", 90), "B did not start serving")):
            return
        check(families_of(args, a) == ["fam1", "fam2"], f"A serves {families_of(args, a)}, expected fam1 and fam2")
        status, out, err = vbdtool(args, "list", "--store", a.host)
        check(status == 0 and all(name in out for name in ("vol1", "vol1@before", "vol2")), f"A's list: {out} {err}")
        # Requests go to the family they concern: by --namespace, by the image they name, or refused.
        status, out, err = vbdtool(args, "stats", "--store", a.host)
        check(status == 1 and "name one with --namespace" in err, f"stats on a server of two families: {status} {err!r}")
        status, out, err = vbdtool(args, "stats", "--store", a.host, "--rados", args.pool, "--namespace", "fam2")
        check(status == 0 and "vol2" in out and "vol1" not in out, f"stats of fam2 through A: {status} {out} {err}")
        status, out, err = vbdtool(args, "info", "vol1@before", "--store", a.host)
        check(status == 0 and "vol1@before" in out, f"info of fam1's snapshot through A: {status} {out} {err}")
        status, out, err = vbdtool(args, "create", "vol3", "--size", "1M", "--store", a.host, "--rados", args.pool, "--namespace", "fam1")
        check(status == 0, f"create vol3 in fam1 (vol3 exists only in fam3, on B): {status} {err}")
        status, out, err = vbdtool(args, "create", "vol2", "--size", "1M", "--store", a.host, "--rados", args.pool, "--namespace", "fam1")
        check(status == 1 and "exists in the family fam2" in err, f"create vol2 in fam1 while A serves fam2's vol2: {status} {err!r}")
        status, out, err = vbdtool(args, "rm", "vol3", "--store", a.host)
        check(status == 0, f"rm vol3 through A: {status} {err}")
        status, out, err = vbdtool(args, "lease", "list", "--store", a.host)
        check(status == 0, f"lease list on a server of two families: {status} {err}")

        # Where vol1's client connects: A until the move says otherwise.
        vol1_uris = [a.uri("vol1")]
        moved = Writer("vol1", lambda: list(vol1_uris), args.blocks)
        fam2 = Writer("vol2", lambda: [a.uri("vol2")], args.blocks)
        fam3 = Writer("vol3", lambda: [b.uri("vol3")], args.blocks)
        writers = [moved, fam2, fam3]
        for writer in writers:
            writer.start()
        if not check(wait_until(lambda: all(w.acknowledged >= 256 for w in writers), 120),
                     f"the writers never got going: {[w.outcome for w in writers]}"):
            return

        # Refusals: nothing changes, every client goes on.
        status, _, err = vbdtool(args, "volume", "move", "fam3", "--to", b.host, "--store", a.host)
        check(status == 1 and "does not own fam3" in err, f"moving a family A does not own: status {status}, {err!r}")
        status, _, err = vbdtool(args, "volume", "move", "nobody", "--to", b.host, "--store", a.host)
        check(status == 1 and "does not own nobody" in err, f"moving a name nobody serves: status {status}, {err!r}")
        absent = os.path.join(args.tmp, "host-absent")
        status, _, err = vbdtool(args, "volume", "move", "fam1", "--to", absent, "--store", a.host)
        check(status == 1 and "no server runs at" in err, f"moving to an absent host: status {status}, {err!r}")
        status, _, err = vbdtool(args, "volume", "move", "fam1", "--to", b.host, "--store", b.host)
        check(status == 1 and "does not own fam1" in err, f"asking B to move what A owns: status {status}, {err!r}")

        # The move, and a second one while it runs (A waits 2 s inside the first).
        at_move = moved.acknowledged
        first = subprocess.Popen([args.vbdtool, "volume", "move", "fam1", "--to", b.host, "--store", a.host, "--json"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        check(a.wait_for("moving the family", 60), "A did not log the start of the move")
        status, _, err = vbdtool(args, "volume", "move", "fam1", "--to", b.host, "--store", a.host)
        check(status == 1 and "already running" in err, f"a second move while one runs: status {status}, {err!r}")
        out, err = first.communicate(timeout=120)
        if not check(first.returncode == 0, f"the move failed: {err}"):
            return
        report = json.loads(out)
        print(f"move: {report['family']} ({', '.join(report['exports'])}) to B in {report['seconds']:.2f} s, "
              f"{report['connectionsClosed']} connection(s) closed at A; NBD at {report['nbdAddresses']}", flush=True)
        check(report["family"] == "fam1" and set(report["exports"]) == {"vol1", "vol1@before"}, f"move report: {report}")
        check(report["connectionsClosed"] == 1, f"A closed {report['connectionsClosed']} connections (expected vol1's one)")
        # The client reconnects where the command said.
        unix = [address[len("unix:"):] for address in report["nbdAddresses"] if address.startswith("unix:")]
        check(unix == [b.sock], f"the move names {report['nbdAddresses']}, expected B's socket {b.sock}")
        vol1_uris[:] = [f"nbd+unix:///vol1?socket={path}" for path in unix]

        check(wait_until(lambda: moved.reconnects >= 1 and moved.acknowledged >= at_move + 512 or moved.outcome, 120),
              "the vol1 client did not go on writing on B")
        check(families_of(args, a) == ["fam2"], f"A serves {families_of(args, a)} after the move, expected fam2")
        check(families_of(args, b) == ["fam3", "clash", "fam1"], f"B serves {families_of(args, b)} after the move, expected fam3, clash and fam1")
        status, out, _ = vbdtool(args, "list", "--store", b.host)
        check(status == 0 and "vol1@before" in out, f"B's list after the move: {out}")
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(120)
            check(not writer.is_alive(), f"{writer.name_}: the writer did not finish")
            check(writer.outcome is None, f"{writer.name_}: {writer.outcome}")
            check(not writer.lost, f"{writer.name_}: {len(writer.lost)} acknowledged blocks lost, e.g. {writer.lost[:8]}")
        check(moved.reconnects == 1, f"the vol1 client reconnected {moved.reconnects} times (expected once): {moved.errors}")
        # The move ends the connection; a request the store refused (EIO) would reach a guest as a disk error.
        check(not [e for e in moved.errors if "EIO" in e], f"the vol1 client got an I/O error, not a closed connection: {moved.errors}")
        for writer in (fam2, fam3):
            check(not writer.errors, f"{writer.name_}'s client saw errors during the move: {writer.errors}")
        print(f"moved client: {at_move} blocks acknowledged when the move was asked for, "
              f"{moved.acknowledged} at the end, 0 lost; errors seen: {moved.errors}; "
              f"longest stall {moved.longest_stall:.2f} s", flush=True)
        print(f"other clients: vol2 on A {fam2.acknowledged} blocks, vol3 on B {fam3.acknowledged} blocks acknowledged, "
              f"no error; longest stalls {fam2.longest_stall:.2f} s and {fam3.longest_stall:.2f} s", flush=True)

        # Back to A, named by a volume this time; A reads what the client wrote on B.
        status, out, err = vbdtool(args, "volume", "move", "vol1", "--to", a.host, "--store", b.host)
        check(status == 0 and "moved the family fam1" in out and f"unix:{a.sock}" in out, f"moving vol1 back: {status} {out} {err}")
        reader = connect(lambda: [a.uri("vol1")], 30)
        bad = [i for i in range(moved.acknowledged) if reader.pread(BLOCK, i * BLOCK) != pattern(i, moved.generation)]
        disconnect(reader)
        check(not bad, f"after moving back, {len(bad)} blocks of vol1 differ on A, e.g. {bad[:8]}")
        check(families_of(args, a) == ["fam2", "fam1"], f"A serves {families_of(args, a)} after the move back")
        status, out, _ = vbdtool(args, "fsck", "--store", a.host, "--rados", args.pool, "--namespace", "fam1", "--no-data")
        check(status == 0 and "clean" in out, f"fsck of fam1 through A: {out}")

        # A target that refuses the family (B serves another vol2): A serves it again.
        status, out, err = vbdtool(args, "volume", "move", "fam2", "--to", b.host, "--store", a.host)
        check(status == 1 and "both hold vol2" in err and "it is served here again" in err,
              f"moving fam2 to a server holding another vol2: status {status}, {out} {err!r}")
        check(families_of(args, a) == ["fam1", "fam2"], f"A serves {families_of(args, a)} after the refused move, expected fam1 and fam2")
        check(families_of(args, b) == ["fam3", "clash"], f"B serves {families_of(args, b)} after the refused move")
        reader = connect(lambda: [a.uri("vol2")], 30)
        bad = [i for i in range(fam2.acknowledged) if reader.pread(BLOCK, i * BLOCK) != pattern(i, fam2.generation)]
        disconnect(reader)
        check(not bad, f"after the refused move A reads {len(bad)} blocks of vol2 other than written, e.g. {bad[:8]}")

        # A lost lock stops only that family: C takes fam2 by force, A keeps serving fam1.
        c = Server("c", args, ["--namespace", "fam2", "--take-over", "--force"])
        check(c.wait_for("serving", 90), "C did not take fam2 over")
        check(a.wait_for("lost the ownership of the family", 30), "A did not notice that it lost fam2")
        check(wait_until(lambda: families_of(args, a) == ["fam1"], 30), f"A serves {families_of(args, a)} after losing fam2")
        check(a.process.poll() is None, "A stopped although it still owns fam1")
        reader = connect(lambda: [c.uri("vol2")], 30)
        bad = [i for i in range(fam2.acknowledged) if reader.pread(BLOCK, i * BLOCK) != pattern(i, fam2.generation)]
        disconnect(reader)
        check(not bad, f"C reads {len(bad)} blocks of vol2 other than A acknowledged, e.g. {bad[:8]}")
        reader = connect(lambda: [a.uri("vol1")], 30)
        check(reader.pread(BLOCK, 0) == pattern(0, moved.generation), "A no longer reads vol1 after losing fam2")
        disconnect(reader)
        print("lost lock: C took fam2 from A by force; A stopped serving fam2 only and still serves fam1", flush=True)
    finally:
        for writer in writers:
            writer.stop.set()
        if failures:
            for server in (a, b, c):
                if server:
                    server.dump()
        for server in (a, b, c):
            if server:
                server.stop()
        a.check_stopped_cleanly()
        b.check_stopped_cleanly()
        if c:
            check(c.process.returncode == 0 and c.logged("stopped cleanly"), f"C did not stop cleanly (status {c.process.returncode})")
    if failures:
        print(f"{len(failures)} check(s) failed")


if __name__ == "__main__":
    main()
    sys.exit(1 if failures else 0)
