#!/usr/bin/env bash
# nbdsh: every command and flag, the error cases, 16 concurrent clients, multi-conn flush visibility,
# a vanishing client and a hostile handshake, then a snapshot: read-only (EPERM) and point-in-time.
source "$(dirname "$0")/nbd-functions.sh"
requires nbdsh nbdinfo python3
requires_vbdtool_serve
make_store 64M
start_server

URI=$(uri vol) SOCK="$SOCK" timeout 300 nbdsh -c '
import errno, os, socket, struct, nbd
MiB = 1 << 20
uri = os.environ["URI"]
def connect():
    h = nbd.NBD(); h.add_meta_context("base:allocation"); h.add_meta_context("x-vbd:sharing"); h.connect_uri(uri); return h
def expect(err, fn, *args):
    try: fn(*args)
    except nbd.Error as e:
        assert e.errnum == err, (fn.__name__, e.errnum, e.string); return
    raise AssertionError(fn.__name__ + " succeeded")
h = connect()
for f in ("can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache"):
    assert getattr(h, f)(), f
data = bytes(range(256)) * 256
h.pwrite(data, MiB, nbd.CMD_FLAG_FUA); assert h.pread(len(data), MiB) == data
h.flush(); h.cache(65536, MiB)
h.trim(65536, MiB); assert h.pread(65536, MiB) == b"\0" * 65536
h.pwrite(b"\1" * 65536, 2 * MiB); h.zero(65536, 2 * MiB, nbd.CMD_FLAG_NO_HOLE); assert h.pread(65536, 2 * MiB) == b"\0" * 65536
got = {}
h.block_status(65536, 3 * MiB, lambda ctx, off, e, err: got.__setitem__(ctx, list(e)) or 0)
assert got["base:allocation"][1] & 1, got
h.block_status(65536, 3 * MiB, lambda ctx, off, e, err: got.__setitem__(ctx, list(e)) or 0, nbd.CMD_FLAG_REQ_ONE)
chunks = []
h.pread_structured(65536, 3 * MiB, lambda b, o, s, e: chunks.append(s) or 0)
assert nbd.READ_HOLE in chunks, chunks
# Exact chunks: one written block between unwritten ones is data, the rest holes, for a read the
# cache answers (64 KiB, on the event loop) and one that goes to an I/O thread (2 MiB).
for base, length in ((20 * MiB, 65536), (24 * MiB, 2 * MiB)):
    payload = bytes(range(256)) * 16
    h.pwrite(payload, base + 8192)
    parts = []
    h.pread_structured(length, base, lambda b, o, s, e: parts.append((o - base, s, bytes(b) if s == nbd.READ_DATA else len(b))) or 0)
    parts.sort()
    assert parts == [(0, nbd.READ_HOLE, 8192), (8192, nbd.READ_DATA, payload),
                     (12288, nbd.READ_HOLE, length - 12288)], [(o, s, len(b) if isinstance(b, bytes) else b) for o, s, b in parts]
    df = []
    h.pread_structured(length, base, lambda b, o, s, e: df.append((o - base, s, bytes(b))) or 0, nbd.CMD_FLAG_DF)
    assert len(df) == 1 and df[0][:2] == (0, nbd.READ_DATA), df
    assert df[0][2] == bytes(8192) + payload + bytes(length - 12288)
h.set_strict_mode(0)
size = h.get_size()
expect(errno.EINVAL, h.pread, 4096, size)
expect(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
assert h.pread(512, MiB) == b"\0" * 512
# 16 concurrent clients on distinct ranges, interleaved on one thread through the async API.
clients = [connect() for _ in range(16)]
for i, c in enumerate(clients):
    c.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536), 8 * MiB + i * 65536)
for c in clients:
    while c.aio_in_flight() > 0: c.poll(-1)
# Multi-conn: a flush on another connection covers those writes; everyone sees them.
h.flush()
for i, c in enumerate(clients):
    assert h.pread(65536, 8 * MiB + i * 65536) == bytes([i + 1]) * 65536
# A client vanishing mid-request, and a hostile handshake.
s = socket.socket(socket.AF_UNIX); s.connect(os.environ["SOCK"]); s.recv(18)
s.sendall(struct.pack(">I", 3) + b"IHAVEOPT" + struct.pack(">II", 1, 3) + b"vol"); s.recv(10)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 1, 1, 0, 65536) + b"x" * 100); s.close()
s = socket.socket(socket.AF_UNIX); s.connect(os.environ["SOCK"]); s.recv(18)
s.sendall(struct.pack(">I", 1) + b"IHAVEOPT" + struct.pack(">II", 7, 0xFFFFFFFF)); assert s.recv(1) == b""; s.close()
assert connect().pread(65536, 8 * MiB) == b"\1" * 65536  # the server still serves
h.shutdown()
' || fail "nbdsh script"

# A snapshot taken through the running server: read-only (EPERM), and it keeps the contents of
# the moment it was taken while the volume moves on.
"$VBDTOOL" snapshot vol@snap --store "$STORE" >/dev/null || fail "vbdtool snapshot vol@snap"
URI=$(uri vol) URI_SNAP=$(uri vol@snap) timeout 60 nbdsh -c '
import errno, os, nbd
MiB = 1 << 20
v = nbd.NBD(); v.connect_uri(os.environ["URI"])
v.pwrite(b"\x99" * 65536, 8 * MiB); v.flush()
h = nbd.NBD(); h.connect_uri(os.environ["URI_SNAP"])
assert h.is_read_only()
for i in range(16):
    assert h.pread(65536, 8 * MiB + i * 65536) == bytes([i + 1]) * 65536, i
assert v.pread(65536, 8 * MiB) == b"\x99" * 65536
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0); raise AssertionError("snapshot accepted a write")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e.string
' || fail "snapshot"
echo PASS
