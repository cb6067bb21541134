#!/usr/bin/env python3
"""Live-socket fuzzer: replays mutated real client sessions against a running `vbdtool serve`.

The sessions are those recorded from qemu-img, nbdinfo, nbdcopy and nbdsh by
Fuzz/capture-sessions.py (fixtures/fuzz/live/*.bin: what each client sent). Each fuzz session
takes one, mutates it at the level of its protocol frames (client flags, options, requests and
their payloads) and of its bytes, and sends it over TCP (127.0.0.1) or the unix socket in randomly
sized pieces while reading whatever the server answers; it then half-closes, closes, or resets the
connection. Sessions run `--parallel` at a time.

After every batch the server must still be alive and serve a well-behaved client correctly
(nbdinfo on the unix socket, and a libnbd write-read round trip over TCP), and its resident set
(VmRSS from /proc/PID/status) must stay under `--rss-limit-mb` and must not keep growing: the
largest RSS in the second half of the run may exceed the largest in the first half by at most
`--rss-growth-mb`. At the end the server must stop cleanly on SIGTERM and `vbdtool fsck` must pass.

usage: nbd-live-fuzz.py --vbdtool PATH [--sessions N] [--seconds S] [--parallel P] [--seed N]
Exit 0 when every check passed, 1 otherwise. Bounded by --sessions and --seconds (whichever first).
"""
import argparse
import concurrent.futures
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

OPTION_MAGIC = 0x49484156454F5054
REQUEST_MAGIC = 0x25609513


def split_frames(stream):
    """Client flags, options and requests as separate byte strings (the captured layout)."""
    frames, position = [stream[:4]], 4
    while position + 16 <= len(stream):
        magic, code, length = struct.unpack(">QII", stream[position:position + 16])
        if magic != OPTION_MAGIC:
            break
        frames.append(stream[position:position + 16 + length])
        position += 16 + length
        if code in (1, 7):
            break
    while position + 28 <= len(stream):
        kind = struct.unpack(">H", stream[position + 6:position + 8])[0]
        length = struct.unpack(">I", stream[position + 24:position + 28])[0]
        size = 28 + (length if kind == 1 else 0)
        frames.append(stream[position:position + size])
        position += size
    if position < len(stream):
        frames.append(stream[position:])
    return frames


INTERESTING_32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFF, 0x10000, 4096, 65536, 1 << 25, (1 << 25) + 1]
INTERESTING_64 = [0, 1 << 63, (1 << 64) - 1, (1 << 64) - 512, 1 << 50, 64 << 20, (64 << 20) - 1]


def mutate_frame(frame, rng):
    frame = bytearray(frame)
    if len(frame) >= 28 and struct.unpack(">I", frame[:4])[0] == REQUEST_MAGIC:
        choice = rng.randrange(6)
        if choice == 0:
            frame[4:6] = struct.pack(">H", rng.choice([0, 1, 2, 4, 8, 16, 0xFFFF, rng.randrange(1 << 16)]))
        elif choice == 1:
            frame[6:8] = struct.pack(">H", rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, rng.randrange(1 << 16)]))
        elif choice == 2:
            frame[16:24] = struct.pack(">Q", rng.choice(INTERESTING_64 + [rng.randrange(1 << 64)]))
        elif choice == 3:
            frame[24:28] = struct.pack(">I", rng.choice(INTERESTING_32 + [rng.randrange(1 << 32)]))
        elif choice == 4:
            frame[8:16] = frame[8:16] if rng.random() < 0.5 else struct.pack(">Q", rng.randrange(4))  # handle reuse
        else:
            frame = frame[:rng.randrange(len(frame) + 1)]
        return bytes(frame)
    if len(frame) >= 16 and struct.unpack(">Q", frame[:8])[0] == OPTION_MAGIC:
        choice = rng.randrange(4)
        if choice == 0:
            frame[8:12] = struct.pack(">I", rng.choice([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, rng.randrange(1 << 32)]))
        elif choice == 1:
            frame[12:16] = struct.pack(">I", rng.choice(INTERESTING_32 + [len(frame) - 16 + rng.randrange(-4, 5) & 0xFFFFFFFF]))
        elif choice == 2 and len(frame) > 20:
            position = rng.randrange(16, len(frame) - 3)
            frame[position:position + 4] = struct.pack(">I", rng.choice(INTERESTING_32))
        else:
            frame = frame[:rng.randrange(len(frame) + 1)]
        return bytes(frame)
    if len(frame) == 4:
        return struct.pack(">I", rng.choice([0, 1, 2, 3, 4, 0xFFFFFFFF, rng.randrange(1 << 32)]))
    return bytes(frame)


def first_request(frames):
    for index, frame in enumerate(frames):
        if len(frame) >= 28 and struct.unpack(">I", frame[:4])[0] == REQUEST_MAGIC:
            return index
    return None


def mutate(stream, corpus, rng):
    frames = split_frames(stream)
    # Half the sessions keep their handshake intact and mutate only the requests after it, so that
    # the transmission phase is fuzzed as often as the handshake.
    start = first_request(frames) if rng.random() < 0.5 else None
    start = start or 0
    for _ in range(rng.randrange(1, 5)):
        choice = rng.randrange(9)
        if len(frames) <= start:
            break
        index = rng.randrange(start, len(frames))
        if choice <= 2:
            frames[index] = mutate_frame(frames[index], rng)
        elif choice == 3:
            frames.insert(index, frames[index])  # duplicate (a second GO, a repeated request)
        elif choice == 4 and len(frames) > 1:
            del frames[index]
        elif choice == 5 and len(frames) > 1:
            other = rng.randrange(start, len(frames))
            frames[index], frames[other] = frames[other], frames[index]
        elif choice == 6:
            donor = split_frames(rng.choice(corpus))
            frames.insert(index, rng.choice(donor))  # splice a frame of another client's session
        elif choice == 7:
            frame = bytearray(frames[index])
            for _ in range(rng.randrange(1, 8)):
                if frame:
                    frame[rng.randrange(len(frame))] = rng.randrange(256)
            frames[index] = bytes(frame)
        else:
            frames.insert(index, os.urandom(rng.randrange(1, 64)))
    data = b"".join(frames)
    if rng.random() < 0.15:
        keep = len(b"".join(frames[:start]))
        data = data[:rng.randrange(keep, len(data) + 1)]
    return data


REPLY_MAGICS = (struct.pack(">I", 0x67446698), struct.pack(">I", 0x668E33EF))


class Answer:
    """What the server sent in one session: bytes, and whether a transmission reply was among them."""

    def __init__(self):
        self.bytes = 0
        self.transmission = False

    def add(self, chunk):
        self.bytes += len(chunk)
        if not self.transmission and any(m in chunk for m in REPLY_MAGICS):
            self.transmission = True


def run_session(target, data, seed):
    """Sends `data` in random pieces while draining replies; ends the connection one of three ways."""
    rng = random.Random(seed)
    family, address = target
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(5)
    received = Answer()
    try:
        s.connect(address)
        s.setblocking(False)
        position, deadline = 0, time.monotonic() + 10
        while position < len(data) and time.monotonic() < deadline:
            piece = data[position:position + rng.choice([1, 7, 64, 1500, 65536])]
            try:
                position += s.send(piece)
            except BlockingIOError:
                pass
            except OSError:
                break  # the server closed on us: fine, that is its answer to bad input
            try:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                received.add(chunk)
            except BlockingIOError:
                pass
            except OSError:
                break
        # Mostly a client that waits for its answers; sometimes one that half-closes (the server
        # then drops what it has not answered yet) or resets.
        ending = rng.choices(["wait", "half-close", "reset"], weights=[6, 2, 2])[0]
        if ending == "half-close":
            s.shutdown(socket.SHUT_WR)
        if ending != "reset":
            # Read what the server still answers, briefly.
            s.settimeout(0.3)
            try:
                while True:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    received.add(chunk)
            except OSError:
                pass
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
    except OSError:
        pass
    finally:
        s.close()
    return received


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def health_check(sock_path, port, rng):
    """A well-behaved client: nbdinfo over the unix socket, and a write-read round trip over TCP."""
    info = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///vm0?socket={sock_path}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    if info.returncode != 0 or info.stdout.strip() != str(64 << 20):
        return f"nbdinfo: exit {info.returncode}: {info.stdout.strip()}"
    offset = rng.randrange(0, (64 << 20) - 65536, 512)
    data = rng.randbytes(65536)
    script = (
        "import nbd, sys\n"
        "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
        "data = sys.stdin.buffer.read(); off = int(sys.argv[2])\n"
        "h.pwrite(data, off, nbd.CMD_FLAG_FUA)\n"
        "assert h.pread(len(data), off) == data, 'read back differs'\n"
        "h.shutdown()\n")
    trip = subprocess.run(["/usr/bin/python3", "-c", script, f"nbd://127.0.0.1:{port}/vm0", str(offset)],
                          input=data, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if trip.returncode != 0:
        return f"write-read round trip: {trip.stdout.decode(errors='replace').strip()[-500:]}"
    return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--vbdtool", required=True)
    parser.add_argument("--corpus", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "fuzz", "live"))
    parser.add_argument("--sessions", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--rss-limit-mb", type=int, default=1024)
    parser.add_argument("--rss-growth-mb", type=int, default=96)
    options = parser.parse_args()

    corpus = []
    for name in sorted(os.listdir(options.corpus)):
        with open(os.path.join(options.corpus, name), "rb") as f:
            corpus.append(f.read())
    if not corpus:
        sys.exit("live fuzz: empty corpus")
    rng = random.Random(options.seed)
    print(f"live fuzz: seed {options.seed}, {len(corpus)} recorded sessions, up to {options.sessions} sessions "
          f"or {options.seconds:.0f} s, {options.parallel} in parallel", flush=True)

    work = tempfile.mkdtemp(prefix="vbd-live-fuzz-")
    store = os.path.join(work, "store")
    sock_path = os.path.join(work, "nbd.sock")
    log_path = os.path.join(work, "serve.log")
    server = None
    failure = None
    try:
        subprocess.run([options.vbdtool, "init", "--store", store], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([options.vbdtool, "create", "vm0", "--size", "64M", "--store", store], check=True, stdout=subprocess.DEVNULL)
        subprocess.run([options.vbdtool, "snapshot", "vm0@s", "--store", store], check=True, stdout=subprocess.DEVNULL)
        # A fixed cache size: RSS is then the server's own, not a share of the machine's RAM.
        server = subprocess.Popen([options.vbdtool, "serve", "--store", store, "--unix", sock_path,
                                   "--listen", "127.0.0.1:0", "--cache-size", "64M"],
                                  stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
        port = None
        for _ in range(300):
            with open(log_path) as f:
                found = re.search(r"127\.0\.0\.1:(\d+)", f.read())
            if found and os.path.exists(sock_path):
                port = int(found.group(1))
                break
            if server.poll() is not None:
                break
            time.sleep(0.1)
        if port is None:
            with open(log_path) as f:
                sys.exit("live fuzz: server did not start:\n" + f.read())
        targets = [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_UNIX, sock_path)]
        problem = health_check(sock_path, port, rng)
        if problem:
            sys.exit(f"live fuzz: the server fails a well-behaved client before fuzzing: {problem}")
        baseline = rss_kib(server.pid)
        print(f"live fuzz: server pid {server.pid}, TCP port {port}, RSS {baseline // 1024} MiB before fuzzing", flush=True)

        started = time.monotonic()
        done, batches, received_total, transmitting, rss_history = 0, 0, 0, 0, []
        with concurrent.futures.ThreadPoolExecutor(max_workers=options.parallel) as pool:
            while done < options.sessions and time.monotonic() - started < options.seconds:
                count = min(options.batch, options.sessions - done)
                jobs = []
                for _ in range(count):
                    data = mutate(rng.choice(corpus), corpus, rng)
                    jobs.append(pool.submit(run_session, rng.choice(targets), data, rng.randrange(1 << 32)))
                for job in jobs:
                    answer = job.result()
                    received_total += answer.bytes
                    transmitting += answer.transmission
                done += count
                batches += 1
                if server.poll() is not None:
                    failure = f"the server exited (status {server.returncode}) during batch {batches}"
                    break
                problem = health_check(sock_path, port, rng)
                rss = rss_kib(server.pid)
                rss_history.append(rss)
                elapsed = time.monotonic() - started
                print(f"live fuzz: batch {batches}: {done} sessions in {elapsed:.0f} s "
                      f"({done / elapsed:.0f}/s), RSS {rss // 1024} MiB, well-behaved client "
                      f"{'FAILED: ' + problem if problem else 'ok'}", flush=True)
                if problem:
                    failure = f"after {done} sessions a well-behaved client failed: {problem}"
                    break
                if rss > options.rss_limit_mb * 1024:
                    failure = f"RSS {rss // 1024} MiB exceeds the {options.rss_limit_mb} MiB limit"
                    break
        elapsed = time.monotonic() - started
        if failure is None and len(rss_history) >= 4:
            half = len(rss_history) // 2
            first, second = max(rss_history[:half]), max(rss_history[half:])
            print(f"live fuzz: RSS max {first // 1024} MiB in the first half of the batches, {second // 1024} MiB in the second")
            if second > first + options.rss_growth_mb * 1024:
                failure = f"RSS keeps growing: {first // 1024} MiB -> {second // 1024} MiB"
        print(f"live fuzz: {done} sessions in {batches} batches, {elapsed:.0f} s, "
              f"{received_total} bytes answered by the server; {transmitting} sessions reached the "
              f"transmission phase (got a request reply)", flush=True)
        if failure is None:
            server.send_signal(signal.SIGTERM)
            try:
                status = server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                failure = "the server did not stop within 60 s of SIGTERM"
            else:
                if status != 0:
                    failure = f"the server exited with status {status} on SIGTERM"
        if failure is None:
            fsck = subprocess.run([options.vbdtool, "fsck", "--store", store], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=600)
            if fsck.returncode != 0:
                failure = "fsck after the run: " + fsck.stdout[-2000:]
            else:
                print("live fuzz: server stopped cleanly on SIGTERM; fsck clean")
    finally:
        if server and server.poll() is None:
            server.kill()
            server.wait()
        if failure:
            with open(log_path) as f:
                tail = f.read()[-4000:]
            print(f"FAIL: {failure}\n--- server log (tail) ---\n{tail}")
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failure else 0)


if __name__ == "__main__":
    main()
