"""What the RADOS integration clients share (rados-handover.py, rados-move.py): the checks and
their failures, the block pattern, a `vbdtool serve` process whose output is watched, and NBD
connections that retry."""
import argparse
import os
import signal
import subprocess
import threading
import time

import nbd

BLOCK = 4096
failures = []


def client_arguments(blocks_help):
    """The options every RADOS client takes from its test script; the caller adds its own."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--vbdtool", required=True)
    parser.add_argument("--ceph-conf", required=True)
    parser.add_argument("--pool", default="vbd")
    parser.add_argument("--tmp", required=True)
    parser.add_argument("--blocks", type=int, default=16384, help=blocks_help)
    return parser


def check(condition, message):
    if not condition:
        failures.append(message)
        print(f"FAIL: {message}", flush=True)
    return condition


def pattern(index, generation):
    """A block that names its index and the round that wrote it."""
    return (index.to_bytes(8, "little") + generation.to_bytes(8, "little")) * (BLOCK // 16)


class ServerProcess:
    """One `vbdtool serve` (a host) on a unix socket; its output goes to a log file in `tmp` and is
    watched for lines."""

    def __init__(self, name, vbdtool, tmp, serve_args):
        self.name = name
        self.host = os.path.join(tmp, f"host-{name}")
        self.sock = os.path.join(tmp, f"{name}.sock")
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.lines = []
        self.changed = threading.Condition()
        command = [vbdtool, "serve", "--store", self.host, "--unix", self.sock, *serve_args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        with open(self.log_path, "a") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                with self.changed:
                    self.lines.append(line.rstrip("\n"))
                    self.changed.notify_all()
        with self.changed:
            self.lines.append(None)   # end of output
            self.changed.notify_all()

    def wait_for(self, text, timeout):
        """True once a line containing `text` was printed; False if the output ends or time runs out first."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                if any(line is not None and text in line for line in self.lines):
                    return True
                if None in self.lines:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)

    def logged(self, text):
        with self.changed:
            return any(line is not None and text in line for line in self.lines)

    def uri(self, export="vol"):
        return f"nbd+unix:///{export}?socket={self.sock}"

    def exit_status(self, timeout):
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=30):
        """SIGTERM (after SIGCONT, for a stopped server), SIGKILL if it has not exited in `timeout` s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            if self.exit_status(timeout) is None:
                self.process.kill()
                self.process.wait()
        self.reader.join(10)

    def check_no_crash(self):
        with self.changed:
            crashed = [line for line in self.lines if line and ("Fatal error" in line or "Program crashed" in line)]
        check(not crashed, f"{self.name} crashed: {crashed[:2]}")

    def dump(self, count=25):
        print(f"--- {self.name}'s log ---")
        with self.changed:
            for line in self.lines[-count:]:
                if line is not None:
                    print(line)


def disconnect(handle):
    """Ends a connection (libnbd closes the handle when the last reference goes)."""
    try:
        handle.shutdown()
    except nbd.Error:
        pass   # the server is already gone


def connect(uris, timeout, pause=0.02):
    """Connects to the first of `uris()` that answers, asking again until `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for uri in uris():
            handle = nbd.NBD()
            try:
                handle.connect_uri(uri)
                return handle
            except nbd.Error as error:
                last = error
        time.sleep(pause)
    raise RuntimeError(f"could not connect to any of {uris()} in {timeout} s: {last}")
