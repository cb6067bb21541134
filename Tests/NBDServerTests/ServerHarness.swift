import Foundation
import Testing
import Logging
import NBDServer
import NIOCore
import Synchronization
import VBDCache
import VBDCore
import VBDStore

/// Every test that runs a server and real clients, one at a time: running them serially keeps the
/// 2-core machine responsive.
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

/// A running server on a unix socket (and optionally TCP) serving a real ``Store`` in a temporary
/// directory, as `vbdtool serve` does: the store is the export provider, volumes and snapshots are
/// its ``VolumeDevice``s, reads go through a ``BlockCache``.
final class ServerFixture: @unchecked Sendable {
    // @unchecked: `store` is replaced only by `crashAndReopen`, which the test calls after the
    // server has stopped; everything else is set once.
    let directory: URL
    let storePath: String
    let socketPath: String
    private(set) var store: Store
    let server: NBDServer
    let events: ServerLog
    private var storeOpen = true

    static let volumeSize: UInt64 = 64 << 20
    /// Bytes of 0xA5 written to `vol` before `vol@snap` is taken (blocks 0 and 1).
    static let patternBytes = 8192

    /// What the store holds when the server starts.
    enum Layout {
        /// `vol` (64 MiB, 4 KiB blocks, its first 8 KiB 0xA5), `vol@snap` (taken after that
        /// write), `small` (1 MiB).
        case standard
        /// `bad` (1 MiB): block 3 holds data whose stored bytes were damaged on disk, and the
        /// store's data cap is reached, so every new block is refused with ENOSPC.
        case damaged
    }

    static func storeOptions(dataBytesMax: UInt64 = 0) -> Store.Options {
        var options = Store.Options()
        options.cache = BlockCache(configuration: .init(capacityBytes: 32 << 20))
        options.dataBytesMax = dataBytesMax
        return options
    }

    static func start(layout: Layout = .standard, tls: NBDServer.TLSMode = .off, tcp: Bool = false,
                      limits: NBDServer.ServerLimits = .init(),
                      exports: ((Store) throws -> any ExportProvider)? = nil) async throws -> ServerFixture {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-nbd-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let storePath = directory.appendingPathComponent("store").path
        let store: Store
        switch layout {
        case .standard:
            store = try Store.initialize(path: storePath, options: storeOptions())
            try store.createVolume(name: "vol", size: volumeSize)
            try store.device(named: "vol").writeArray([UInt8](repeating: 0xA5, count: patternBytes), offset: 0)
            try store.snapshot(volume: "vol", name: "snap")
            try store.createVolume(name: "small", size: 1 << 20)
        case .damaged:
            store = try makeDamagedStore(at: storePath)
        }
        let socketPath = directory.appendingPathComponent("nbd.sock").path
        let events = ServerLog()
        let fixture = ServerFixture(
            directory: directory, storePath: storePath, socketPath: socketPath, store: store, events: events,
            configuration: .init(exports: try exports?(store) ?? store, tcp: tcp ? ("127.0.0.1", 0) : nil,
                                 unixSocketPath: socketPath, tls: tls, logger: events.logger(label: "vbd.nbd.test"),
                                 limits: limits, ioThreadsPerPool: 4, eventLoopThreads: 2, observer: nil))
        try await fixture.server.start()
        return fixture
    }

    /// The `.damaged` layout: one block written and closed, one byte of its stored chunk flipped
    /// in the data file (the only chunk, so at offset 0), then reopened with a data cap of what
    /// is stored already.
    private static func makeDamagedStore(at path: String) throws -> Store {
        let first = try Store.initialize(path: path, options: storeOptions())
        try first.createVolume(name: "bad", size: 1 << 20)
        let random = (0..<4096).map { _ in UInt8.random(in: 0...255) }
        try first.device(named: "bad").writeArray(random, offset: 3 * 4096)
        let stored = first.storedBytes
        try first.close()
        let dataFile = URL(fileURLWithPath: path + "/data")
        var bytes = [UInt8](try Data(contentsOf: dataFile))
        bytes[3] ^= 0x40
        try Data(bytes).write(to: dataFile)
        return try Store.open(path: path, options: storeOptions(dataBytesMax: stored))
    }

    private init(directory: URL, storePath: String, socketPath: String, store: Store, events: ServerLog,
                 configuration: NBDServer.Configuration) {
        self.directory = directory
        self.storePath = storePath
        self.socketPath = socketPath
        self.store = store
        self.events = events
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

    /// Stops the server, drops the store as a crash would (nothing flushed, nothing checkpointed)
    /// and opens it again: what a test reads from `store` afterwards is what was durable.
    func crashAndReopen() async throws {
        await server.stop()
        store.abandonWithoutFlush()
        store = try Store.open(path: storePath, options: Self.storeOptions())
    }

    /// Reads `count` bytes of export `name` straight from the store.
    func read(_ name: String, offset: UInt64, count: Int) throws -> [UInt8] {
        try store.device(named: name).readArray(offset: offset, count: count)
    }

    func stop() async {
        await server.stop()
        if storeOpen {
            storeOpen = false
            do { try store.close() } catch { Issue.record("closing the store: \(error)") }
        }
        try? FileManager.default.removeItem(at: directory)
    }
}

/// The server's log as events: tests wait for the line the server writes when something has
/// happened (it listens, it stopped) instead of sleeping. Lines at warning and above also go to
/// stderr; everything does with VBD_NBD_TEST_LOG set.
final class ServerLog: Sendable {
    private struct Waiter {
        var pattern: String
        var condition: @Sendable () -> Bool
        var continuation: CheckedContinuation<Void, Never>
    }
    private struct State {
        var lines: [String] = []
        var waiters: [Waiter] = []
    }
    private let state = Mutex(State())
    static let linesMax = 10_000

    func logger(label: String) -> Logger {
        let verbose = ProcessInfo.processInfo.environment["VBD_NBD_TEST_LOG"] != nil
        let logger = Logger(label: label) { label in
            var stderr = StreamLogHandler.standardError(label: label)
            stderr.logLevel = verbose ? .trace : .warning
            return MultiplexLogHandler([stderr, ServerLogHandler(sink: self)])
        }
        return logger
    }

    fileprivate func append(_ line: String) {
        let ready = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            if state.lines.count == Self.linesMax { state.lines.removeFirst(state.lines.count / 2) }
            state.lines.append(line)
            var ready: [CheckedContinuation<Void, Never>] = []
            state.waiters.removeAll { waiter in
                guard line.contains(waiter.pattern), waiter.condition() else { return false }
                ready.append(waiter.continuation)
                return true
            }
            return ready
        }
        for continuation in ready { continuation.resume() }
    }

    /// Returns once a line containing `pattern` has been logged (at once if one was already).
    func waitForLine(containing pattern: String) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let seen = state.withLock { state -> Bool in
                if state.lines.contains(where: { $0.contains(pattern) }) { return true }
                state.waiters.append(Waiter(pattern: pattern, condition: { true }, continuation: continuation))
                return false
            }
            if seen { continuation.resume() }
        }
    }

    /// Returns once `condition` holds: checked at once, then each time a line containing
    /// `pattern` is logged (the server logs that line after the change the condition reads).
    func waitForLine(containing pattern: String, until condition: @escaping @Sendable () -> Bool) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let holds = state.withLock { state -> Bool in
                if condition() { return true }
                state.waiters.append(Waiter(pattern: pattern, condition: condition, continuation: continuation))
                return false
            }
            if holds { continuation.resume() }
        }
    }
}

private struct ServerLogHandler: LogHandler {
    let sink: ServerLog
    var logLevel: Logger.Level = .trace
    var metadata: Logger.Metadata = [:]
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        sink.append("\(event.message)")
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

/// Runs `body` with a fresh server on a fresh store and always stops both.
func withServer<T>(layout: ServerFixture.Layout = .standard, tls: NBDServer.TLSMode = .off, tcp: Bool = false,
                   limits: NBDServer.ServerLimits = .init(),
                   exports: ((Store) throws -> any ExportProvider)? = nil,
                   _ body: (ServerFixture) async throws -> T) async throws -> T {
    let fixture = try await ServerFixture.start(layout: layout, tls: tls, tcp: tcp, limits: limits, exports: exports)
    do {
        let result = try await body(fixture)
        await fixture.stop()
        return result
    } catch {
        await fixture.stop()
        throw error
    }
}


/// A fresh store in a temporary directory with one 1 MiB volume `vol`, for tests that need an
/// export provider without a fixture's server; `close()` closes it and removes the directory.
final class TemporaryStore {
    let directory: URL
    let store: Store

    init() throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-store-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        store = try Store.initialize(path: directory.appendingPathComponent("store").path, options: ServerFixture.storeOptions())
        try store.createVolume(name: "vol", size: 1 << 20)
    }

    func close() {
        do { try store.close() } catch { Issue.record("closing the store: \(error)") }
        try? FileManager.default.removeItem(at: directory)
    }
}

/// Waits for `event`; if it has not happened after `limit`, records a failure and returns instead
/// of hanging the suite. The limit bounds a hang; it synchronises nothing (the event does).
func awaitEvent(_ description: String, within limit: Duration = .seconds(120),
                _ event: @escaping @Sendable () async -> Void) async {
    let happened = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
        let report = ReportOnce(continuation)
        Task { await event(); report.resume(returning: true) }
        Task { try? await Task.sleep(for: limit); report.resume(returning: false) }
    }
    if !happened { Issue.record("\(description) did not happen within \(limit)") }
}
