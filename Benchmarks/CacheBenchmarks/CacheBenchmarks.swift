// Micro benchmarks of the universal block cache (ordo-one/package-benchmark).
// Run from Benchmarks/: `swift package benchmark --target CacheBenchmarks`.
// Without the Benchmarks package, scripts/measure-cache.sh measures the same three things.
import Benchmark
import Dispatch
import VBDCache

private let blockBytes = 4096
private let residentBlocks = 8192                     // 32 MiB of blocks, all resident: every read hits

private func makeBlock(_ key: UInt64) -> [UInt8] {
    var bytes = [UInt8](repeating: UInt8(truncatingIfNeeded: key), count: blockBytes)
    bytes.withUnsafeMutableBytes { $0.storeBytes(of: key, toByteOffset: 0, as: UInt64.self) }
    return bytes
}

/// A cache with `residentBlocks` blocks, large enough that nothing is evicted.
private func makeWarmCache() -> BlockCache {
    let cache = BlockCache(configuration: .init(capacityBytes: 128 << 20))
    let owner = CacheOwner(volume: 1, group: 1)
    for key in 0..<UInt64(residentBlocks) {
        makeBlock(key).withUnsafeBytes { cache.insert(key, bytes: $0, owner: owner) }
    }
    return cache
}

/// `count` reads of Zipf(0.9)-distributed resident keys, precomputed so sampling is not measured.
private func zipfKeys(_ count: Int, seed: UInt64) -> [UInt64] {
    CacheWorkloads.zipf(itemCount: residentBlocks, count: count, exponent: 0.9, seed: seed).map {
        $0.key % UInt64(residentBlocks)
    }
}

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal, .instructions],
        warmupIterations: 1,
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 50)

    Benchmark("Hit 4 KiB, 1 thread") { benchmark in
        let cache = makeWarmCache()
        let keys = zipfKeys(benchmark.scaledIterations.count, seed: 1)
        let owner = CacheOwner(volume: 1, group: 1)
        var buffer = [UInt8](repeating: 0, count: blockBytes)
        benchmark.startMeasurement()
        buffer.withUnsafeMutableBytes { out in
            for key in keys { blackHole(cache.read(key, into: out, owner: owner)) }
        }
    }

    Benchmark("Hit 4 KiB, 2 threads (throughput counts both)") { benchmark in
        let cache = makeWarmCache()
        let perThread = benchmark.scaledIterations.count / 2
        let keys = [zipfKeys(perThread, seed: 1), zipfKeys(perThread, seed: 2)]
        benchmark.startMeasurement()
        DispatchQueue.concurrentPerform(iterations: 2) { thread in
            let owner = CacheOwner(volume: UInt64(thread), group: 1)
            var buffer = [UInt8](repeating: 0, count: blockBytes)
            buffer.withUnsafeMutableBytes { out in
                for key in keys[thread] { blackHole(cache.read(key, into: out, owner: owner)) }
            }
        }
    }

    Benchmark("Insert + evict 4 KiB (LZ4 into last chance)") { benchmark in
        let cache = BlockCache(configuration: .init(capacityBytes: 16 << 20, lastChanceCapacityBytes: 8 << 20))
        let owner = CacheOwner(volume: 1, group: 1)
        let block = makeBlock(7)          // content does not matter to the cache; LZ4 cost does
        for key in 0..<UInt64(8192) { block.withUnsafeBytes { cache.insert(key, bytes: $0, owner: owner) } }
        var next: UInt64 = 1 << 32
        benchmark.startMeasurement()
        block.withUnsafeBytes { bytes in
            for _ in benchmark.scaledIterations {
                cache.insert(next, bytes: bytes, owner: owner)
                next += 1
            }
        }
    }

    Benchmark("Insert + evict 4 KiB (no last chance)") { benchmark in
        let cache = BlockCache(configuration: .init(capacityBytes: 16 << 20, lastChanceCapacityBytes: 0))
        let owner = CacheOwner(volume: 1, group: 1)
        let block = makeBlock(7)
        for key in 0..<UInt64(8192) { block.withUnsafeBytes { cache.insert(key, bytes: $0, owner: owner) } }
        var next: UInt64 = 1 << 32
        benchmark.startMeasurement()
        block.withUnsafeBytes { bytes in
            for _ in benchmark.scaledIterations {
                cache.insert(next, bytes: bytes, owner: owner)
                next += 1
            }
        }
    }
}
