import Foundation
import Synchronization
import VBDCore
import Testing
import VBDControl

#if canImport(Glibc)
import Glibc
#endif

/// Runs the built `vbdtool` binary (not its library code) the way an operator would.
enum Tool {
    /// `$VBDTOOL`, else `vbdtool` next to the test bundle (SwiftPM puts both in .build/<triple>/debug),
    /// else `.build/debug/vbdtool` under the package root.
    static let path: String = {
        if let explicit = ProcessInfo.processInfo.environment["VBDTOOL"], !explicit.isEmpty { return explicit }
        var candidates: [String] = []
        let bundleDir = Bundle.main.bundleURL.path
        candidates.append(bundleDir + "/vbdtool")
        candidates.append(URL(fileURLWithPath: bundleDir).deletingLastPathComponent().path + "/vbdtool")
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        candidates.append(root.path + "/.build/debug/vbdtool")
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) } ?? candidates.last!
    }()

    struct Outcome {
        var status: Int32
        var stdout: String
        var stderr: String
        var succeeded: Bool { status == 0 }

        func json<T: Decodable>(_ type: T.Type) throws -> T {
            try JSONDecoder().decode(T.self, from: Data(stdout.utf8))
        }

        /// The `{"error": {...}}` object `--json` prints on stderr.
        func jsonError() throws -> ControlFailure {
            try JSONDecoder().decode([String: ControlFailure].self, from: Data(stderr.utf8))["error"]!
        }
    }

    /// Runs vbdtool with `arguments`; the store comes from `store` through `--store` when given.
    @discardableResult
    static func run(_ arguments: [String], store: String? = nil, environment: [String: String] = [:],
                    directory: String? = nil, timeoutSeconds: Double = 120) throws -> Outcome {
        var args = arguments
        if let store { args += ["--store", store] }
        return try Subprocess.run(path, args, environment: environment, directory: directory, timeoutSeconds: timeoutSeconds)
    }
}

enum Subprocess {
    /// Runs a program to completion with output captured in temporary files (no pipe can fill
    /// up and stall it), killing it after `timeoutSeconds`.
    static func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:],
                    directory: String? = nil, timeoutSeconds: Double = 120) throws -> Tool.Outcome {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        env.removeValue(forKey: "VBD_STORE")
        env["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin:" + (env["PATH"] ?? "")   // Debian's python3 has the nbd module
        for (k, v) in environment { env[k] = v }
        process.environment = env
        if let directory { process.currentDirectoryURL = URL(fileURLWithPath: directory) }
        let outPath = NSTemporaryDirectory() + "vbdt-out-\(UUID().uuidString)"
        let errPath = NSTemporaryDirectory() + "vbdt-err-\(UUID().uuidString)"
        _ = FileManager.default.createFile(atPath: outPath, contents: nil)
        _ = FileManager.default.createFile(atPath: errPath, contents: nil)
        defer {
            try? FileManager.default.removeItem(atPath: outPath)
            try? FileManager.default.removeItem(atPath: errPath)
        }
        process.standardOutput = FileHandle(forWritingAtPath: outPath)
        process.standardError = FileHandle(forWritingAtPath: errPath)
        process.standardInput = FileHandle.nullDevice
        try process.run()
        // Waits for the exit itself; the timer only turns a hung program into a failure.
        let pid = process.processIdentifier
        let timedOut = Mutex(false)
        let timer = DispatchWorkItem {
            timedOut.withLock { $0 = true }
            kill(pid, SIGKILL)
        }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeoutSeconds, execute: timer)
        process.waitUntilExit()
        timer.cancel()
        if timedOut.withLock({ $0 }) {
            throw HarnessError("\(executable) \(arguments) did not finish in \(timeoutSeconds) s")
        }
        let out = (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? ""
        let err = (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? ""
        return Tool.Outcome(status: process.terminationStatus, stdout: out, stderr: err)
    }

    static func find(_ name: String) -> String? {
        for dir in ["/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin"] where FileManager.default.isExecutableFile(atPath: "\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        return nil
    }
}

struct HarnessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A temporary directory (short path: unix socket paths are limited to 107 bytes), removed at the end.
final class TemporaryDirectory {
    let path: String
    init() throws {
        var template = Array("/tmp/vbdt-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw HarnessError("mkdtemp failed")
        }
        path = String(cString: made)
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// A fresh store inside this directory, initialised through the CLI.
    func initializedStore(_ name: String = "store") throws -> String {
        let store = path + "/" + name
        let outcome = try Tool.run(["init"], store: store)
        guard outcome.succeeded else { throw HarnessError("init failed: \(outcome.stderr)") }
        return store
    }
}

/// `vbdtool serve` running in the background for one test.
final class RunningServer {
    let process = Process()
    let store: String
    let nbdSocket: String
    let logPath: String

    init(store: String, nbdSocket: String, extraArguments: [String] = []) throws {
        self.store = store
        self.nbdSocket = nbdSocket
        logPath = store + ".serve.log"
        process.executableURL = URL(fileURLWithPath: Tool.path)
        process.arguments = ["serve", "--store", store, "--unix", nbdSocket, "--cache-size", "64M"] + extraArguments
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let stderr = Pipe()
        process.standardError = stderr
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        // Ready when the server logs "serving" (its NBD and control listeners are up). A reader
        // thread copies its output to the log and reports that line, or the end of the output.
        let ready = DispatchSemaphore(value: 0)
        let sawServing = Mutex(false)
        let logPath = self.logPath
        let output = stderr.fileHandleForReading
        Thread.detachNewThread {
            guard let log = FileHandle(forWritingAtPath: logPath) else { ready.signal(); return }
            var pending = Data(), reported = false
            while case let chunk = output.availableData, !chunk.isEmpty {
                log.write(chunk)
                guard !reported else { continue }
                pending.append(chunk)
                if String(decoding: pending, as: UTF8.self).contains("serving") {
                    sawServing.withLock { $0 = true }
                    reported = true
                    ready.signal()
                }
            }
            if !reported { ready.signal() }
            try? log.close()
        }
        // The bound only turns a hung server into a failure.
        if ready.wait(timeout: .now() + 120) == .success && sawServing.withLock({ $0 }) { return }
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        throw HarnessError("vbdtool serve did not start: \(log)")
    }

    var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    func uri(_ export: String) -> String { "nbd+unix:///\(export)?socket=\(nbdSocket)" }

    /// Sends `signal` (SIGTERM by default), then waits; returns the exit status.
    @discardableResult
    func stop(signal: Int32 = SIGTERM) -> Int32 {
        if process.isRunning {
            let pid = process.processIdentifier
            kill(pid, signal)
            // A server that ignores the signal is killed after a bound, never waited on forever.
            let killer = DispatchWorkItem { kill(pid, SIGKILL) }
            DispatchQueue.global().asyncAfter(deadline: .now() + 60, execute: killer)
            process.waitUntilExit()
            killer.cancel()
        }
        process.waitUntilExit()
        return process.terminationStatus
    }

    deinit { _ = stop() }
}

/// Writes `bytes` at `offset` of the file at `path` (creating it), leaving the rest sparse.
func writeBytes(_ bytes: [UInt8], at offset: UInt64, to path: String) throws {
    let fd = open(path, O_WRONLY | O_CREAT, 0o644)
    guard fd >= 0 else { throw HarnessError("open \(path): \(errno)") }
    defer { close(fd) }
    let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress!, $0.count, off_t(offset)) }
    guard n == bytes.count else { throw HarnessError("pwrite \(path)") }
}

func fileBytes(_ path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
}

/// Deterministic pseudo-random bytes (SplitMix64), so failures replay.
func patternBytes(count: Int, seed: UInt64) -> [UInt8] {
    var generator = SplitMix64(seed: seed)
    var out = [UInt8]()
    out.reserveCapacity(count)
    while out.count < count {
        withUnsafeBytes(of: generator.next()) { out.append(contentsOf: $0.prefix(count - out.count)) }
    }
    return out
}

/// Allocated bytes of a file (st_blocks x 512).
func allocatedBytes(_ path: String) -> UInt64 {
    var st = stat()
    guard stat(path, &st) == 0 else { return 0 }
    return UInt64(st.st_blocks) * 512
}

/// lseek(SEEK_DATA): the first data offset at or after `offset`, or nil if only holes follow.
func nextData(_ path: String, from offset: UInt64) -> UInt64? {
    let fd = open(path, O_RDONLY)
    defer { close(fd) }
    let r = lseek(fd, off_t(offset), 3 /* SEEK_DATA */)
    return r < 0 ? nil : UInt64(r)
}
