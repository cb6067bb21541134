import Foundation
import Synchronization

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
        let captured = Mutex<(out: [UInt8], err: [UInt8])>(([], []))
        let finished = DispatchGroup()
        for (pipe, isError) in [(out, false), (err, true)] {
            finished.enter()
            pipe.fileHandleForReading.readabilityHandler = { handle in
                let chunk = handle.availableData
                if chunk.isEmpty {
                    handle.readabilityHandler = nil
                    finished.leave()
                    return
                }
                let bytes = [UInt8](chunk)
                if !isError { onOutput?(bytes) }
                captured.withLock { buffers in
                    if isError {
                        buffers.err += bytes.prefix(max(0, captureBytesMax - buffers.err.count))
                    } else {
                        buffers.out += bytes.prefix(max(0, captureBytesMax - buffers.out.count))
                    }
                }
            }
        }
        do { try process.run() } catch {
            out.fileHandleForReading.readabilityHandler = nil
            err.fileHandleForReading.readabilityHandler = nil
            throw ControlFailure(code: "io", message: "cannot run \(executable): \(error)")
        }
        process.waitUntilExit()
        finished.wait()
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
