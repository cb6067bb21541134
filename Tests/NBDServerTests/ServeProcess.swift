import Foundation
import NBDProtocol
import Synchronization
import Testing

/// `vbdtool serve` on a fresh store (volume `vol`, 64 MiB, all zeroes) in a process of its own,
/// on a unix socket: memory bounds are measured on that process alone (its VmRSS), not on the
/// test runner, which runs other suites at the same time.
final class ServeProcess: @unchecked Sendable {
    // @unchecked: `log` is guarded by its Mutex; the rest is set once in `start`.
    let directory: URL
    let storePath: String
    let socketPath: String
    let process = Process()
    private let log = Mutex("")

    /// vbdtool: $VBDTOOL, else next to the test bundle, else the package's debug build.
    static let vbdtool: String = {
        if let explicit = ProcessInfo.processInfo.environment["VBDTOOL"], !explicit.isEmpty { return explicit }
        let bundle = URL(fileURLWithPath: Bundle.main.bundleURL.path)
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let candidates = [bundle.appendingPathComponent("vbdtool").path,
                          bundle.deletingLastPathComponent().appendingPathComponent("vbdtool").path,
                          root.appendingPathComponent(".build/debug/vbdtool").path]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates.last!
    }()

    private init(directory: URL) {
        self.directory = directory
        storePath = directory.appendingPathComponent("store").path
        socketPath = directory.appendingPathComponent("nbd.sock").path
    }

    /// Creates the store, starts the server and returns once it has logged that it serves.
    static func start() async throws -> ServeProcess {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-serve-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let served = ServeProcess(directory: directory)
        for arguments in [["init", "--store", served.storePath], ["create", "vol", "--size", "64M", "--store", served.storePath]] {
            let setup = Process()
            setup.executableURL = URL(fileURLWithPath: vbdtool)
            setup.arguments = arguments
            setup.standardOutput = FileHandle.nullDevice
            try setup.run()
            setup.waitUntilExit()
            try #require(setup.terminationStatus == 0, "vbdtool \(arguments) failed")
        }
        try await served.launch()
        return served
    }

    private func launch() async throws {
        process.executableURL = URL(fileURLWithPath: Self.vbdtool)
        process.arguments = ["serve", "--store", storePath, "--unix", socketPath, "--cache-size", "16M"]
        process.standardOutput = FileHandle.nullDevice
        let stderr = Pipe()
        process.standardError = stderr
        // Ready when serve logs "serving" (after its NBD and control listeners are up); failed
        // when its stderr ends first (it exited).
        let ready: Bool = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let report = ReportOnce(continuation)
            stderr.fileHandleForReading.readabilityHandler = { [self] handle in
                let data = handle.availableData
                if data.isEmpty {
                    handle.readabilityHandler = nil
                    report.resume(returning: false)
                    return
                }
                let text = log.withLock { log in
                    log += String(decoding: data, as: UTF8.self)
                    if log.count > 1 << 20 { log.removeFirst(log.count - (1 << 19)) }
                    return log
                }
                if text.contains("serving") { report.resume(returning: true) }
            }
            do { try process.run() } catch { report.resume(returning: false) }
        }
        try #require(ready, "vbdtool serve did not start: \(log.withLock { $0 })")
    }

    /// The server process's resident set (VmRSS in /proc/PID/status), in bytes.
    func residentBytes() throws -> Int {
        let status = try String(contentsOfFile: "/proc/\(process.processIdentifier)/status", encoding: .utf8)
        let line = try #require(status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") })
        let kilobytes = try #require(Int(line.split(separator: " ", omittingEmptySubsequences: true)[1]))
        return kilobytes << 10
    }

    /// A client on a second connection reads 4 KiB of `vol` and gets `expected`: the server
    /// still serves. Its read goes through the same I/O pool after every request the server
    /// accepted before it, so once it is answered those have run.
    func assertStillServes(expecting expected: [UInt8] = [UInt8](repeating: 0, count: 4096)) throws {
        let client = try RawClient(socketPath: socketPath)
        let export = try #require(client.enterTransmission(export: "vol"))
        #expect(export.size == 64 << 20)
        client.sendRequest(NBDCommand.read.rawValue, handle: 99, offset: 0, length: 4096)
        let reply = try #require(client.receiveSimpleReply())
        #expect(reply.error == 0 && reply.handle == 99)
        #expect(client.receive(4096) == expected)
        client.sendRequest(NBDCommand.disconnect.rawValue, handle: 100, offset: 0, length: 0)
        #expect(client.waitForClose())
    }

    /// SIGTERM; the server must stop cleanly (exit 0).
    func stop() {
        if process.isRunning {
            process.terminate()
            process.waitUntilExit()
            #expect(process.terminationStatus == 0, "vbdtool serve: \(log.withLock { $0 })")
        }
        try? FileManager.default.removeItem(at: directory)
    }
}

/// Runs `body` with a served store in its own process and always stops it.
func withServeProcess(_ body: (ServeProcess) async throws -> Void) async throws {
    let served = try await ServeProcess.start()
    defer { served.stop() }
    try await body(served)
}

/// Resumes a continuation once; later reports are ignored.
final class ReportOnce: @unchecked Sendable {
    // @unchecked: `continuation` is guarded by `lock`.
    private let lock = NSLock()
    private var continuation: CheckedContinuation<Bool, Never>?

    init(_ continuation: CheckedContinuation<Bool, Never>) { self.continuation = continuation }

    func resume(returning value: Bool) {
        lock.lock()
        let pending = continuation
        continuation = nil
        lock.unlock()
        pending?.resume(returning: value)
    }
}
