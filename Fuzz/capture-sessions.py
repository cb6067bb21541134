#!/usr/bin/env python3
"""Records what real clients send to `vbdtool serve` and writes the fuzz seed corpora.

A recording proxy sits between each client and the server: NBD clients (qemu-img, nbdinfo,
nbdcopy, nbdsh) connect to it on 127.0.0.1 and it forwards to the server's unix socket; `vbdtool`
commands reach the control socket through it (the server's control.sock is moved aside and the
proxy listens in its place). Every connection's client->server bytes (and, for the control
socket, the server->client bytes) are kept and turned into seeds:

  fixtures/fuzz/nbd-handshake/<client>-<n>     config byte + the client's whole stream
  fixtures/fuzz/nbd-transmission/<client>-<n>  config byte + negotiation byte + the requests
  fixtures/fuzz/control-framing/<command>-...  side byte (0 request, 1 reply) + the frames
  fixtures/fuzz/live/<client>-<n>.bin          the raw client stream (for Fuzz/live-fuzz.py)

The config bytes are those the harnesses read (Fuzz/Harness/NBDSessionDriver.swift).
usage: VBDTOOL=.build/debug/vbdtool Fuzz/capture-sessions.py [--out fixtures/fuzz]
"""
import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordingProxy:
    """Accepts on `listener`, forwards each connection to `connect()`, records both directions."""

    def __init__(self, listener, connect):
        self.listener = listener
        self.connect = connect
        self.sessions = []  # [(client->server bytearray, server->client bytearray)]
        self.lock = threading.Lock()
        self.label = "unlabelled"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = self.connect()
            record = (self.label, bytearray(), bytearray())
            with self.lock:
                self.sessions.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, record[1]), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, record[2]), daemon=True).start()

    @staticmethod
    def _pump(source, sink, log):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                log += data
                sink.sendall(data)
        except OSError:
            pass
        for s in (sink,):
            try:
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def take(self):
        time.sleep(0.3)  # the pumps finish copying after the client exits
        with self.lock:
            done, self.sessions = self.sessions, []
        return done


def run(command, **kwargs):
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120, **kwargs)
    if result.returncode != 0:
        sys.exit(f"capture: {' '.join(command)} failed:\n{result.stdout}")
    return result.stdout


NBDSH_SCRIPT = r'''
import nbd, os
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("x-vbd:sharing")
h.connect_uri(os.environ["URI"])
data = bytes(range(256)) * 64
h.pwrite(data, 1 << 20, nbd.CMD_FLAG_FUA)
assert h.pread(len(data), 1 << 20) == data
h.flush(); h.cache(65536, 0)
h.trim(65536, 2 << 20); h.zero(65536, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
h.block_status(1 << 22, 0, lambda *a: 0)
h.block_status(1 << 22, 0, lambda *a: 0, nbd.CMD_FLAG_REQ_ONE)
h.pread_structured(65536, 1 << 20, lambda *a: 0)
h.pread_structured(4096, 0, lambda *a: 0, nbd.CMD_FLAG_DF)
h.set_strict_mode(0)
try: h.pread(512, h.get_size())
except nbd.Error: pass
h.shutdown()
'''


def parse_client_stream(stream):
    """Splits a client->server NBD stream: returns (options, transmission bytes or None)."""
    if len(stream) < 4:
        return [], None
    position, options = 4, []
    while position + 16 <= len(stream):
        magic, code, length = struct.unpack(">QII", stream[position:position + 16])
        payload = stream[position + 16:position + 16 + length]
        position += 16 + length
        options.append((code, payload))
        if code in (1, 7):  # EXPORT_NAME or GO: the requests follow (the captured GO succeeded)
            return options, stream[position:]
    return options, None


def shrink_requests(transmission, payload_max, requests_max):
    """The same request sequence with WRITE payloads cut to `payload_max` bytes (the length field
    follows) and at most `requests_max` requests: seeds stay small and fast to run."""
    out, position, count = bytearray(), 0, 0
    while position + 28 <= len(transmission) and count < requests_max:
        header = bytearray(transmission[position:position + 28])
        kind, length = struct.unpack(">H", header[6:8])[0], struct.unpack(">I", header[24:28])[0]
        position += 28
        payload = b""
        if kind == 1:  # WRITE
            payload = transmission[position:position + min(length, payload_max)]
            position += length
            header[24:28] = struct.pack(">I", len(payload))
        out += header + payload
        count += 1
    # Keep the final NBD_CMD_DISC when the cap cut the sequence.
    if count == requests_max and len(transmission) >= 28 and struct.unpack(">H", transmission[-22:-20])[0] == 2:
        out += transmission[-28:]
    return bytes(out)


def negotiation_byte(options):
    """The transmission target's second byte: what these options negotiated."""
    structured = any(code == 8 for code, _ in options)
    contexts = []
    for code, payload in options:
        if code == 10:
            text = bytes(payload)
            contexts = [c for c in ("base:allocation", "x-vbd:sharing") if c.encode() in text]
    value = 1 if structured else 0
    if structured and "base:allocation" in contexts:
        value |= 2
    if structured and "x-vbd:sharing" in contexts:
        value |= 4
    return value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.path.join(ROOT, "fixtures", "fuzz"))
    options = parser.parse_args()
    vbdtool = os.environ.get("VBDTOOL", os.path.join(ROOT, ".build", "debug", "vbdtool"))
    work = tempfile.mkdtemp(prefix="vbd-capture-")
    server = None
    try:
        store = os.path.join(work, "store")
        run([vbdtool, "init", "--store", store])
        run([vbdtool, "create", "vm0", "--size", "16M", "--store", store])
        run([vbdtool, "snapshot", "vm0@s", "--store", store])
        nbd_socket = os.path.join(work, "nbd.sock")
        server = subprocess.Popen([vbdtool, "serve", "--store", store, "--unix", nbd_socket],
                                  stdout=open(os.path.join(work, "serve.log"), "w"), stderr=subprocess.STDOUT)
        control = os.path.join(store, "control.sock")
        for _ in range(200):
            if os.path.exists(nbd_socket) and os.path.exists(control):
                break
            time.sleep(0.05)
        else:
            sys.exit("capture: server did not start")

        def unix_connect(path):
            def connect():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(path)
                return s
            return connect

        nbd_listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        nbd_listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        nbd_listener.bind(("127.0.0.1", 0))
        nbd_listener.listen(16)
        port = nbd_listener.getsockname()[1]
        nbd_proxy = RecordingProxy(nbd_listener, unix_connect(nbd_socket))

        uri = f"nbd://127.0.0.1:{port}/vm0"
        image = os.path.join(work, "image.raw")
        with open(image, "wb") as f:
            f.write(os.urandom(1 << 20) + bytes(3 << 20))
        clients = [
            ("qemu-img-info", ["qemu-img", "info", "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=vm0"]),
            ("qemu-img-map", ["qemu-img", "map", "--output=json", "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=vm0"]),
            ("qemu-img-convert", ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", image, uri]),
            ("nbdinfo", ["nbdinfo", uri]),
            ("nbdinfo-list", ["nbdinfo", "--list", f"nbd://127.0.0.1:{port}"]),
            ("nbdinfo-map", ["nbdinfo", "--map", uri]),
            ("nbdinfo-snapshot", ["nbdinfo", f"nbd://127.0.0.1:{port}/vm0@s"]),
            ("nbdcopy-in", ["nbdcopy", image, uri]),
            ("nbdcopy-out", ["nbdcopy", uri, os.path.join(work, "out.raw")]),
            ("nbdsh", ["nbdsh", "-c", NBDSH_SCRIPT]),
        ]
        captured = []
        for label, command in clients:
            nbd_proxy.label = label
            # nbdsh runs "python3 -m nbd": the system python has the libnbd bindings.
            run(command, env=dict(os.environ, URI=uri, PATH="/usr/bin:/bin:" + os.environ.get("PATH", "")))
            captured += nbd_proxy.take()

        # Control socket: move the server's socket aside, listen in its place.
        real_control = os.path.join(store, "control.real.sock")
        os.rename(control, real_control)
        control_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        control_listener.bind(control)
        control_listener.listen(16)
        control_proxy = RecordingProxy(control_listener, unix_connect(real_control))
        control_captured = []
        for label, args in [
            ("list", ["list"]), ("info", ["info", "vm0"]), ("create", ["create", "tmp", "--size", "1M"]),
            ("snapshot", ["snapshot", "tmp@a"]), ("share", ["share", "tmp@a", "tmp2"]),
            ("diff", ["diff", "vm0@s", "vm0"]), ("stats", ["stats"]), ("fsck", ["fsck"]),
            ("remove", ["rm", "tmp2"]), ("remove-fail", ["rm", "nosuch"]),
        ]:
            control_proxy.label = label
            subprocess.run([vbdtool] + args + ["--store", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
            control_captured += control_proxy.take()
        os.unlink(control)
        os.rename(real_control, control)
    finally:
        if server:
            server.terminate()
            server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    directories = {name: os.path.join(options.out, name) for name in ("nbd-handshake", "nbd-transmission", "control-framing", "live")}
    for directory in directories.values():
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory)
    counts = {name: 0 for name in directories}

    def save(kind, name, data):
        with open(os.path.join(directories[kind], name), "wb") as f:
            f.write(data)
        counts[kind] += 1

    seen = {}
    for label, client_bytes, _ in captured:
        stream = bytes(client_bytes)
        if not stream:
            continue
        n = seen.get(label, 0)
        seen[label] = n + 1
        name = f"{label}-{n}"
        opts, transmission = parse_client_stream(stream)
        handshake = stream[:len(stream) - len(transmission)] if transmission else stream
        if transmission:
            stream = handshake + shrink_requests(transmission, 4096, 400)
        save("live", name + ".bin", stream)
        if transmission:
            transmission = shrink_requests(transmission, 512, 64)
            stream = handshake + transmission
        # Config bytes: TLS disabled, whole / single-byte / random segmentation, real limits;
        # one more with the small request limit so recorded WRITEs take the discard path.
        for config in (0x00, 0x04, 0x0C, 0x20):
            save("nbd-handshake", f"{name}-c{config:02x}", bytes([config]) + stream)
        if transmission:
            negotiated = negotiation_byte(opts)
            for config in (0x00, 0x0C, 0x20):
                save("nbd-transmission", f"{name}-c{config:02x}", bytes([config, negotiated]) + transmission)
    for label, request, reply in control_captured:
        save("control-framing", f"{label}-request", b"\x00" + bytes(request))
        if reply:
            save("control-framing", f"{label}-reply", b"\x01" + bytes(reply))
    for kind, count in counts.items():
        print(f"capture: {count} seeds in {directories[kind]}")


if __name__ == "__main__":
    main()
