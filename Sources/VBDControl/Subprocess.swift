import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Runs helper programs (qemu-img) with bounded capture of their output.
enum Subprocess {
    /// The first executable named `name` on PATH.
    static func find(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for dir in path.split(separator: ":") where !dir.isEmpty {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        return nil
    }

    struct Outcome {
        var status: Int32
        var standardOutput: [UInt8]
        var standardError: String
    }

    /// Reads `fd` until EOF in bounded chunks.
    private static func drain(_ fd: Int32, _ consume: ([UInt8]) -> Void) {
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }
            consume(Array(chunk[0..<n]))
        }
    }

    /// Runs `executable` to completion. Each output stream keeps at most `captureBytesMax` bytes
    /// (the rest is read and dropped, so the child never blocks on a full pipe). `onOutput` sees
    /// every chunk of standard output as it arrives.
    static func run(_ executable: String, _ arguments: [String], captureBytesMax: Int = 1 << 20,
                    onOutput: (@Sendable ([UInt8]) -> Void)? = nil) throws(ControlFailure) -> Outcome {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = FileHandle.nullDevice
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        do { try process.run() } catch {
            throw ControlFailure(code: "io", message: "cannot run \(executable): \(error)")
        }
        // This process's copies of the write ends must go, or the reads below never see EOF.
        try? out.fileHandleForWriting.close()
        try? err.fileHandleForWriting.close()
        let captured = Mutex<(out: [UInt8], err: [UInt8])>(([], []))
        let errorDrained = DispatchSemaphore(value: 0)
        // Standard error on its own thread, standard output here: neither pipe can fill up and
        // stall the child while we wait on the other.
        let errFD = err.fileHandleForReading.fileDescriptor
        Thread.detachNewThread {
            drain(errFD) { bytes in
                captured.withLock { $0.err += bytes.prefix(max(0, captureBytesMax - $0.err.count)) }
            }
            errorDrained.signal()
        }
        drain(out.fileHandleForReading.fileDescriptor) { bytes in
            onOutput?(bytes)
            captured.withLock { $0.out += bytes.prefix(max(0, captureBytesMax - $0.out.count)) }
        }
        errorDrained.wait()
        process.waitUntilExit()
        let (stdout, stderr) = captured.withLock { ($0.out, $0.err) }
        return Outcome(status: process.terminationStatus, standardOutput: stdout,
                       standardError: String(decoding: stderr, as: UTF8.self))
    }
}

/// Bridges an async call into a plain thread (control requests run on threads, the NBD server's
/// start and stop are async).
func runBlocking<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
    let result = Mutex<Result<T, any Error>?>(nil)
    let done = DispatchSemaphore(value: 0)
    Task {
        let r: Result<T, any Error>
        do { r = .success(try await body()) } catch { r = .failure(error) }
        result.withLock { $0 = r }
        done.signal()
    }
    done.wait()
    return try result.withLock { $0! }.get()
}
