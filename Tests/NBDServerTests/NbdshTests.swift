import Foundation
import Testing
import VBDCore

/// Python prelude shared by the nbdsh scripts: connection helpers and an error assertion.
let nbdshPrelude = #"""
import errno, os, nbd
MiB = 1 << 20
def connect(uri, contexts=("base:allocation", "x-vbd:sharing"), structured=True):
    h = nbd.NBD()
    for c in contexts:
        h.add_meta_context(c)
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    return h
def expect_error(errnum, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errnum == errnum, f"{fn.__name__}{shown(args)}: expected {errno.errorcode[errnum]}, got {e.errnum} {e.string}"
        return
    raise AssertionError(f"{fn.__name__}{shown(args)} succeeded; expected {errno.errorcode[errnum]}")
def shown(args):
    return tuple(f"<{len(a)} bytes>" if isinstance(a, (bytes, bytearray)) else a for a in args[:3])
extents = {}
def record_extents(metacontext, offset, entries, err):
    extents[metacontext] = list(entries)
    return 0
def status(h, count, offset, flags=0):
    extents.clear()
    h.block_status(count, offset, record_extents, flags)
    return dict(extents)
"""#

/// Runs a python script under nbdsh with the fixture's URIs in the environment; fails the test on
/// a non-zero exit (an assertion in the script).
func runNbdsh(_ script: String, fixture: ServerFixture, timeout: Duration = .seconds(120)) async throws {
    let result = try await runTool("nbdsh", ["-c", nbdshPrelude + "\n" + script], environment: [
        "URI": fixture.uri("vol"), "URI_SNAP": fixture.uri("vol@snap"), "URI_BAD": fixture.uri("bad"),
        "URI_SMALL": fixture.uri("small"),
    ], timeout: timeout)
    #expect(result.status == 0, "\(result)")
}

extension RealServerTests {
    @Suite("nbdsh against NBDServer serving a Store", .serialized, .enabled(if: Tool.hasNBDPython))
    struct NbdshTests {
        @Test func negotiationAdvertisesTruthfulFlagsAndExportInformation() async throws {
            try await withServer { fixture in
                try await runNbdsh(#"""
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.set_full_info(True)
    h.add_meta_context("base:allocation")
    h.add_meta_context("x-vbd:sharing")
    h.connect_uri(os.environ["URI"])
    names = []
    h.opt_list(lambda name, desc: names.append((name, desc)) or 0)
    assert ("vol", "volume, 67108864 bytes") in names, names
    assert ("vol@snap", "snapshot (read-only), 67108864 bytes") in names, names
    assert ("small", "volume, 1048576 bytes") in names, names
    listed = []
    h.opt_list_meta_context(lambda name: listed.append(name) or 0)
    assert sorted(listed) == ["base:allocation", "x-vbd:sharing"], listed
    h.opt_go()
    assert h.get_size() == 64 * MiB
    assert h.get_structured_replies_negotiated()
    assert h.can_meta_context("base:allocation") and h.can_meta_context("x-vbd:sharing")
    for name in ["can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df", "can_cache"]:
        assert getattr(h, name)(), name
    assert not h.is_read_only()
    assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
    assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
    # A volume created without a group has a group of its own.
    assert h.get_export_description().startswith("volume, 67108864 bytes, 4096-byte blocks, group volume-group-"), h.get_export_description()
    assert h.get_handshake_flags() & nbd.HANDSHAKE_FLAG_NO_ZEROES
    h.shutdown()

    s = connect(os.environ["URI_SNAP"])
    assert s.is_read_only()
    assert not s.can_trim() and not s.can_zero() and not s.can_fua()
    assert s.can_flush() and s.can_multi_conn() and s.can_cache()

    # Without structured replies DF is not advertised and no context can be negotiated.
    p = connect(os.environ["URI"], contexts=("base:allocation",), structured=False)
    assert not p.get_structured_replies_negotiated()
    assert not p.can_df()
    assert not p.can_meta_context("base:allocation")
    assert p.pread(4096, 0) == b"\xa5" * 4096
    p.shutdown()

    # A missing export is refused during the handshake, not by dropping the connection.
    m = nbd.NBD()
    m.set_opt_mode(True)
    m.connect_uri(os.environ["URI"])
    m.set_export_name("no-such-volume")
    try:
        m.opt_info()
        raise AssertionError("opt_info on a missing export succeeded")
    except nbd.Error as e:
        pass
    m.set_export_name("vol")
    m.opt_info()
    assert m.get_size() == 64 * MiB
    m.opt_abort()
    """#, fixture: fixture)
            }
        }

        @Test func everyCommandAndFlagBehavesAsSpecified() async throws {
            try await withServer { fixture in
                try await runNbdsh(#"""
    h = connect(os.environ["URI"])
    data = bytes(range(256)) * 64
    h.pwrite(data, 1 * MiB, nbd.CMD_FLAG_FUA)
    assert h.pread(len(data), 1 * MiB) == data
    h.pwrite(b"hello", 1 * MiB + 100)
    assert h.pread(5, 1 * MiB + 100) == b"hello"
    h.flush()

    # Structured read of a mostly unallocated range: hole chunks around one data block.
    h.pwrite(b"\x01" * 4096, 2 * MiB + 32768)
    chunks = []
    def chunk(buf, offset, st, err):
        chunks.append((offset, len(buf), st))
        return 0
    buf = h.pread_structured(65536, 2 * MiB, chunk)
    assert buf == b"\0" * 32768 + b"\x01" * 4096 + b"\0" * 28672
    kinds = [c[2] for c in chunks]
    assert kinds.count(nbd.READ_HOLE) == 2 and kinds.count(nbd.READ_DATA) == 1, chunks
    # DF: a single content chunk, holes sent as explicit zeroes.
    chunks.clear()
    buf = h.pread_structured(65536, 2 * MiB, chunk, nbd.CMD_FLAG_DF)
    assert len(chunks) == 1 and chunks[0][2] == nbd.READ_DATA and chunks[0][1] == 65536, chunks
    assert buf[32768:36864] == b"\x01" * 4096

    # BLOCK_STATUS base:allocation: hole|zero = 3, data = 0.
    st = status(h, 65536, 2 * MiB)
    assert st["base:allocation"] == [32768, 3, 4096, 0, 28672, 3], st
    assert st["x-vbd:sharing"] == [65536, 0], st
    st = status(h, 65536, 2 * MiB, nbd.CMD_FLAG_REQ_ONE)
    assert st["base:allocation"] == [32768, 3], st

    # TRIM turns the block back into a hole.
    h.trim(4096, 2 * MiB + 32768, nbd.CMD_FLAG_FUA)
    assert status(h, 65536, 2 * MiB)["base:allocation"] == [65536, 3]

    # WRITE_ZEROES with NO_HOLE keeps the blocks allocated (ZERO only); without it they become holes.
    h.pwrite(b"\x02" * 8192, 3 * MiB)
    h.zero(8192, 3 * MiB, nbd.CMD_FLAG_NO_HOLE)
    assert status(h, 8192, 3 * MiB)["base:allocation"] == [8192, 2]
    assert h.pread(8192, 3 * MiB) == b"\0" * 8192
    h.zero(8192, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO)
    assert status(h, 8192, 3 * MiB)["base:allocation"] == [8192, 3]
    # FAST_ZERO is fast on whole blocks, with NO_HOLE too (the store maps them to its allocated
    # zero chunk)...
    h.zero(8192, 3 * MiB, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
    assert status(h, 8192, 3 * MiB)["base:allocation"] == [8192, 2]
    # ...but part of a block needs a read-modify-write: ENOTSUP, and the block is untouched.
    h.pwrite(b"\x04" * 4096, 3 * MiB)
    expect_error(errno.ENOTSUP, h.zero, 512, 3 * MiB + 512, nbd.CMD_FLAG_FAST_ZERO)
    assert h.pread(4096, 3 * MiB) == b"\x04" * 4096

    h.cache(65536, 0)

    # x-vbd:sharing: blocks 0-1 were written before the snapshot and are shared with it.
    st = status(h, 16384, 0)
    assert st["x-vbd:sharing"] == [8192, 1, 8192, 0], st
    assert st["base:allocation"] == [8192, 0, 8192, 3], st
    h.pwrite(b"\x03" * 4096, 0)
    assert status(h, 16384, 0)["x-vbd:sharing"] == [4096, 0, 4096, 1, 8192, 0]

    # Many requests in flight on one connection, completed out of order where faster.
    bufs = [nbd.Buffer(4096) for _ in range(32)]
    cookies = []
    for i in range(32):
        cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i]) * 4096), 8 * MiB + i * 4096))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
    for i in range(32):
        assert h.pread(4096, 8 * MiB + i * 4096) == bytes([i]) * 4096
    h.shutdown()
    """#, fixture: fixture)
                let commands = Set(fixture.sink.all.map(\.command.description))
                #expect(commands.isSuperset(of: ["READ", "WRITE", "FLUSH", "TRIM", "WRITE_ZEROES", "CACHE", "BLOCK_STATUS"]))
            }
        }

        @Test func invalidRequestsGetTheSpecifiedErrorsAndTheConnectionSurvives() async throws {
            try await withServer { fixture in
                try await runNbdsh(#"""
    for structured in (True, False):
        h = connect(os.environ["URI"], structured=structured)
        h.set_strict_mode(0)
        size = h.get_size()
        expect_error(errno.EINVAL, h.pread, 4096, size)
        expect_error(errno.EINVAL, h.pread, 4096, size - 1024)
        expect_error(errno.ENOSPC, h.pwrite, b"x" * 4096, size)
        expect_error(errno.EINVAL, h.trim, 4096, size)
        expect_error(errno.EINVAL, h.cache, 4096, size)
        expect_error(errno.EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
        expect_error(errno.EINVAL, h.pread, 33 * MiB, 0)
        expect_error(errno.EINVAL, h.pwrite, b"y" * (33 * MiB), 0)
        if structured:
            expect_error(errno.EINVAL, h.block_status, 4096, size, record_extents)
            expect_error(errno.EINVAL, h.zero, 4096, 0, nbd.CMD_FLAG_DF)
        # The connection is still usable after every error.
        h.pwrite(b"z" * 4096, 4096)
        assert h.pread(4096, 4096) == b"z" * 4096
        h.shutdown()

    # BLOCK_STATUS without a negotiated context is EINVAL.
    h = connect(os.environ["URI"], contexts=())
    h.set_strict_mode(0)
    expect_error(errno.EINVAL, h.block_status, 4096, 0, record_extents)
    h.shutdown()

    # Read-only snapshot: writes are EPERM and the data stays.
    s = connect(os.environ["URI_SNAP"])
    s.set_strict_mode(0)
    expect_error(errno.EPERM, s.pwrite, b"x" * 512, 0)
    expect_error(errno.EPERM, s.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_FUA)
    expect_error(errno.EPERM, s.trim, 4096, 0)
    expect_error(errno.EPERM, s.zero, 4096, 0)
    v = connect(os.environ["URI"])
    v.pwrite(b"\x5a" * 8192, 0)
    v.flush()
    assert s.pread(8192, 0) == b"\xa5" * 8192
    assert v.pread(8192, 0) == b"\x5a" * 8192
    """#, fixture: fixture)
                // The observer saw the failures with the errors the clients got.
                let records = fixture.sink.all
                #expect(records.contains { $0.exportName == "vol@snap" && $0.command == .write && $0.errorNumber == 1 })
                #expect(records.contains { $0.exportName == "vol" && $0.command == .read && $0.errorNumber == nil })
            }
        }

        /// A block whose stored bytes were damaged on disk, in a store whose data cap is reached.
        @Test func aDamagedBlockIsEIOAndAFullStoreIsENOSPC() async throws {
            try await withServer(layout: .damaged) { fixture in
                try await runNbdsh(#"""
    b = connect(os.environ["URI_BAD"])
    expect_error(errno.EIO, b.pread, 4096, 3 * 4096)
    expect_error(errno.EIO, b.pread_structured, 16384, 2 * 4096, lambda *a: 0, nbd.CMD_FLAG_DF)
    expect_error(errno.ENOSPC, b.pwrite, os.urandom(4096), 10 * 4096)
    assert b.pread(4096, 0) == b"\0" * 4096
    b2 = connect(os.environ["URI_BAD"], structured=False)
    expect_error(errno.EIO, b2.pread, 4096, 3 * 4096)
    assert b2.pread(4096, 4 * 4096) == b"\0" * 4096
    """#, fixture: fixture)
                let records = fixture.sink.all
                #expect(records.contains { $0.exportName == "bad" && $0.command == .read && $0.errorNumber == 5 && $0.bytes == 4096 })
                #expect(records.contains { $0.exportName == "bad" && $0.command == .write && $0.errorNumber == 28 })
                // The refused write left nothing behind.
                #expect(try fixture.read("bad", offset: 10 * 4096, count: 4096) == [UInt8](repeating: 0, count: 4096))
            }
        }

        @Test func flushOnOneConnectionCoversWritesCompletedOnAnother() async throws {
            try await withServer { fixture in
                try await runNbdsh(#"""
    a = connect(os.environ["URI"])
    b = connect(os.environ["URI"])
    assert a.can_multi_conn() and b.can_multi_conn()
    a.pwrite(b"\x77" * 65536, 5 * MiB)
    b.flush()
    assert b.pread(65536, 5 * MiB) == b"\x77" * 65536
    """#, fixture: fixture)
                // Durable: the store, dropped without a flush of its own and reopened, has it.
                try await fixture.crashAndReopen()
                #expect(try fixture.read("vol", offset: 5 << 20, count: 65536) == [UInt8](repeating: 0x77, count: 65536))
            }
        }

        /// FUA makes each write, trim and zero durable before its reply, with no FLUSH at all; a
        /// write without FUA and without a flush is allowed to be lost (not checked).
        @Test func fuaWritesTrimsAndZeroesAreDurableWithoutAFlush() async throws {
            try await withServer { fixture in
                try await runNbdsh(#"""
    h = connect(os.environ["URI"])
    data = bytes(range(256)) * 64
    h.pwrite(b"\x61" * 65536, 6 * MiB)
    h.pwrite(b"\x62" * 65536, 7 * MiB)
    h.flush()
    h.pwrite(data, 1 * MiB, nbd.CMD_FLAG_FUA)
    h.trim(65536, 6 * MiB, nbd.CMD_FLAG_FUA)
    h.zero(65536, 7 * MiB, nbd.CMD_FLAG_FUA | nbd.CMD_FLAG_NO_HOLE)
    h.shutdown()
    """#, fixture: fixture)
                try await fixture.crashAndReopen()
                let pattern = (0..<(256 * 64)).map { UInt8($0 % 256) }
                #expect(try fixture.read("vol", offset: 1 << 20, count: pattern.count) == pattern)
                #expect(try fixture.read("vol", offset: 6 << 20, count: 65536) == [UInt8](repeating: 0, count: 65536))
                #expect(try fixture.read("vol", offset: 7 << 20, count: 65536) == [UInt8](repeating: 0, count: 65536))
                #expect(fixture.store.fsck().isClean)
            }
        }

        @Test func sixteenConcurrentClientsOnDistinctRanges() async throws {
            try await withServer { fixture in
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for client in 0..<16 {
                        group.addTask {
                            try await runNbdsh("""
    h = connect(os.environ["URI"])
    base = \(client) * 2 * MiB
    pattern = bytes([\(client + 1)]) * 65536
    for i in range(8):
        h.pwrite(pattern, base + i * 65536)
    h.flush()
    for i in range(8):
        assert h.pread(65536, base + i * 65536) == pattern
    h.shutdown()
    """, fixture: fixture)
                        }
                    }
                    try await group.waitForAll()
                }
                for client in 0..<16 {
                    let bytes = try fixture.read("vol", offset: UInt64(client) * (2 << 20), count: 8 * 65536)
                    #expect(bytes.allSatisfy { $0 == UInt8(client + 1) }, "client \(client)")
                }
            }
        }

        @Test(.enabled(if: Tool.exists("openssl")))
        func tlsRequiredRefusesPlainClientsAndServesTLSClients() async throws {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-tls-\(UUID().uuidString.prefix(8))")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let cert = directory.appendingPathComponent("server-cert.pem").path
            let key = directory.appendingPathComponent("server-key.pem").path
            let made = try await runTool("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                                                     "-subj", "/CN=localhost", "-keyout", key, "-out", cert])
            try #require(made.status == 0, "\(made)")
            try FileManager.default.copyItem(atPath: cert, toPath: directory.appendingPathComponent("ca-cert.pem").path)
            try await withServer(tls: .required(certificatePath: cert, keyPath: key)) { fixture in
                try await runNbdsh(#"""
    # A plain client: every option but STARTTLS is answered with NBD_REP_ERR_TLS_REQD.
    p = nbd.NBD()
    p.set_tls(nbd.TLS_DISABLE)
    try:
        p.connect_uri(os.environ["URI"])
        raise AssertionError("plain client was served")
    except nbd.Error as e:
        assert "TLS" in e.string or "tls" in e.string, e.string
    t = nbd.NBD()
    t.set_tls(nbd.TLS_REQUIRE)
    t.set_tls_certificates(os.environ["CERTS"])
    t.set_tls_verify_peer(False)
    t.add_meta_context("base:allocation")
    t.set_export_name("vol")
    t.connect_unix(os.environ["SOCKET"])
    assert t.get_tls_negotiated()
    assert t.get_structured_replies_negotiated()
    t.pwrite(b"\x42" * 65536, 0, nbd.CMD_FLAG_FUA)
    assert t.pread(65536, 0) == b"\x42" * 65536
    assert status(t, 65536, 0)["base:allocation"] == [65536, 0]
    t.shutdown()
    """#.replacingOccurrences(of: "os.environ[\"CERTS\"]", with: "\"\(directory.path)\"")
                   .replacingOccurrences(of: "os.environ[\"SOCKET\"]", with: "\"\(fixture.socketPath)\""),
                   fixture: fixture)
                let plain = try await runTool("nbdinfo", [fixture.uri()])
                #expect(plain.status != 0)
            }
        }
    
        @Test(.enabled(if: Tool.exists("openssl")))
        func tlsWithAClientCAAcceptsOnlyClientsWithACertificate() async throws {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-mtls-\(UUID().uuidString.prefix(8))")
            let withCert = directory.appendingPathComponent("client"), withoutCert = directory.appendingPathComponent("anon")
            try FileManager.default.createDirectory(at: withCert, withIntermediateDirectories: true)
            try FileManager.default.createDirectory(at: withoutCert, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
            for arguments in [
                ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vbd-test-ca",
                 "-keyout", path("ca-key.pem"), "-out", path("ca-cert.pem")],
                ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", path("server-key.pem"),
                 "-out", path("server.csr")],
                ["x509", "-req", "-in", path("server.csr"), "-CA", path("ca-cert.pem"), "-CAkey", path("ca-key.pem"),
                 "-CAcreateserial", "-days", "1", "-out", path("server-cert.pem")],
                ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client", "-keyout", withCert.appendingPathComponent("client-key.pem").path,
                 "-out", path("client.csr")],
                ["x509", "-req", "-in", path("client.csr"), "-CA", path("ca-cert.pem"), "-CAkey", path("ca-key.pem"),
                 "-CAcreateserial", "-days", "1", "-out", withCert.appendingPathComponent("client-cert.pem").path],
            ] {
                let made = try await runTool("openssl", arguments)
                try #require(made.status == 0, "\(made)")
            }
            for target in [withCert, withoutCert] {
                try FileManager.default.copyItem(atPath: path("ca-cert.pem"), toPath: target.appendingPathComponent("ca-cert.pem").path)
            }
            try await withServer(tls: .required(certificatePath: path("server-cert.pem"), keyPath: path("server-key.pem"),
                                                caPath: path("ca-cert.pem"))) { fixture in
                try await runNbdsh("""
def tls_client(certificates):
    t = nbd.NBD()
    t.set_tls(nbd.TLS_REQUIRE)
    t.set_tls_certificates(certificates)
    t.set_tls_verify_peer(False)
    t.set_export_name("vol")
    t.connect_unix("\(fixture.socketPath)")
    return t
t = tls_client("\(withCert.path)")
assert t.get_tls_negotiated()
t.pwrite(b"\\x24" * 4096, 0)
assert t.pread(4096, 0) == b"\\x24" * 4096
t.shutdown()
try:
    tls_client("\(withoutCert.path)")
    raise AssertionError("a client without a certificate was served")
except nbd.Error:
    pass
""", fixture: fixture)
            }
        }
    }
}
