#!/usr/bin/python3
"""Concurrency checker for `vbdtool serve` (issue 12, item 2).

Many real NBD connections (libnbd, many requests in flight on each) write and read several volumes,
snapshots and shares of one served store, while the CLI runs snapshot, share, rm, resize, gc and
fsck against the same server through its control socket, and the clients send TRIM, WRITE_ZEROES
and FLUSH. Every block written names itself: a header with a magic, the image it was written to,
the block number and a global write id, then filler derived from them (random or compressible).
Some writes are duplicates on purpose (one of a few shared contents) so that dedup is exercised.

Every 4 KiB block of every read is checked against a model of what may be there:

* it was written to this image's own lineage (the image itself, or the volume a snapshot was
  taken of, before the snapshot; for a share, its snapshot's contents), at this block, or it is
  zero where a TRIM, a WRITE_ZEROES or "never written" allows;
* real-time order: for a read sent at S and answered at A, the candidates are the writes of the
  block sent before A, minus every write W for which some write W2 of the same block was sent
  after W was acknowledged and was itself acknowledged (or seen by an earlier finished read)
  before S. The older contents underneath (the origin, or zero) count only if no write of the
  block was acknowledged before S;
* a snapshot holds the state at its creation: writes acknowledged before `vbdtool snapshot` was
  started must be in it, writes sent after it returned must not, and the ones in between may
  or may not be, but once a block of a snapshot has been read it never changes.

Times are taken on one monotonic clock in this process; a request's "sent" is taken before the
libnbd call and its "acknowledged" when its completion is seen, which only ever widens the set
of accepted answers (no false alarms from clock skew). An anomaly is reported with the read, what
it returned, what would have been accepted and the writes of that block with their times.

After the load phase every block of every live image is read once more with nothing in flight
(exact check), then the server is stopped (SIGTERM: flush, checkpoint, close) and started again
and everything is read a final time: a clean restart must preserve exactly the acknowledged state.

Exit status: 0 no anomaly, 1 anomalies found, 2 the checker could not run (setup failure).
"""
import argparse
import collections
import functools
import hashlib
import os
import random
import select
import signal
import struct
import subprocess
import sys
import threading
import time

import nbd

BLOCK = 4096
MAGIC = b"VBDCHK01"
HEADER = struct.Struct(">8sBBHIQQ")   # magic, kind, compressible, dup class, image id, block, write id
KIND_UNIQUE, KIND_DUP = 1, 2
DUP_CLASSES = 16                      # few enough that duplicates really dedup
INF = float("inf")
ZERO_BLOCK = bytes(BLOCK)


def now():
    return time.monotonic()


# ---------------------------------------------------------------------------------------------
# Block contents: every block says what it is; the body is derived from the header so that a
# block whose header is right but whose body belongs to something else is caught too.

# Incompressible filler: slices of one fixed random pool, at an offset derived from the header.
POOL_BYTES = 1 << 20
POOL = random.Random(0x5EED).randbytes(POOL_BYTES + BLOCK)
SECTOR = 512


@functools.lru_cache(maxsize=16384)   # reads return the same blocks again and again
def block_bytes(kind, compressible, dup_class, image_id, block, write_id):
    header = HEADER.pack(MAGIC, kind, compressible, dup_class, image_id, block, write_id)
    stamp = hashlib.blake2b(header, digest_size=16).digest()
    if compressible:
        return header + stamp * ((BLOCK - len(header)) // len(stamp))
    # Every 512-byte sector starts with the header's stamp, so a block pieced together from
    # sectors of different writes is caught as well.
    offset = int.from_bytes(stamp[:4], "big") % POOL_BYTES
    parts = [header, stamp, POOL[offset:offset + SECTOR - len(header) - len(stamp)]]
    for sector in range(1, BLOCK // SECTOR):
        start = offset + sector * SECTOR
        parts += [stamp, POOL[start:start + SECTOR - len(stamp)]]
    return b"".join(parts)


def content_key(kind, dup_class, image_id, block, write_id):
    """What the checker compares: a unique block is (image, block, write); a duplicate is its class."""
    if kind == KIND_UNIQUE:
        return ("u", image_id, block, write_id)
    return ("d", dup_class)


ZERO_KEY = ("z",)


def dup_block(dup_class):
    """The shared contents of a duplicate class: odd classes compressible, even ones not."""
    return block_bytes(KIND_DUP, dup_class & 1, dup_class, 0, 0, 0)


def decode_block(data):
    """(key, problem): the key a block read back names, or a problem if it names nothing valid."""
    if data == ZERO_BLOCK:
        return ZERO_KEY, None
    if data[:8] != MAGIC:
        return None, "garbage (no header): " + data[:24].hex()
    _, kind, compressible, dup_class, image_id, block, write_id = HEADER.unpack_from(data)
    if kind not in (KIND_UNIQUE, KIND_DUP) or compressible > 1:
        return None, "garbage (bad header fields): " + data[:40].hex()
    if data != block_bytes(kind, compressible, dup_class, image_id, block, write_id):
        return None, f"torn/corrupt block: header names {describe_key(content_key(kind, dup_class, image_id, block, write_id))} but the body differs"
    return content_key(kind, dup_class, image_id, block, write_id), None


# ---------------------------------------------------------------------------------------------
# The model

class Write:
    """One NBD write, trim or write-zeroes, covering blocks first..first+count-1 of one image."""
    __slots__ = ("wid", "image", "first", "count", "op", "dup_class", "compressible", "send", "ack", "failed", "seen")

    def __init__(self, wid, image, first, count, op, dup_class, compressible, send):
        self.wid, self.image, self.first, self.count, self.op = wid, image, first, count, op
        self.dup_class, self.compressible, self.send = dup_class, compressible, send
        self.ack = INF          # unknown until acknowledged; stays INF if it failed (may or may not be applied)
        self.failed = None
        self.seen = None        # block -> earliest end of a read that returned this write there

    def key(self, block):
        if self.op in ("trim", "zero"):
            return ZERO_KEY
        if self.op == "dup":
            return ("d", (self.dup_class + block - self.first) % DUP_CLASSES)
        return ("u", self.image.iid, block, self.wid)

    def data(self):
        if self.op == "dup":
            return b"".join(dup_block((self.dup_class + i) % DUP_CLASSES) for i in range(self.count))
        return b"".join(block_bytes(KIND_UNIQUE, self.compressible, 0, self.image.iid, self.first + i, self.wid)
                        for i in range(self.count))

    def effective_ack(self, block):
        if self.seen and block in self.seen:
            return min(self.ack, self.seen[block])
        return self.ack

    def describe(self, t0, block=None):
        what = {"write": "write", "dup": f"duplicate write (class {self.dup_class})", "trim": "trim", "zero": "write-zeroes"}[self.op]
        ack = "not acknowledged (yet)" if self.ack == INF else f"acked {self.ack - t0:.6f}"
        if self.failed:
            ack += f" (failed: {self.failed})"
        extra = ""
        if block is not None and self.seen and block in self.seen:
            extra = f", seen by a read ending {self.seen[block] - t0:.6f}"
        return (f"#{self.wid} {what} of {self.image.name} blocks {self.first}..{self.first + self.count - 1}"
                f" sent {self.send - t0:.6f} {ack}{extra}")


class Image:
    """A volume, share or snapshot as the checker knows it."""

    def __init__(self, iid, name, kind, blocks, origin=None, parent=None, snap_start=None, snap_end=None):
        self.iid, self.name, self.kind, self.blocks = iid, name, kind, blocks
        self.origin = origin              # for a share: the snapshot it was made from
        self.origin_blocks = origin.blocks if origin else 0
        self.parent = parent              # for a snapshot: the volume it was taken of
        self.snap_start, self.snap_end = snap_start, snap_end
        self.history = collections.defaultdict(list)  # block -> [Write], in send order
        self.pinned = {}                  # snapshot: block -> key first read there
        self.deleted_at = None            # when `rm` was started

    @property
    def writable(self):
        return self.kind == "volume"

    def lineage(self):
        """Image ids whose writes may legitimately show up in this image."""
        ids, image = set(), self
        while image is not None:
            if image.kind == "snapshot":
                image = image.parent
                continue
            ids.add(image.iid)
            image = image.origin
        return ids


def candidates(image, block, sent, answered, out):
    """Appends (key, write-or-None, via) for every content `block` of `image` may hold for a read
    sent at `sent` and answered at `answered` (see the module docstring)."""
    if image.kind == "snapshot":
        if block in image.pinned:
            out.append((image.pinned[block], None, f"{image.name} (as read before)"))
            return
        candidates(image.parent, block, image.snap_start, image.snap_end, out)
        return
    history = image.history.get(block, ())
    newest_acked_send = None
    for w in history:
        if w.effective_ack(block) < sent and (newest_acked_send is None or w.send > newest_acked_send):
            newest_acked_send = w.send
    for w in history:
        if w.send < answered and (newest_acked_send is None or w.effective_ack(block) >= newest_acked_send):
            out.append((w.key(block), w, image.name))
    if newest_acked_send is None:
        if image.origin is not None and block < image.origin_blocks:
            candidates(image.origin, block, sent, answered, out)
        else:
            out.append((ZERO_KEY, None, f"{image.name} (never written)"))


IMAGE_NAMES = {}   # image id -> name, for the reports


def describe_key(key):
    if key == ZERO_KEY:
        return "zeros"
    if key[0] == "d":
        return f"duplicate content class {key[1]}"
    return f"write #{key[3]} ({IMAGE_NAMES.get(key[1], f'image {key[1]}')} block {key[2]})"


# ---------------------------------------------------------------------------------------------

class Checker:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.lock = threading.RLock()
        self.t0 = now()
        self.images = {}                  # name -> Image (live and deleted)
        self.writes = {}                  # wid -> Write
        self.next_wid = 1
        self.next_iid = 1
        self.anomalies = []
        self.anomaly_count = collections.Counter()
        self.counts = collections.Counter()
        self.control_counts = collections.Counter()
        self.stop_load = threading.Event()
        self.hung = False
        self.server_died = False
        self.buffers = BufferPool()
        self.server = None
        self.sock = os.path.join(args.workdir, "nbd.sock")

    # -- anomalies --------------------------------------------------------------------------

    def anomaly(self, kind, text):
        self.anomaly_count[kind] += 1
        # The first few of every kind in full, so that a flood of one kind does not hide another.
        if self.anomaly_count[kind] <= self.args.max_reports:
            self.anomalies.append(f"ANOMALY {sum(self.anomaly_count.values())} [{kind}] {text}")
            print(self.anomalies[-1], flush=True)
        if sum(self.anomaly_count.values()) >= self.args.max_anomalies:
            self.stop_load.set()

    # -- the server and the CLI --------------------------------------------------------------

    def vbdtool(self, *argv):
        cmd = [self.args.vbdtool, *argv, "--store", self.args.store, *self.args.store_args.split()]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    def start_server(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        log = open(os.path.join(self.args.workdir, "serve.log"), "a")
        cmd = [self.args.vbdtool, "serve", "--store", self.args.store, *self.args.store_args.split(), "--unix", self.sock,
               "--cache-size", self.args.cache_size, "--log-level", "warning"]
        if self.args.checkpoint_journal_bytes:
            cmd += ["--checkpoint-journal-bytes", self.args.checkpoint_journal_bytes]
        cmd += self.args.serve_args.split()
        self.server = subprocess.Popen(cmd, stdout=log, stderr=log)
        deadline = now() + 60
        while now() < deadline:
            if self.server.poll() is not None:
                raise SystemExit(f"setup: vbdtool serve exited with {self.server.returncode}; see {log.name}")
            if os.path.exists(self.sock) and os.path.exists(os.path.join(self.args.store, "control.sock")):
                try:
                    h = nbd.NBD()
                    h.set_export_name(self.images_live()[0].name)
                    h.connect_unix(self.sock)
                    h.shutdown()
                    return
                except nbd.Error:
                    pass
            time.sleep(0.1)
        raise SystemExit("setup: vbdtool serve did not start within 60 s")

    def stop_server(self):
        self.server.send_signal(signal.SIGTERM)
        try:
            rc = self.server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
            self.anomaly("server-stop", "vbdtool serve did not stop within 120 s of SIGTERM")
            return
        if rc != 0:
            self.anomaly("server-stop", f"vbdtool serve exited with {rc} on SIGTERM (it flushes, checkpoints and closes)")

    def store_generation(self):
        """The newest committed generation: the higher generation of the superblock's two slots
        (u64 at byte 12 of each 4096-byte slot; docs/FORMAT.md). Each commit, from gc, a flush
        past --checkpoint-journal-bytes, a full metadata cache or a clean stop, adds at least one."""
        data = self.read_superblock()
        if data is None:
            return 0
        generations = [int.from_bytes(data[at + 12:at + 20], "little") for at in (0, 4096) if len(data) >= at + 20]
        return max(generations, default=0)

    def read_superblock(self):
        """The superblock's first 8192 bytes: the file in the store directory, or with --store-args
        naming --rados, the first stripe of the RADOS directory's `superblock` file (docs/RADOS.md)."""
        argv = self.args.store_args.split()
        if "--rados" in argv:
            def option(name, default):
                return argv[argv.index(name) + 1] if name in argv else default
            cmd = ["rados", "-c", option("--ceph-conf", os.environ.get("CEPH_CONF", "/etc/ceph/ceph.conf")),
                   "-p", option("--rados", ""), "-N", option("--namespace", "default"), "get", "stripe.superblock.00000000", "-"]
            try:
                r = subprocess.run(cmd, capture_output=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                return None
            return r.stdout[:8192] if r.returncode == 0 else None
        try:
            with open(os.path.join(self.args.store, "superblock"), "rb") as f:
                return f.read(8192)
        except OSError:
            return None

    def images_live(self, kind=None):
        return [i for i in self.images.values() if i.deleted_at is None and (kind is None or i.kind == kind)]

    def add_image(self, name, kind, blocks, **kw):
        image = Image(self.next_iid, name, kind, blocks, **kw)
        self.next_iid += 1
        self.images[name] = image
        IMAGE_NAMES[image.iid] = name
        return image

    # -- reads ----------------------------------------------------------------------------------

    def check_read(self, image, first, data, sent, answered, conn_id):
        self.counts["reads checked"] += 1
        count = len(data) // BLOCK
        for i in range(count):
            block = first + i
            self.counts["blocks checked"] += 1
            raw = data[i * BLOCK:(i + 1) * BLOCK]
            key, problem = decode_block(raw)
            found = []
            candidates(image, block, sent, answered, found)
            if key is not None:
                matches = [c for c in found if c[0] == key]
                if matches:
                    self.note_observation(image, block, key, matches, answered)
                    continue
            self.report_read(image, block, first, count, key, problem, found, sent, answered, conn_id)

    def note_observation(self, image, block, key, matches, answered):
        if key == ZERO_KEY:
            self.counts["zero blocks read"] += 1
        # A read that returned a write not yet acknowledged proves it was applied by the time the
        # read was answered: later reads must not go back past it (linearizability).
        writes = [w for _, w, _ in matches if w is not None]
        if len(matches) == 1 and writes and writes[0].effective_ack(block) > answered:
            w = writes[0]
            if w.seen is None:
                w.seen = {}
            w.seen[block] = answered
        # A snapshot never changes: pin what was read. A share's block with no own write sent yet
        # is its snapshot's block.
        target = image
        if image.kind == "volume" and image.origin is not None and block < image.origin_blocks and not any(
                w.send < answered for w in image.history.get(block, ())):
            target = image.origin
        if target.kind == "snapshot" and block not in target.pinned:
            target.pinned[block] = key

    def classify(self, image, block, key, found):
        """Names what is wrong with a block no candidate matches, from the worst case down."""
        if key is None:
            return "corrupt"
        lineage = image.lineage()
        if key == ZERO_KEY:
            return "zeros-not-allowed"
        if key[0] == "d":
            return "duplicate-not-written-here"
        _, image_id, written_block, wid = key
        w = self.writes.get(wid)
        if w is None or w.image.iid != image_id:
            return "unknown-write"
        if image_id not in lineage:
            return "cross-volume"
        if written_block != block:
            return "wrong-offset"
        if image.kind == "snapshot" and block in image.pinned:
            return "snapshot-changed"
        if image.kind == "snapshot":
            return "snapshot-has-later-write" if w.send >= image.snap_end else "snapshot-misses-write"
        return "stale-or-wrong-version"

    def report_read(self, image, block, first, count, key, problem, found, sent, answered, conn_id):
        kind = self.classify(image, block, key, found)
        t0 = self.t0
        lines = [f"read of {image.name} ({image.kind}) blocks {first}..{first + count - 1} on connection {conn_id}, "
                 f"sent {sent - t0:.6f} answered {answered - t0:.6f}: block {block} holds "
                 + (problem if key is None else describe_key(key))]
        if key is not None and key[0] == "u":
            w = self.writes.get(key[3])
            if w is not None:
                lines.append(f"  that is {w.describe(t0, key[2])}")
        accepted = sorted({describe_key(k) + (f" via {via}" if w is None else "") for k, w, via in found})
        lines.append("  accepted would have been: " + ("; ".join(accepted) if accepted else "nothing"))
        lines.append(f"  lineage of {image.name}: " + self.describe_lineage(image))
        lines.append(f"  writes of block {block} in that lineage (send order):")
        for name, w in self.lineage_history(image, block)[-12:]:
            lines.append(f"    {w.describe(t0, block)}")
        self.anomaly(kind, "\n".join(lines))

    def describe_lineage(self, image):
        parts, t0 = [], self.t0
        while image is not None:
            if image.kind == "snapshot":
                parts.append(f"snapshot {image.name} taken between {image.snap_start - t0:.6f} and {image.snap_end - t0:.6f}"
                             + (f" (size {image.blocks} blocks)"))
                image = image.parent
            else:
                parts.append(f"volume {image.name}" + (f" (share, origin blocks {image.origin_blocks})" if image.origin else ""))
                image = image.origin
        return " <- ".join(parts)

    def lineage_history(self, image, block):
        out = []
        while image is not None:
            if image.kind == "snapshot":
                image = image.parent
                continue
            out.extend((image.name, w) for w in image.history.get(block, ()))
            image = image.origin if block < image.origin_blocks else None
        return sorted(out, key=lambda x: x[1].send)

    # -- the control thread ---------------------------------------------------------------------

    def control_loop(self):
        rng = random.Random(self.rng.random())
        ops = ["snapshot"] * 4 + ["share"] * 3 + ["rm"] * 3 + ["resize"] + ["gc"] * 2 + ["fsck"] + ["stats"]
        serial = 0
        while not self.stop_load.wait(rng.uniform(*self.args.control_pause)):
            op = rng.choice(ops)
            serial += 1
            try:
                self.control_op(op, serial, rng)
            except Exception as e:  # a checker bug must not pass for a clean run
                self.anomaly("checker-error", f"control {op}: {e!r}")

    def run_control(self, kind, *argv):
        started = now()
        r = self.vbdtool(*argv)
        ended = now()
        self.control_counts[kind] += 1
        return r, started, ended

    def control_op(self, op, serial, rng):
        with self.lock:
            volumes = self.images_live("volume")
            snapshots = self.images_live("snapshot")
        if op == "snapshot" and len(snapshots) < self.args.max_snapshots:
            v = rng.choice(volumes)
            name = f"{v.name}@s{serial}"
            with self.lock:
                blocks = v.blocks
            r, s, e = self.run_control("snapshot", "snapshot", name)
            if r.returncode != 0:
                return self.control_failed("snapshot", r)
            with self.lock:
                self.add_image(name, "snapshot", blocks, parent=v, snap_start=s, snap_end=e)
        elif op == "share" and snapshots and len(volumes) < self.args.max_volumes:
            snap = rng.choice(snapshots)
            name = f"sh{serial}"
            r, s, e = self.run_control("share", "share", snap.name, name)
            if r.returncode != 0:
                if snap.deleted_at is not None:
                    return
                return self.control_failed("share", r)
            with self.lock:
                self.add_image(name, "volume", snap.blocks, origin=snap)
        elif op in ("rm", "snapshot", "share"):
            # Delete a snapshot no live share depends on, or a share (its snapshots with it, --force).
            with self.lock:
                has_share = {i.origin.name for i in self.images_live("volume") if i.origin is not None}
                victims = [s for s in snapshots if s.name not in has_share]
                victims += [v for v in volumes if v.origin is not None]
            if not victims:
                return
            victim = rng.choice(victims)
            with self.lock:
                dependents = [s for s in self.images_live("snapshot") if s.parent is victim]
                if any(s.name in has_share for s in dependents):
                    return  # would cut a live share off its origin in the model too; keep it simple
                victim.deleted_at = now()
                for s in dependents:
                    s.deleted_at = victim.deleted_at
            argv = ["rm", victim.name] + (["--force"] if dependents else [])
            r, s, e = self.run_control("rm", *argv)
            if r.returncode != 0:
                return self.control_failed("rm", r)
        elif op == "resize":
            v = rng.choice(volumes)
            if v.blocks * BLOCK >= self.args.max_volume_bytes:
                return
            new_blocks = v.blocks + 256
            r, s, e = self.run_control("resize", "resize", v.name, "--size", str(new_blocks * BLOCK))
            if r.returncode != 0:
                return self.control_failed("resize", r)
            with self.lock:
                v.blocks = new_blocks
        elif op == "gc":
            r, s, e = self.run_control("gc (checkpoint)", "gc")
            if r.returncode != 0:
                return self.control_failed("gc", r)
        elif op == "fsck":
            argv = ["fsck"] if rng.random() < 0.5 else ["fsck", "--no-data"]
            r, s, e = self.run_control(" ".join(argv), *argv)
            if r.returncode == 2:
                self.anomaly("fsck-problems", f"`vbdtool {' '.join(argv)}` at {s - self.t0:.3f} s found problems:\n"
                             + (r.stdout + r.stderr)[-3000:])
            elif r.returncode != 0:
                return self.control_failed("fsck", r)
        elif op == "stats":
            r, s, e = self.run_control("stats", "stats")
            if r.returncode != 0:
                return self.control_failed("stats", r)

    def control_failed(self, kind, r):
        self.anomaly("control-failed", f"`vbdtool {' '.join(r.args[1:])}` exited {r.returncode}: {(r.stderr or r.stdout).strip()[-1500:]}")

    # -- the NBD load ---------------------------------------------------------------------------

    def load(self, seconds):
        slots = [Connection(self, n, random.Random(self.rng.random())) for n in range(self.args.connections)]
        control = threading.Thread(target=self.control_loop, daemon=True)
        control.start()
        deadline = now() + seconds
        poller = select.poll()
        last_progress = last_memory_check = now()
        while True:
            t = now()
            if t >= deadline:
                self.stop_load.set()
            draining = self.stop_load.is_set()
            fds = {}
            with self.lock:
                for c in slots:
                    try:
                        c.step(draining)
                        if c.handle is not None and c.in_flight:
                            fds[c.handle.aio_get_fd()] = c
                    except nbd.Error as e:   # the connection died (the server, or rm of its image)
                        c.broken(e)
                for c in slots:
                    c.run_completions()
            if draining and not fds:
                break
            if draining and t > deadline + 60 and not self.hung:
                # Requests that never come back are a failure too; stop waiting for them.
                waiting = [(c, req) for c in slots for req in c.in_flight.values()]
                self.hung = True
                self.anomaly("hang", f"{len(waiting)} requests unanswered 60 s after the load stopped, e.g. "
                             + "; ".join(f"{req[0]} on {c.image.name} (connection {c.conn_id}) sent {req[-1] - self.t0:.3f}"
                                         for c, req in waiting[:5]))
                break
            if t - last_memory_check >= 1:
                last_memory_check = t
                if self.server.poll() is not None and not self.server_died:
                    self.server_died = True
                    self.anomaly("server-died", f"vbdtool serve exited with {self.server.returncode} during the load "
                                 f"(negative: killed by that signal); see serve.log")
                    self.stop_load.set()
                if rss_bytes() > self.args.max_checker_memory and not self.stop_load.is_set():
                    # Never let a checker bug take the machine's memory from everyone else.
                    self.anomaly("checker-memory", f"the checker uses {rss_bytes() >> 20} MiB; stopping the load")
                    self.stop_load.set()
            if self.args.progress and t - last_progress >= self.args.progress:
                last_progress = t
                print(f"  {t - self.t0:6.1f} s: {self.counts['reads checked']} reads, {self.counts['blocks checked']} blocks checked, "
                      f"{self.counts['writes']} writes, {sum(self.control_counts.values())} control ops, "
                      f"{sum(self.anomaly_count.values())} anomalies", flush=True)
            for fd, c in list(fds.items()):
                try:
                    d = c.handle.aio_get_direction()
                except nbd.Error as e:
                    with self.lock:
                        c.broken(e)
                    del fds[fd]
                    continue
                poller.register(fd, (select.POLLIN if d & 1 else 0) | (select.POLLOUT if d & 2 else 0))
            events = poller.poll(50)
            for fd in fds:
                poller.unregister(fd)
            with self.lock:
                for fd, ev in events:
                    c = fds[fd]
                    try:
                        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                            c.handle.aio_notify_read()
                        elif ev & select.POLLOUT:
                            c.handle.aio_notify_write()
                    except nbd.Error as e:
                        c.broken(e)
                    c.run_completions()
        if self.hung:
            # A hung server would also hold the control thread's CLI call and the disconnects.
            self.server.kill()
            self.server.wait()
        control.join()
        for c in slots:
            c.close()

    def check_snapshot_cuts(self):
        """A snapshot is one point in time across blocks, not a per-block choice: if it holds a write
        H of block b, it holds every write X (of any block a) acknowledged before H was sent, or
        something newer at a. Checked over the blocks read from each snapshot (all of them for
        the snapshots the sweeps read); blocks whose contents name no single write of the
        volume (duplicates, zeros) only ever count in the snapshot's favour."""
        for snap in [i for i in self.images.values() if i.kind == "snapshot"]:
            parent = snap.parent
            newest_in = None          # (send time, write, block): the latest-sent write known to be in it
            held = {}                 # block -> latest acknowledgement among the writes it may hold
            for block, key in snap.pinned.items():
                matches = [w for w in parent.history.get(block, ()) if w.key(block) == key and w.send < snap.snap_end]
                held[block] = max((w.effective_ack(block) for w in matches), default=-INF)
                if len(matches) == 1 and key[0] == "u":
                    w = matches[0]
                    if newest_in is None or w.send > newest_in[0]:
                        newest_in = (w.send, w, block)
            if newest_in is None:
                continue
            limit, witness, witness_block = newest_in
            for block, latest in held.items():
                for x in parent.history.get(block, ()):
                    if x.ack < limit and x.send > latest:
                        t0 = self.t0
                        self.anomaly("snapshot-not-a-cut",
                                     f"{snap.name} (taken between {snap.snap_start - t0:.6f} and {snap.snap_end - t0:.6f}) holds "
                                     f"{witness.describe(t0, witness_block)} at block {witness_block}, but at block {block} it holds "
                                     f"{describe_key(snap.pinned[block])}, older than {x.describe(t0, block)}, which was "
                                     f"acknowledged before the write it holds at block {witness_block} was sent")
                        break
            self.counts["snapshots checked as cuts"] += 1

    def fill(self):
        """Writes every block of every volume once, so that reads find stored chunks, not holes."""
        for image in self.images_live("volume"):
            h = nbd.NBD()
            h.set_export_name(image.name)
            h.connect_unix(self.sock)
            step = 256
            for first in range(0, image.blocks, step):
                w = Write(self.next_wid, image, first, min(step, image.blocks - first), "write", 0, first // step % 2, now())
                self.next_wid += 1
                self.writes[w.wid] = w
                for b in range(first, first + w.count):
                    image.history[b].append(w)
                h.pwrite(w.data(), first * BLOCK)
                w.ack = now()
                self.counts["writes"] += 1
                self.counts["write blocks"] += w.count
                self.counts["unique blocks"] += w.count
                self.counts["compressible blocks"] += w.count * w.compressible
            h.shutdown()

    def sweep(self, label):
        """Reads every block of every live image with nothing else in flight."""
        with self.lock:
            images = self.images_live()
        for image in images:
            h = nbd.NBD()
            h.set_export_name(image.name)
            try:
                h.connect_unix(self.sock)
            except nbd.Error as e:
                self.anomaly("sweep-connect", f"{label}: cannot open {image.name}: {e}")
                continue
            size_blocks = h.get_size() // BLOCK
            if size_blocks != image.blocks:
                self.anomaly("size", f"{label}: {image.name} has {size_blocks} blocks, the model {image.blocks}")
            step = 64
            for first in range(0, size_blocks, step):
                n = min(step, size_blocks - first)
                sent = now()
                try:
                    data = h.pread(n * BLOCK, first * BLOCK)
                except nbd.Error as e:
                    self.anomaly("request-failed", f"{label}: read of {image.name} blocks {first}..{first + n - 1} failed: {e}")
                    continue
                with self.lock:
                    self.check_read(image, first, data, sent, now(), f"{label}")
            self.counts[f"images swept ({label})"] += 1
            h.shutdown()

    # -- the run ----------------------------------------------------------------------------------

    def run(self):
        a = self.args
        for n in range(a.volumes):
            name = f"v{n}"
            # One named sharing group: duplicate writes deduplicate across the volumes, so a chunk
            # one volume frees can be reused by another (the race of issue 12).
            r = self.vbdtool("create", name, "--size", str(a.volume_bytes), "--group", "pool")
            if r.returncode != 0:
                raise SystemExit(f"setup: vbdtool create {name}: {r.stderr.strip()}")
            self.add_image(name, "volume", a.volume_bytes // BLOCK)
        self.first_generation = self.store_generation()
        self.start_server()
        started = now()
        self.fill()
        print(f"concurrency checker: {a.connections} connections x {a.queue_depth} in flight, {a.volumes} volumes of "
              f"{a.volume_bytes >> 20} MiB, {a.duration:g} s of load, seed {a.seed}", flush=True)
        self.load(a.duration)
        load_seconds = now() - started
        # After a crash only flushed writes would have to survive; the sweeps assume a clean stop.
        if sum(self.anomaly_count.values()) < a.max_anomalies and not self.hung and not self.server_died:
            self.sweep("final read")
            self.check_snapshot_cuts()
            self.stop_server()
            self.start_server()
            self.sweep("after restart")
            r = self.vbdtool("fsck")
            self.control_counts["fsck"] += 1
            if r.returncode != 0:
                self.anomaly("fsck-problems", "final `vbdtool fsck` exited %d:\n%s" % (r.returncode, (r.stdout + r.stderr)[-3000:]))
        if not self.hung and not self.server_died:
            self.stop_server()
        self.summary(load_seconds, now() - started)
        return 1 if self.anomaly_count else 0

    def summary(self, load_seconds, total_seconds):
        c = self.counts
        print()
        print(f"load {load_seconds:.1f} s, total {total_seconds:.1f} s")
        print(f"reads checked      {c['reads checked']}")
        print(f"blocks checked     {c['blocks checked']} ({c['zero blocks read']} zero)")
        print(f"writes             {c['writes']} ({c['write blocks']} blocks: {c['unique blocks']} unique, {c['dup blocks']} duplicate, "
              f"{c['compressible blocks']} compressible)")
        print(f"trims              {c['trims']}; write-zeroes {c['zeroes']}; flushes {c['flushes']}; FUA writes {c['fua writes']}")
        print(f"connections        {c['connections opened']} opened; {c['expected errors']} requests failed on deleted images (allowed)")
        ctl = ", ".join(f"{k} {v}" for k, v in sorted(self.control_counts.items()))
        print(f"control operations {sum(self.control_counts.values())} ({ctl})")
        print(f"checker memory     {rss_bytes() >> 20} MiB RSS, {self.buffers.created_bytes >> 20} MiB of request buffers")
        print(f"checkpoints        {self.store_generation() - self.first_generation} (store generation {self.first_generation} -> {self.store_generation()})")
        print(f"images             {sum(1 for i in self.images.values() if i.kind == 'volume')} volumes/shares, "
              f"{sum(1 for i in self.images.values() if i.kind == 'snapshot')} snapshots, "
              f"{sum(1 for i in self.images.values() if i.deleted_at is not None)} deleted")
        for k, v in sorted(c.items()):
            if k.startswith("images swept") or k == "snapshots checked as cuts":
                print(f"{k:18} {v}")
        total = sum(self.anomaly_count.values())
        kinds = ", ".join(f"{k} {v}" for k, v in self.anomaly_count.most_common())
        print(f"anomalies          {total}" + (f" ({kinds})" if kinds else ""))
        if total > len(self.anomalies):
            print(f"                   (the first {self.args.max_reports} of each kind are printed above)")
        if self.anomalies:
            # Again at the very end, for runners that show only the tail of the output.
            print("first anomaly:\n" + "\n".join(self.anomalies[0].split("\n")[:20]))


class BufferPool:
    """Request buffers, reused. libnbd 1.14's Python bindings never free a buffer handed to
    aio_pread/aio_pwrite (measured: 1 MiB of RSS per 1 MiB request), so a fresh buffer per request
    grows the checker by every byte it reads; reusing a few buffers per size keeps it flat."""

    def __init__(self):
        self.free = collections.defaultdict(list)
        self.created_bytes = 0

    def get(self, size):
        spare = self.free[size]
        if spare:
            return spare.pop()
        data = bytearray(size)
        self.created_bytes += size
        return nbd.Buffer.from_buffer(data), data

    def put(self, pair):
        self.free[len(pair[1])].append(pair)


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Connection:
    """One NBD connection slot: reconnects every few seconds to a random live image, keeping up to
    queue_depth requests in flight."""

    def __init__(self, checker, number, rng):
        self.c, self.number, self.rng = checker, number, rng
        self.handle, self.image = None, None
        self.in_flight = {}      # id -> request tuple
        self.done = []
        self.next_id = 0
        self.reconnect_at = 0
        self.draining = False
        self.conn_id = None
        self.scanner = False

    def step(self, stopping):
        c = self.c
        if self.handle is not None and (stopping or self.draining or now() >= self.reconnect_at
                                        or self.image.deleted_at is not None):
            self.draining = True
            if not self.in_flight:
                self.close()
        if self.handle is None:
            if stopping:
                return
            self.connect()
            if self.handle is None:
                return
        depth = 2 if self.scanner else c.args.queue_depth
        while not self.draining and len(self.in_flight) < depth:
            self.submit()

    def connect(self):
        c = self.c
        live = c.images_live()
        weights = [3 if i.kind == "volume" else 1 for i in live]
        image = self.rng.choices(live, weights)[0]
        h = nbd.NBD()
        h.set_export_name(image.name)
        try:
            h.connect_unix(c.sock)
        except nbd.Error as e:
            if image.deleted_at is None:
                c.anomaly("request-failed", f"connect to live image {image.name} failed: {e}")
            return
        self.handle, self.image, self.draining = h, image, False
        c.counts["connections opened"] += 1
        self.conn_id = f"{self.number}.{c.counts['connections opened']}"
        self.size_blocks = h.get_size() // BLOCK
        self.reconnect_at = now() + self.rng.uniform(*c.args.connection_life)
        # A few connections only scan, with a queue depth of 2 (their reads are long).
        self.scanner = self.number < self.c.args.scanners
        self.hot = self.rng.randrange(max(1, self.size_blocks - 512)) if self.size_blocks > 512 else 0

    def close(self):
        if self.handle is not None:
            try:
                self.handle.shutdown()
            except nbd.Error:
                pass
            self.handle.close() if hasattr(self.handle, "close") else None
        self.handle = None

    def broken(self, e):
        if self.image.deleted_at is None:
            self.c.anomaly("request-failed", f"connection {self.conn_id} to {self.image.name} broke: {e}")
        for rid in list(self.in_flight):
            self.in_flight.pop(rid)
        self.handle = None

    def pick_range(self, max_blocks):
        n = self.rng.choice(max_blocks)
        # Half the requests go to a hot 2 MiB window so that reads and writes really collide.
        if self.rng.random() < 0.5:
            first = self.hot + self.rng.randrange(512)
        else:
            first = self.rng.randrange(self.size_blocks)
        # Sizes stay within the fixed set (shifted back from the end rather than cut short), so
        # that the buffer pool has few sizes to keep.
        n = min(n, self.size_blocks)
        return min(first, self.size_blocks - n), n

    def submit(self):
        c, h, rng = self.c, self.handle, self.rng
        rid = self.next_id
        self.next_id += 1
        r = rng.random()
        if self.scanner:
            # Like the reader in issue 12: long reads of one stretch while others rewrite it.
            n = min(self.rng.choice([512, 1024, 2048]), self.size_blocks)
            first = self.rng.randrange(self.size_blocks - n + 1)
            self.submit_read(rid, first, n)
            return
        if not self.image.writable or r < 0.40:
            # Mostly small reads, some of up to 8 MiB: a long read holds many chunk numbers
            # looked up at once, the window in which a reused number shows up (issue 12).
            first, n = self.pick_range([1, 1, 1, 2, 4, 8, 16, 32, 64, 256, 1024, 2048])
            self.submit_read(rid, first, n)
            return
        if r < 0.44:
            self.in_flight[rid] = ("flush", now())
            h.aio_flush(lambda err, rid=rid: self.complete(rid, err))
            c.counts["flushes"] += 1
            return
        op = "write"
        if r < 0.48:
            op = "trim"
        elif r < 0.52:
            op = "zero"
        elif r < 0.66:
            op = "dup"
        first, n = self.pick_range([1, 1, 1, 1, 2, 3, 4, 8] if op in ("write", "dup") else [1, 2, 4, 16])
        w = Write(c.next_wid, self.image, first, n, op, rng.randrange(DUP_CLASSES), int(rng.random() < 0.3), 0)
        c.next_wid += 1
        c.writes[w.wid] = w
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0
        if op in ("write", "dup"):
            pair = c.buffers.get(n * BLOCK)
            pair[1][:] = w.data()
        for b in range(first, first + n):
            self.image.history[b].append(w)
        self.in_flight[rid] = ("write", w, pair if op in ("write", "dup") else None, now())
        w.send = now()
        if op in ("write", "dup"):
            h.aio_pwrite(pair[0], first * BLOCK, lambda err, rid=rid: self.complete(rid, err), flags)
            c.counts["writes"] += 1
            c.counts["write blocks"] += n
            c.counts["dup blocks" if op == "dup" else "unique blocks"] += n
            c.counts["compressible blocks"] += n * w.compressible
            c.counts["fua writes"] += bool(flags)
        elif op == "trim":
            h.aio_trim(n * BLOCK, first * BLOCK, lambda err, rid=rid: self.complete(rid, err), flags)
            c.counts["trims"] += 1
        else:
            zflags = flags | (nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
            h.aio_zero(n * BLOCK, first * BLOCK, lambda err, rid=rid: self.complete(rid, err), zflags)
            c.counts["zeroes"] += 1

    def submit_read(self, rid, first, n):
        pair = self.c.buffers.get(n * BLOCK)
        sent = now()
        self.in_flight[rid] = ("read", first, n, pair, sent)
        self.handle.aio_pread(pair[0], first * BLOCK, lambda err, rid=rid: self.complete(rid, err))

    def complete(self, rid, err):
        # Called by libnbd inside aio_notify_*: take the time now, check after the call returns.
        self.done.append((rid, err.value, now()))
        return 1

    def run_completions(self):
        c = self.c
        done, self.done = self.done, []
        for rid, error, answered in done:
            req = self.in_flight.pop(rid, None)
            if req is None:
                continue
            deleted = self.image.deleted_at
            if req[0] in ("read", "write") and req[-2] is not None:
                buffer = req[-2]
            else:
                buffer = None
            if error:
                # A request may fail once `rm` of its image has started; any other failure is an anomaly.
                if deleted is not None and answered >= deleted:
                    c.counts["expected errors"] += 1
                else:
                    c.anomaly("request-failed", f"{req[0]} on {self.image.name} (connection {self.conn_id}) failed: "
                              f"{os.strerror(error)} ({error})")
                if req[0] == "write":
                    req[1].failed = os.strerror(error)
            elif req[0] == "read":
                _, first, n, pair, sent = req
                c.check_read(self.image, first, bytes(pair[1]), sent, answered, self.conn_id)
            elif req[0] == "write":
                req[1].ack = answered
            if buffer is not None:
                c.buffers.put(buffer)


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def self_test():
    """The model against hand-made histories: accepted answers pass, each kind of wrong answer is
    named. Runs before every load so that a checker that cannot fail does not pass for a clean run."""
    args = argparse.Namespace(max_reports=0, max_anomalies=1 << 30, seed=0, workdir="/nonexistent")
    c = Checker(args)
    v = c.add_image("v", "volume", 64)
    w = c.add_image("w", "volume", 64)
    t0 = c.t0

    def write(image, block, op, send, ack, count=1, dup_class=0):
        x = Write(c.next_wid, image, block, count, op, dup_class, 0, t0 + send)
        x.ack = t0 + ack
        c.next_wid += 1
        c.writes[x.wid] = x
        for b in range(block, block + count):
            image.history[b].append(x)
        return x

    def verdict(image, block, data, sent, answered):
        before = collections.Counter(c.anomaly_count)
        c.check_read(image, block, data, t0 + sent, t0 + answered, "self-test")
        new = c.anomaly_count - before
        return next(iter(new), "ok")

    zero = ZERO_BLOCK
    w1 = write(v, 5, "write", 1, 2)
    w2 = write(v, 5, "write", 5, 6)
    ww = write(w, 5, "write", 1, 2)
    wo = write(v, 6, "write", 1, 2)
    cases = [
        ("never written reads zeros", verdict(v, 9, zero, 0, 1), "ok"),
        ("before any ack: zeros allowed", verdict(v, 5, zero, 0.5, 1.5), "ok"),
        ("in flight: old or new", verdict(v, 5, w1.data(), 1.5, 3), "ok"),
        ("after ack: zeros not allowed", verdict(v, 5, zero, 3, 4), "zeros-not-allowed"),
        ("another volume's block", verdict(v, 5, ww.data(), 3, 4), "cross-volume"),
        ("another block of this volume", verdict(v, 5, wo.data(), 3, 4), "wrong-offset"),
        ("overlapping the newer write: either", verdict(v, 5, w1.data(), 5.5, 7), "ok"),
        ("after the newer write's ack: stale", verdict(v, 5, w1.data(), 7, 8), "stale-or-wrong-version"),
        ("torn block", verdict(v, 5, w2.data()[:2048] + w1.data()[2048:], 7, 8), "corrupt"),
        ("garbage", verdict(v, 5, b"\1" * BLOCK, 7, 8), "corrupt"),
        ("duplicate never written here", verdict(v, 5, dup_block(3), 7, 8), "duplicate-not-written-here"),
    ]
    # A snapshot taken between 5.5 and 5.8 while w2 (5..6) was in flight may hold w1 or w2,
    # never zeros, and once read it never changes.
    s = c.add_image("v@s", "snapshot", 64, parent=v, snap_start=t0 + 5.5, snap_end=t0 + 5.8)
    write(v, 5, "write", 7, 8)
    cases += [
        ("snapshot: a write acked before it is required", verdict(s, 5, zero, 9, 10), "zeros-not-allowed"),
        ("snapshot: a write sent after it is excluded", verdict(s, 5, v.history[5][-1].data(), 9, 10), "snapshot-has-later-write"),
        ("snapshot: the write in flight may be there", verdict(s, 5, w2.data(), 9, 10), "ok"),
        ("snapshot: and then stays", verdict(s, 5, w1.data(), 11, 12), "snapshot-changed"),
    ]
    share = c.add_image("sh", "volume", 64, origin=s)
    cases += [
        ("share: its snapshot's block", verdict(share, 5, w2.data(), 13, 14), "ok"),
        ("share: its origin's later write is not its own", verdict(share, 5, v.history[5][-1].data(), 13, 14), "stale-or-wrong-version"),
    ]
    # Linearizability: once a read has returned a write in flight, a later read may not go back.
    x = write(w, 7, "write", 20, 30)
    cases += [
        ("read sees an unacknowledged write", verdict(w, 7, x.data(), 21, 22), "ok"),
        ("a later read may not return the older zeros", verdict(w, 7, zero, 23, 24), "zeros-not-allowed"),
    ]
    # A snapshot is one cut: holding a write sent after another was acknowledged, it must hold that
    # other one too (each alone would be allowed: both completed while the snapshot was taken).
    u = c.add_image("u", "volume", 64)
    a1 = write(u, 1, "write", 40, 41)
    b1 = write(u, 2, "write", 42, 43)
    cut = c.add_image("u@cut", "snapshot", 64, parent=u, snap_start=t0 + 39, snap_end=t0 + 44)
    cases += [("cut: block 2 holds the later write", verdict(cut, 2, b1.data(), 45, 46), "ok"),
              ("cut: block 1 alone may be old", verdict(cut, 1, zero, 45, 46), "ok")]
    before = collections.Counter(c.anomaly_count)
    c.check_snapshot_cuts()
    cases.append(("cut: but not both", next(iter(c.anomaly_count - before), "ok"), "snapshot-not-a-cut"))
    failed = [(name, got, want) for name, got, want in cases if got != want]
    for name, got, want in failed:
        print(f"self-test FAILED: {name}: got {got}, expected {want}")
    return not failed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vbdtool", required=True)
    p.add_argument("--store", required=True, help="an initialized, empty store (with --store-args naming --rados: this host's directory)")
    p.add_argument("--store-args", default="", help="store location options for every vbdtool command, e.g. '--rados vbd --ceph-conf F --namespace NS'")
    p.add_argument("--workdir", required=True, help="for the sockets and the server log")
    p.add_argument("--duration", type=float, default=40, help="seconds of concurrent load")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--volumes", type=int, default=3)
    p.add_argument("--volume-size", dest="volume_bytes", type=parse_size, default=parse_size("8M"))
    p.add_argument("--max-volume-size", dest="max_volume_bytes", type=parse_size, default=parse_size("12M"))
    p.add_argument("--max-volumes", type=int, default=6, help="live volumes and shares at most")
    p.add_argument("--max-snapshots", type=int, default=6)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--scanners", type=int, default=2, help="connections doing only long reads")
    p.add_argument("--queue-depth", type=int, default=8, help="requests in flight per connection")
    p.add_argument("--connection-life", type=float, nargs=2, default=(2.0, 8.0), metavar=("MIN", "MAX"))
    p.add_argument("--control-pause", type=float, nargs=2, default=(0.1, 0.6), metavar=("MIN", "MAX"))
    p.add_argument("--cache-size", default="64M", help="server cache size")
    p.add_argument("--checkpoint-journal-bytes", default=None, help="passed to serve if given")
    p.add_argument("--serve-args", default="", help="more options for vbdtool serve, e.g. '--last-chance-size 0'")
    p.add_argument("--max-checker-memory", type=parse_size, default=parse_size("2G"),
                   help="stop the load if the checker's own RSS passes this")
    p.add_argument("--max-anomalies", type=int, default=1000, help="stop the load after this many")
    p.add_argument("--max-reports", type=int, default=3, help="print this many anomalies of each kind in full")
    p.add_argument("--progress", type=float, default=10, help="print a progress line every N seconds (0: never)")
    args = p.parse_args()
    if not self_test():
        sys.exit(2)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    checker = Checker(args)

    # The whole run is bounded: if the server stops answering a synchronous call (a sweep, a
    # connect), a timer thread reports it and ends the process instead of hanging the suite.
    limit = args.duration * 1.5 + 300

    def watchdog():
        checker.anomaly("hang", f"the run took longer than {limit:.0f} s; stopping")
        if checker.server is not None:
            checker.server.kill()
        checker.summary(now() - checker.t0, now() - checker.t0)
        sys.stdout.flush()
        os._exit(1)
    timer = threading.Timer(limit, watchdog)
    timer.daemon = True
    timer.start()
    try:
        rc = checker.run()
    finally:
        if checker.server is not None and checker.server.poll() is None:
            checker.server.kill()
    sys.exit(rc)


if __name__ == "__main__":
    main()
