import Foundation
import Testing
import Logging
import NBDServer
import NIOCore
import Synchronization
import VBDCore

/// Every test that runs a server and real clients, one at a time: they measure this process's
/// resident memory, and a concurrent 256 MiB nbdcopy would blur that; running them serially also
/// keeps the 2-core machine responsive.
@Suite(.serialized) struct RealServerTests {}

/// Locates real NBD clients; a test needing a missing one is skipped, not failed.
enum Tool {
    static let searchPath = ["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin", "/sbin"]

    static func path(_ name: String) -> String? {
        searchPath.map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static func exists(_ names: String...) -> Bool {
        names.allSatisfy { path($0) != nil }
    }

    /// True when fio was built with its nbd engine (decided once, before any test runs).
    static let fioHasNBDEngine: Bool = {
        guard let fio = path("fio") else { return false }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: fio)
        process.arguments = ["--enghelp=nbd"]
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return false }
        process.waitUntilExit()
        return process.terminationStatus == 0
    }()

    /// nbdsh runs `python3 -m nbd`: it needs the system python that has the libnbd bindings.
    static var hasNBDPython: Bool {
        guard path("nbdsh") != nil else { return false }
        return FileManager.default.fileExists(atPath: "/usr/lib/python3/dist-packages/nbd.py")
    }
}

struct ToolResult: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    var description: String { "exit \(status)\n--- stdout\n\(stdout)\n--- stderr\n\(stderr)" }
}

enum ToolError: Error { case missing(String), timedOut(String) }

/// Runs a client as a subprocess with a deadline; output goes to files so pipes cannot deadlock.
func runTool(_ name: String, _ arguments: [String], environment extra: [String: String] = [:],
             timeout: Duration = .seconds(120)) async throws -> ToolResult {
    guard let executable = Tool.path(name) else { throw ToolError.missing(name) }
    let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-tool-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: directory) }
    let outURL = directory.appendingPathComponent("out"), errURL = directory.appendingPathComponent("err")
    _ = FileManager.default.createFile(atPath: outURL.path, contents: nil)
    _ = FileManager.default.createFile(atPath: errURL.path, contents: nil)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var environment = ProcessInfo.processInfo.environment
    environment["PATH"] = Tool.searchPath.joined(separator: ":")  // system python3 for nbdsh
    environment["LIBNBD_DEBUG"] = nil
    for (key, value) in extra { environment[key] = value }
    process.environment = environment
    process.standardOutput = try FileHandle(forWritingTo: outURL)
    process.standardError = try FileHandle(forWritingTo: errURL)
    process.standardInput = FileHandle.nullDevice
    try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, Error>) in
        process.terminationHandler = { _ in continuation.resume() }
        do { try process.run() } catch {
            process.terminationHandler = nil
            continuation.resume(throwing: error)
        }
        // Every client run is bounded in time: a hung client is killed and the test fails.
        let pid = process.processIdentifier
        Task.detached {
            try? await Task.sleep(for: timeout)
            if process.isRunning && process.processIdentifier == pid { process.terminate() }
        }
    }
    if process.terminationReason == .uncaughtSignal && process.terminationStatus == SIGTERM {
        throw ToolError.timedOut("\(name) \(arguments)")
    }
    let stdout = (try? String(contentsOf: outURL, encoding: .utf8)) ?? ""
    let stderr = (try? String(contentsOf: errURL, encoding: .utf8)) ?? ""
    return ToolResult(status: process.terminationStatus, stdout: stdout, stderr: stderr)
}

/// A running server on a unix socket (and optionally TCP) with in-memory exports.
final class ServerFixture: @unchecked Sendable {
    // @unchecked: fields are set once in `start` and only read afterwards.
    let directory: URL
    let socketPath: String
    let provider: MemoryExportProvider
    let server: NBDServer

    static let volumeSize: UInt64 = 64 << 20

    /// Standard exports: `vol` (64 MiB, rw), `vol@snap` (read-only snapshot of `vol`), `bad` (block 3
    /// corrupt, store full), `small` (1 MiB).
    static func start(tls: NBDServer.TLSMode = .off, tcp: Bool = false, limits: NBDServer.ServerLimits = .init(),
                      extraDevices: [MemoryBlockDevice] = [], snapshotPattern: Bool = true) async throws -> ServerFixture {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-nbd-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let volume = MemoryBlockDevice(name: "vol", size: volumeSize)
        if snapshotPattern {
            let pattern = [UInt8](repeating: 0xA5, count: 8192)
            try volume.writeArray(pattern, offset: 0)
        }
        let snapshot = volume.snapshot(named: "snap")
        var badState = MemoryBlockDevice.State()
        badState.blocks[3] = [UInt8](repeating: 7, count: 4096)
        badState.corruptBlocks = [3]
        badState.isFull = true
        let bad = MemoryBlockDevice(name: "bad", size: 1 << 20, state: badState)
        let small = MemoryBlockDevice(name: "small", size: 1 << 20)
        let provider = MemoryExportProvider([volume, snapshot, bad, small] + extraDevices)
        let socketPath = directory.appendingPathComponent("nbd.sock").path
        var logger = Logger(label: "vbd.nbd.test")
        logger.logLevel = ProcessInfo.processInfo.environment["VBD_NBD_TEST_LOG"] == nil ? .warning : .trace
        let fixture = ServerFixture(
            directory: directory, socketPath: socketPath, provider: provider,
            configuration: .init(exports: provider, tcp: tcp ? ("127.0.0.1", 0) : nil, unixSocketPath: socketPath,
                                 tls: tls, logger: logger, limits: limits, ioThreadsPerPool: 4, eventLoopThreads: 2,
                                 observer: nil))
        try await fixture.server.start()
        return fixture
    }

    private init(directory: URL, socketPath: String, provider: MemoryExportProvider,
                 configuration: NBDServer.Configuration) {
        self.directory = directory
        self.socketPath = socketPath
        self.provider = provider
        var configuration = configuration
        let sink = RecordSink()
        configuration.observer = { record in sink.append(record) }
        self.server = NBDServer(configuration: configuration)
        self.sink = sink
    }

    let sink: RecordSink

    /// `nbd+unix:///EXPORT?socket=...`
    func uri(_ export: String = "vol") -> String {
        "nbd+unix:///\(export)?socket=\(socketPath)"
    }

    func stop() async {
        await server.stop()
        try? FileManager.default.removeItem(at: directory)
    }
}

/// Collects observer records, bounded: tests only look at the most recent ones.
final class RecordSink: Sendable {
    private let records = Mutex<[NBDRequestRecord]>([])
    static let recordsMax = 10_000

    func append(_ record: NBDRequestRecord) {
        records.withLock { records in
            if records.count == Self.recordsMax { records.removeFirst(records.count / 2) }
            records.append(record)
        }
    }

    var all: [NBDRequestRecord] { records.withLock { $0 } }
}

/// Runs `body` with a fresh server and always stops it.
func withServer<T>(tls: NBDServer.TLSMode = .off, tcp: Bool = false, limits: NBDServer.ServerLimits = .init(),
                   extraDevices: [MemoryBlockDevice] = [],
                   _ body: (ServerFixture) async throws -> T) async throws -> T {
    let fixture = try await ServerFixture.start(tls: tls, tcp: tcp, limits: limits, extraDevices: extraDevices)
    do {
        let result = try await body(fixture)
        await fixture.stop()
        return result
    } catch {
        await fixture.stop()
        throw error
    }
}

/// Resident set size of this process, to show that hostile clients do not make the server allocate.
func residentBytes() -> Int {
    guard let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
    let fields = statm.split(separator: " ")
    guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
    return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
}
