#!/usr/bin/env python3
"""What a client may hold, against a live vbdtool serve. Usage: nbd-holds.py HOST PORT EXPORT MODE

MODE is one of
  half-write    a WRITE announcing 32 MiB that stops short: the server must close the connection
                (it holds the payload buffer) once --message-timeout passes;
  idle          a connection that finishes GO and sends nothing: closed after --idle-timeout;
  steady T      a slow but steady writer: 64 KiB WRITEs sent in 10,000-byte pieces for T seconds,
                so a message is always half-received yet each completes well within the timeout
                (T is a few times --message-timeout): the connection must stay open, every WRITE
                acknowledged;
  half-close    a client that pipelines options, GO, two WRITEs, a READ (of a range nothing wrote:
                NBD does not order requests in flight) and DISC, then closes
                its sending side (shutdown SHUT_WR) before reading anything: every option and
                request is still answered (proto.md: on DISC the server handles all outstanding
                requests), and then the server closes;
  per-peer N    N connections from this address are served, the N+1st is closed before its
                greeting, and after one of the N hangs up a new one is served again;
  stuck K       K connections each pipeline reads and never read the replies, then print READY and
                hold them (the caller stops the server, times it, and ends this process).
Each wait for the server is bounded (60 s) and ends on the event itself (the socket closing).
"""
import socket
import struct
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from importlib import import_module

resets = import_module("nbd-resets")


def wait_closed(s, what, bound=60):
    s.settimeout(bound)
    started = time.monotonic()
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout as e:
        if time.monotonic() - started < bound:
            raise  # ETIMEDOUT from the kernel, not our bound
        print(f"FAIL: {what}: still open after {bound} s")
        sys.exit(1)
    return time.monotonic() - started


def main():
    host, port, export, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if mode == "half-write":
        s = resets.connect(host, port)
        resets.negotiate(s, export, structured=False)
        s.sendall(resets.request(resets.CMD_WRITE, 1, 0, 32 << 20) + bytes(32 << 20)[:(32 << 20) - 1])
        waited = wait_closed(s, "a WRITE one byte short of its 32 MiB")
        print(f"half-sent WRITE closed after {waited:.1f} s")
    elif mode == "idle":
        s = resets.connect(host, port)
        resets.negotiate(s, export)
        waited = wait_closed(s, "an idle connection")
        print(f"idle connection closed after {waited:.1f} s")
    elif mode == "steady":
        seconds = float(sys.argv[5])
        s = resets.connect(host, port)
        resets.negotiate(s, export, structured=False)
        payload = bytes(range(256)) * 256
        stream, handle = b"", 0
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            if len(stream) < 10_000:
                stream += resets.request(resets.CMD_WRITE, handle, (handle % 64) << 16, len(payload)) + payload
                handle += 1
            try:
                s.sendall(stream[:10_000])
            except OSError as e:
                print(f"FAIL: steady writer cut off after {time.monotonic() - started:.1f} s: {e}")
                sys.exit(1)
            stream = stream[10_000:]
            time.sleep(0.05)
        s.sendall(stream)
        s.settimeout(60)
        for expected in range(handle):
            magic, error, got = struct.unpack(">IIQ", resets.recv_exactly(s, 16))
            if error != 0 or got != expected:
                print(f"FAIL: reply {expected}: error {error}, handle {got}")
                sys.exit(1)
        print(f"steady writer: {handle} WRITEs over {seconds:.0f} s, all acknowledged, connection open")
    elif mode == "half-close":
        s = resets.connect(host, port)
        s.settimeout(60)
        resets.read_greeting(s)
        pattern = bytes(range(256)) * 16
        s.sendall(struct.pack(">I", 3)
                  + resets.option(resets.OPT_LIST)
                  + resets.option(resets.OPT_GO, resets.go_payload(export))
                  + resets.request(resets.CMD_WRITE, 1, 0, 4096) + pattern
                  + resets.request(resets.CMD_WRITE, 2, 4096, 4096) + pattern[::-1]
                  + resets.request(resets.CMD_READ, 3, 32 << 20, 8192)   # never written: zeroes
                  + resets.request(resets.CMD_DISC, 4, 0, 0))
        s.shutdown(socket.SHUT_WR)
        listed = resets.read_option_replies(s, resets.OPT_LIST)
        went = resets.read_option_replies(s, resets.OPT_GO)
        if listed[-1] != resets.REP_ACK or went[-1] != resets.REP_ACK:
            print(f"FAIL: option replies after a half-close: LIST {listed}, GO {went}")
            sys.exit(1)
        replies = {}
        for _ in range(3):
            magic, error, handle = struct.unpack(">IIQ", resets.recv_exactly(s, 16))
            replies[handle] = error
            if handle == 3 and error == 0:
                data = resets.recv_exactly(s, 8192)
                if data != bytes(8192):
                    print("FAIL: the READ after a half-close returned other bytes than the volume holds")
                    sys.exit(1)
        if replies != {1: 0, 2: 0, 3: 0}:
            print(f"FAIL: replies after a half-close: {replies}")
            sys.exit(1)
        if s.recv(1) != b"":
            print("FAIL: the server sent more after the last reply")
            sys.exit(1)
        print("half-close: LIST, GO, two WRITEs and a READ answered after the client closed its side; then closed")
    elif mode == "per-peer":
        n = int(sys.argv[5])
        held = []
        for _ in range(n):
            s = resets.connect(host, port)
            resets.read_greeting(s)
            held.append(s)
        extra = resets.connect(host, port)
        extra.settimeout(60)
        if extra.recv(18):
            print(f"FAIL: connection {n + 1} from one peer got a greeting")
            sys.exit(1)
        held.pop().close()
        for attempt in range(600):  # the server frees the slot when it sees the close
            again = resets.connect(host, port)
            again.settimeout(60)
            try:
                if again.recv(18):
                    break
            except ConnectionResetError:
                pass
            again.close()
            time.sleep(0.05)
        else:
            print("FAIL: a freed per-peer slot was never given to a new connection")
            sys.exit(1)
        print(f"per-peer: {n} served, connection {n + 1} refused, a freed slot reused")
    elif mode == "stuck":
        k = int(sys.argv[5])
        stuck = []
        for _ in range(k):
            s = resets.connect(host, port)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            resets.negotiate(s, export, structured=False)
            # 64 reads of 4 MiB: far more reply than the socket buffers hold, never read.
            s.sendall(b"".join(resets.request(resets.CMD_READ, i, 0, 4 << 20) for i in range(64)))
            stuck.append(s)
        print("READY", flush=True)
        # Hold them until the caller, having timed the server's stop, ends this process. (Reading
        # here would only drain what the kernel still holds for a closed socket, at the pace of
        # the tiny receive window.)
        time.sleep(120)
    else:
        sys.exit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
