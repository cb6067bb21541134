#!/usr/bin/env python3
"""How long a read of a file waits behind a hole punch of another part of it (issue 15).

    Benchmarks/punch-stall.py [--dir DIR] [--size-mib N] SLICE_MIB...

Writes a file of N MiB (default 2048) in 64 KiB pieces in random order (many extents, as a data
file gets), drops it from the page cache, then for each SLICE_MIB (0 = the whole range in one
call): refills the first half, starts a reader of random uncached 4 KiB blocks of the second
half (one every millisecond), punches the first half in slices of SLICE_MIB, and prints the
punch's duration and the reader's longest and p99 latency before and during the punch.
Bounded: one file in DIR (default: a new directory under /var/tmp, removed at the end).
"""
import argparse, ctypes, os, random, shutil, tempfile, threading, time

parser = argparse.ArgumentParser()
parser.add_argument("--dir")
parser.add_argument("--size-mib", type=int, default=2048)
parser.add_argument("slices", type=int, nargs="+")
args = parser.parse_args()
work = args.dir or tempfile.mkdtemp(dir="/var/tmp", prefix="punch-stall.")
path = os.path.join(work, "data")
size = args.size_mib << 20
libc = ctypes.CDLL("libc.so.6", use_errno=True)
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2

def fill(fd, start, end):
    piece = os.urandom(65536)
    offsets = list(range(start, end, 65536))
    random.shuffle(offsets)
    for o in offsets:
        os.pwrite(fd, piece, o)
    os.fsync(fd)

try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, size)
    fill(fd, size // 2, size)
    for slice_mib in args.slices:
        fill(fd, 0, size // 2)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        latencies, stop = [], threading.Event()
        def reader():
            rfd = os.open(path, os.O_RDONLY)
            while not stop.is_set():
                o = random.randrange(size // 2, size, 4096)
                os.posix_fadvise(rfd, o, 4096, os.POSIX_FADV_DONTNEED)
                t = time.perf_counter()
                os.pread(rfd, 4096, o)
                latencies.append(time.perf_counter() - t)
                time.sleep(0.001)
            os.close(rfd)
        thread = threading.Thread(target=reader)
        thread.start()
        time.sleep(0.5)
        before = len(latencies)
        step = (slice_mib << 20) if slice_mib else size // 2
        t = time.perf_counter()
        for o in range(0, size // 2, step):
            if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(o), ctypes.c_long(min(step, size // 2 - o))) != 0:
                raise OSError(ctypes.get_errno(), "fallocate")
        punch = time.perf_counter() - t
        time.sleep(0.3)
        stop.set()
        thread.join()
        during = sorted(latencies[before:])
        print(f"slice {slice_mib or args.size_mib // 2} MiB: punch {punch * 1000:.0f} ms; reads before: max "
              f"{max(latencies[:before]) * 1000:.1f} ms; during and 0.3 s after: {len(during)} reads, max "
              f"{during[-1] * 1000:.1f} ms, p99 {during[int(len(during) * 0.99)] * 1000:.1f} ms")
finally:
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
