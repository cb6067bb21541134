#!/usr/bin/env python3
"""Hostile frames on a live server's control socket: every one must get a failure reply or a
closed connection, and the server must keep serving. Usage: control-garbage.py CONTROL_SOCKET VOLUME

The control socket admits only the server's own user and root, so this is the operator's own
mistakes and a compromised local tool, not a tenant; still, no frame may reach a trap.
"""
import json
import socket
import struct
import sys

U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1


def exchange(path, raw, read_reply=True):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    try:
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while read_reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data
    except (ConnectionResetError, BrokenPipeError):
        return b""
    finally:
        s.close()


def frame(obj):
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def request(name, fields):
    return frame({"version": 1, "request": {name: fields}})


def main():
    path, volume = sys.argv[1], sys.argv[2]
    page = "A" * 5461 + "=="  # base64 of 4 KiB, padded oddly on purpose in one case below
    cases = [
        ("garbage", b"\xff" * 64),
        ("empty frame", struct.pack(">I", 0)),
        ("4 GiB announced", struct.pack(">I", 0xFFFFFFFF) + b"{}"),
        ("truncated frame", struct.pack(">I", 100) + b"{\"version\":1"),
        ("not JSON", frame(b"\x00\x01not json")),
        ("wrong version", frame({"version": 99, "request": {"ping": {}}})),
        ("negative version", frame({"version": -1, "request": {"ping": {}}})),
        ("unknown request", request("reformatEverything", {})),
        ("wrong field types", request("create", {"name": 7, "size": "big", "blockSize": [], "group": None})),
        ("create size 0", request("create", {"name": "g0", "size": 0, "blockSize": 4096, "group": "default"})),
        ("create size max", request("create", {"name": "g1", "size": U64_MAX, "blockSize": 4096, "group": "default"})),
        ("create block size -1", request("create", {"name": "g2", "size": 1 << 20, "blockSize": -1, "group": "default"})),
        ("create block size 0", request("create", {"name": "g3", "size": 1 << 20, "blockSize": 0, "group": "default"})),
        ("create block size 2^62", request("create", {"name": "g4", "size": 1 << 20, "blockSize": 1 << 62, "group": "default"})),
        ("create long group", request("create", {"name": "g5", "size": 1 << 20, "blockSize": 4096, "group": "g" * 100000})),
        ("create bad name", request("create", {"name": "../../etc", "size": 1 << 20, "blockSize": 4096, "group": "default"})),
        ("resize to 0", request("resize", {"name": volume, "size": 0})),
        ("resize to max", request("resize", {"name": volume, "size": U64_MAX})),
        ("info empty name", request("info", {"name": ""})),
        ("snapshot no @", request("snapshot", {"target": "@@@"})),
        ("share missing", request("share", {"snapshot": "nope@x", "newName": "y"})),
        ("remove missing", request("remove", {"name": "nope", "force": True})),
        ("diff missing", request("diff", {"from": "a", "to": "b"})),
        ("import relative", request("importImage", {"path": "rel/x", "name": "i", "blockSize": 4096, "group": "default", "format": "qcow2"})),
        ("import missing", request("importImage", {"path": "/nonexistent/x", "name": "i", "blockSize": 4096, "group": "default", "format": None})),
        ("export to dir", request("exportImage", {"name": volume, "path": "/", "overwrite": True})),
        ("clean page get -1", request("cleanPageGet", {"domain": 1, "volume": volume, "offset": 0, "length": -1})),
        ("clean page get huge", request("cleanPageGet", {"domain": 1, "volume": volume, "offset": 0, "length": I64_MAX})),
        ("clean page get past end", request("cleanPageGet", {"domain": 1, "volume": volume, "offset": U64_MAX, "length": 4096})),
        ("clean page put odd", request("cleanPagePut", {"domain": U64_MAX, "volume": volume, "offset": 4095, "page": "AAA="})),
        ("clean page put past end", request("cleanPagePut", {"domain": 1, "volume": volume, "offset": U64_MAX - 100, "page": page[:5460]})),
        ("clean page invalidate all", request("cleanPageInvalidate", {"domain": 0})),
        ("forensics reversed", request("forensics", {"volume": volume, "fromNanoseconds": I64_MAX, "toNanoseconds": -I64_MAX})),
        ("policy weight 0", request("tenancy", {"_0": {"setPolicy": {"domain": "m", "policy": {
            "reservation": 0, "weight": 0, "burstUnits": 8, "limitBurstUnits": 8, "queueCapacity": 256}}}})),
        ("policy huge queue", request("tenancy", {"_0": {"setPolicy": {"domain": "m", "policy": {
            "reservation": -5, "weight": 1, "burstUnits": 8, "limitBurstUnits": 8, "queueCapacity": I64_MAX}}}})),
        ("fsck", request("fsck", {"verifyData": True})),
        ("gc", request("gc", {})),
    ]
    for name, raw in cases:
        reply = exchange(path, raw)
        alive = exchange(path, request("ping", {}))
        if b"success" not in alive:
            print(f"FAIL: the server stopped answering after '{name}' (reply was {reply[:200]!r})")
            sys.exit(1)
    # A request trickled one byte a second: the server's deadline is per request (10 s), not per
    # recv, so it must give up long before the 100 bytes would arrive.
    import time
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(struct.pack(">I", 100))
    started = time.monotonic()
    closed_after = None
    for _ in range(60):
        try:
            s.sendall(b" ")
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - started
            break
        s.settimeout(1)
        try:
            if s.recv(65536) == b"":
                closed_after = time.monotonic() - started
                break
            closed_after = time.monotonic() - started  # the timeout failure reply
            break
        except socket.timeout:
            pass
    s.close()
    if closed_after is None or closed_after > 30:
        print(f"FAIL: a trickling control client was not cut off (after {closed_after} s)")
        sys.exit(1)
    print(f"control socket: {len(cases)} hostile frames, server still answering; a trickled request was cut off after {closed_after:.1f} s")


if __name__ == "__main__":
    main()
