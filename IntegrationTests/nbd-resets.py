#!/usr/bin/env python3
"""Resets and hang-ups at every point of an NBD session, against a live server.

Usage: nbd-resets.py HOST PORT EXPORT [--rounds N] [--flood CONNECTIONS] [--clients N]

Each scenario is a raw-socket client that speaks the protocol up to one point and then either
resets the connection (SO_LINGER 0, so the kernel sends RST and discards unsent data) or just
closes it. The points cover the handshake (before the greeting is read, mid flags, after each
option, mid option payload, GO followed by a pipelined option) and transmission (after each
command, mid request header, mid WRITE payload, during a large READ reply, with many requests
pipelined). The flood then runs CONNECTIONS sessions that send GO plus one more option and reset,
from --clients threads at once (the interleaving that used to crash the server).

It checks only what a client can see: that every connection is accepted and answered up to its
reset point. Whether the server survived, and its memory, is checked by the calling script.
Exits non-zero if a scenario could not even connect, or a reply it read was malformed.
"""
import socket
import struct
import sys
import threading

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK = 1

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 5, 6, 7


class Malformed(Exception):
    pass


def option(code, payload=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(payload)) + payload


def go_payload(name):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", 0)


def meta_payload(name, queries):
    n = name.encode()
    body = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        body += struct.pack(">I", len(q)) + q.encode()
    return body


def request(command, handle, offset, length, flags=0):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, handle, offset, length)


def recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise Malformed(f"server closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def connect(host, port):
    return socket.create_connection((host, port), timeout=30)


def hang_up(s, reset):
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def read_greeting(s):
    greeting = recv_exactly(s, 18)
    if greeting[:8] != NBD_MAGIC or struct.unpack(">Q", greeting[8:16])[0] != IHAVEOPT:
        raise Malformed(f"bad greeting {greeting!r}")


def read_option_replies(s, code):
    """Reads option replies for `code` until the ACK (or an error reply); returns their types."""
    types = []
    while True:
        magic, opt, rtype, length = struct.unpack(">QIII", recv_exactly(s, 20))
        if magic != OPT_REPLY_MAGIC or opt != code:
            raise Malformed(f"bad option reply magic 0x{magic:x} option {opt} (expected {code})")
        recv_exactly(s, length)
        types.append(rtype)
        if rtype == REP_ACK or rtype & 0x80000000:
            return types


def negotiate(s, export, structured=True):
    """Greeting, flags, structured replies, base:allocation, GO: ready for transmission."""
    read_greeting(s)
    s.sendall(struct.pack(">I", 3))
    if structured:
        s.sendall(option(OPT_STRUCTURED_REPLY))
        read_option_replies(s, OPT_STRUCTURED_REPLY)
        s.sendall(option(OPT_SET_META_CONTEXT, meta_payload(export, ["base:allocation"])))
        read_option_replies(s, OPT_SET_META_CONTEXT)
    s.sendall(option(OPT_GO, go_payload(export)))
    types = read_option_replies(s, OPT_GO)
    if types[-1] != REP_ACK:
        raise Malformed(f"GO refused: {types}")


def read_reply(s, structured):
    """Reads one whole reply (all chunks of a structured one); returns its error number."""
    if not structured:
        magic, error, _handle = struct.unpack(">IIQ", recv_exactly(s, 16))
        if magic != SIMPLE_REPLY_MAGIC:
            raise Malformed(f"bad simple reply magic 0x{magic:x}")
        return error
    error = 0
    while True:
        magic, flags, rtype, _handle, length = struct.unpack(">IHHQI", recv_exactly(s, 20))
        if magic != STRUCTURED_REPLY_MAGIC:
            raise Malformed(f"bad structured reply magic 0x{magic:x}")
        body = recv_exactly(s, length)
        if rtype & 0x8000:
            error = struct.unpack(">I", body[:4])[0]
        if flags & 1:
            return error


# --- scenarios: each takes (host, port, export, reset) and returns normally or raises Malformed.

def handshake_points(export):
    points = {
        "before-greeting": lambda s: None,
        "after-greeting": lambda s: read_greeting(s),
        "mid-flags": lambda s: (read_greeting(s), s.sendall(b"\x00\x00")),
        "after-flags": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3))),
        "mid-option-header": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_GO, go_payload(export))[:10])),
        "mid-option-payload": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_GO, go_payload(export))[:20])),
        "go-plus-list": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_GO, go_payload(export))), s.sendall(option(OPT_LIST))),
        "go-plus-go": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_GO, go_payload(export)) + option(OPT_GO, go_payload(export)))),
        "export-name-plus-request": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_EXPORT_NAME, export.encode()) + request(CMD_READ, 1, 0, 4096))),
        "go-then-reply-read": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_GO, go_payload(export))), read_option_replies(s, OPT_GO)),
        "go-unknown-export": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_GO, go_payload("no-such-export")) + option(OPT_LIST))),
        "abort-plus-option": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_ABORT) + option(OPT_LIST))),
        "starttls-plus-option": lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(OPT_STARTTLS) + option(OPT_LIST))),
    }
    for code, payload in [(OPT_LIST, b""), (OPT_STRUCTURED_REPLY, b""), (OPT_INFO, go_payload(export)),
                          (OPT_LIST_META_CONTEXT, meta_payload(export, [])),
                          (OPT_SET_META_CONTEXT, meta_payload(export, ["base:allocation"])), (4242, b"xyz")]:
        points[f"after-option-{code}"] = (lambda c, p: lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(c, p))))(code, payload)
        points[f"after-option-{code}-reply"] = (lambda c, p: lambda s: (read_greeting(s), s.sendall(struct.pack(">I", 3) + option(c, p)), read_option_replies(s, c)))(code, payload)
    return points


def transmission_points(size):
    block = 4096
    last = size - block
    commands = {
        "read": request(CMD_READ, 1, 0, block),
        "write": request(CMD_WRITE, 2, block, block) + bytes([0x5A]) * block,
        "flush": request(CMD_FLUSH, 3, 0, 0),
        "trim": request(CMD_TRIM, 4, 2 * block, block),
        "write-zeroes": request(CMD_WRITE_ZEROES, 5, 3 * block, block),
        "block-status": request(CMD_BLOCK_STATUS, 6, 0, 1 << 20),
        "cache": request(CMD_CACHE, 7, 0, block),
        "disc": request(CMD_DISC, 8, 0, 0),
        "out-of-range": request(CMD_READ, 9, last + block, block),
        "bad-magic": b"\xde\xad\xbe\xef" + bytes(24),
    }
    points = {}
    for name, wire in commands.items():
        points[f"after-{name}"] = (lambda w: lambda s, st: s.sendall(w))(wire)
        if name not in ("disc", "bad-magic"):
            points[f"after-{name}-reply"] = (lambda w: lambda s, st: (s.sendall(w), read_reply(s, st)))(wire)
    points["mid-request-header"] = lambda s, st: s.sendall(request(CMD_READ, 10, 0, block)[:13])
    points["mid-write-payload"] = lambda s, st: s.sendall(request(CMD_WRITE, 11, 0, 1 << 20) + bytes([0x33]) * (300 << 10))
    # A 4 MiB read: the reset lands while the server still writes the reply.
    points["during-large-read-reply"] = lambda s, st: (s.sendall(request(CMD_READ, 12, 0, 4 << 20)), recv_exactly(s, 100))
    points["pipelined-then-reset"] = lambda s, st: s.sendall(b"".join(
        request(CMD_WRITE, 100 + i, (i % 64) * block, block) + bytes([i % 251]) * block if i % 2 else request(CMD_READ, 100 + i, (i % 64) * block, block)
        for i in range(64)))
    return points


def run_point(host, port, name, body, reset):
    s = connect(host, port)
    try:
        body(s)
    except (ConnectionResetError, BrokenPipeError):
        pass  # the server may legitimately close first (bad magic, ABORT, EXPORT_NAME failure)
    except Malformed as e:
        if not name.startswith(("go-unknown", "abort", "starttls", "export-name")):
            raise Malformed(f"{name}: {e}")
    finally:
        hang_up(s, reset)


def main():
    args = sys.argv[1:]
    host, port, export = args[0], int(args[1]), args[2]
    rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 3
    flood = int(args[args.index("--flood") + 1]) if "--flood" in args else 10000
    clients = int(args[args.index("--clients") + 1]) if "--clients" in args else 8
    size = int(args[args.index("--size") + 1]) if "--size" in args else 64 << 20

    sessions = 0
    for _ in range(rounds):
        for reset in (True, False):
            for name, body in handshake_points(export).items():
                run_point(host, port, name, body, reset)
                sessions += 1
            for structured in (True, False):
                for name, body in transmission_points(size).items():
                    def session(s, body=body, structured=structured):
                        negotiate(s, export, structured)
                        body(s, structured)
                    run_point(host, port, f"{name}/{'structured' if structured else 'simple'}", session, reset)
                    sessions += 1
    print(f"reset points: {sessions} sessions")

    # The flood: GO plus one more option, then RST, from `clients` threads at once.
    errors = []
    done = [0] * clients

    def flood_client(k):
        for i in range(flood // clients):
            try:
                s = connect(host, port)
                try:
                    read_greeting(s)
                    s.sendall(struct.pack(">I", 3) + option(OPT_GO, go_payload(export)))
                    s.sendall(option([OPT_LIST, OPT_GO, OPT_STRUCTURED_REPLY, 4242][i % 4]))
                finally:
                    hang_up(s, True)
                done[k] += 1
            except (ConnectionResetError, BrokenPipeError):
                done[k] += 1
            except (OSError, Malformed) as e:
                errors.append(f"client {k} session {i}: {e}")
                return

    threads = [threading.Thread(target=flood_client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"flood: {sum(done)} GO+option+reset sessions from {clients} clients")
    if errors:
        print("\n".join(errors[:10]))
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except Malformed as e:
        print(f"FAIL: {e}")
        sys.exit(1)
