// Measures the RADOS chunk path against a real cluster: 4 KiB chunk stores (create), stores of bytes
// that exist already (verified share), verified reads and releases, serially and with N threads in
// flight. Usage (docs/RADOS.md):
//   vbd-rados-bench CEPH_CONF [COUNT] [THREADS]
import Dispatch
import Foundation
import VBDCore
import VBDRados

let arguments = CommandLine.arguments
guard arguments.count >= 2 else {
    FileHandle.standardError.write("usage: vbd-rados-bench CEPH_CONF [COUNT=2000] [THREADS=16]\n".data(using: .utf8)!)
    exit(2)
}
let count = arguments.count > 2 ? Int(arguments[2]) ?? 2000 : 2000
let threads = arguments.count > 3 ? Int(arguments[3]) ?? 16 : 16

func chunk(_ i: Int) -> [UInt8] {
    var g = SplitMix64(seed: UInt64(i) &* 0x9E37_79B9 &+ 17)
    return (0..<4096).map { _ in UInt8(truncatingIfNeeded: g.next()) }
}

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

do {
    let connection = try RadosConnection(RadosConnection.Options(configurationFile: arguments[1]))
    let namespace = "bench-\(getpid())-\(Int(now()))"
    let pool = try connection.openPool("vbd", namespace: namespace)
    let chunks = try RadosChunkObjects(pool: pool, group: "bench", hashSeed: 1)
    let inputs = (0..<count).map(chunk)
    let names = UnsafeMutableBufferPointer<ChunkObjectName>.allocate(capacity: count)
    names.initialize(repeating: ChunkObjectName(group: "bench", hash: .zero, collisionIndex: 0))
    defer { names.deallocate() }

    func phase(_ label: String, inFlight: Int, _ body: @escaping @Sendable (Int) throws -> Void) throws {
        let failures = UnsafeMutableBufferPointer<String?>.allocate(capacity: count)
        failures.initialize(repeating: nil)
        defer { failures.deallocate() }
        let start = now()
        if inFlight == 1 {
            for i in 0..<count { try body(i) }
        } else {
            // One thread per operation in flight (concurrentPerform would stop at the core count).
            nonisolated(unsafe) let f = failures
            let group = DispatchGroup()
            for worker in 0..<inFlight {
                group.enter()
                Thread.detachNewThread {
                    var i = worker
                    while i < count {
                        do { try body(i) } catch { f[i] = "\(error)" }
                        i += inFlight
                    }
                    group.leave()
                }
            }
            group.wait()
        }
        let seconds = now() - start
        if let failure = failures.compactMap({ $0 }).first { throw MicroBenchError(message: "\(label): \(failure)") }
        let latency = seconds / Double(count) * Double(inFlight) * 1e6
        let padded = label.padding(toLength: 38, withPad: " ", startingAt: 0)
        print(padded + String(format: "%3d in flight: %7.0f ops/s %7.0f us per op", inFlight, Double(count) / seconds, latency))
    }
    struct MicroBenchError: Error { var message: String }
    nonisolated(unsafe) let sharedNames = names
    for inFlight in [1, threads] {
        let generation = UInt64(inFlight)
        try phase("store new 4 KiB chunk", inFlight: inFlight) { i in
            let outcome = try chunks.store(inputs[i], reference: ChunkReference(family: "a\(inFlight)", chunk: UInt64(i), generation: generation))
            guard outcome.created else { throw MicroBenchError(message: "chunk \(i) existed") }
            sharedNames[i] = outcome.name
        }
        try phase("store existing chunk (verified share)", inFlight: inFlight) { i in
            let outcome = try chunks.store(inputs[i], reference: ChunkReference(family: "b\(inFlight)", chunk: UInt64(i), generation: generation))
            guard !outcome.created else { throw MicroBenchError(message: "chunk \(i) was not shared") }
        }
        try phase("read + verify chunk", inFlight: inFlight) { i in
            guard try chunks.read(sharedNames[i]) == inputs[i] else { throw MicroBenchError(message: "chunk \(i) read back wrong") }
        }
        try phase("release (refcount.put)", inFlight: inFlight) { i in
            try chunks.release(sharedNames[i], reference: ChunkReference(family: "b\(inFlight)", chunk: UInt64(i), generation: generation))
        }
        try phase("release last (put removes object)", inFlight: inFlight) { i in
            try chunks.release(sharedNames[i], reference: ChunkReference(family: "a\(inFlight)", chunk: UInt64(i), generation: generation))
        }
    }
    let left = try chunks.objectNames().count
    print("objects left in \(namespace): \(left)")
    pool.close()
    connection.close()
    exit(left == 0 ? 0 : 1)
} catch {
    FileHandle.standardError.write("vbd-rados-bench: \(error)\n".data(using: .utf8)!)
    exit(1)
}
