// Store benchmarks. Each scaled iteration handles one 4 KiB block, so the default (scaled) output
// reads "per block"; throughput is blocks per second.
//
//   cd Benchmarks && swift package --allow-writing-to-package-directory benchmark --target StoreBenchmarks
//
// Names have no spaces or slashes: package-benchmark 1.38.1 writes threshold files with them
// replaced by "_" but looks them up by the raw name, so `thresholds check` would find nothing.
// The comment above each benchmark gives the long description.
//
// Codec level (VBDCore only): the per-block costs every write and every uncached read pays.
// Store level (VBDStore): StoreBenchmarks+Store.swift.

import Benchmark
import VBDCore

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 10_000
    )
    codecBenchmarks()
    storeBenchmarks()
}

/// A fixed, arbitrary seed: what a store would draw at `init`.
let benchmarkSeed: UInt64 = 0x5eed_0a6c_15d6_0001

func codecBenchmarks() {
    // Codec: XXH3-128 dispatch, seeded, 4 KiB
    Benchmark("Codec.xxh3.4KiB") { benchmark in
        let data = DataSet.shared
        var i = 0
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(HashFunction.xxh3.hash(data.block(i), seed: benchmarkSeed))
            i += 1
            if i == data.count { i = 0 }
        }
    }

    // Codec: LZ4 compress, 4 KiB
    Benchmark("Codec.lz4Compress.4KiB") { benchmark in
        let data = DataSet.shared
        let bound = BlockCompression.bound(DataSet.blockBytes)
        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: bound, alignment: 64)
        defer { destination.deallocate() }
        var i = 0
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            blackHole(BlockCompression.compress(data.block(i), into: destination))
            i += 1
            if i == data.count { i = 0 }
        }
    }

    // Codec: LZ4 decompress, 4 KiB
    Benchmark("Codec.lz4Decompress.4KiB") { benchmark in
        let data = DataSet.shared
        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: DataSet.blockBytes, alignment: 4096)
        defer { destination.deallocate() }
        var i = 0
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let c = data.compressed[i]
            if !c.isEmpty {
                let ok = c.withUnsafeBytes { BlockCompression.decompress($0, into: destination) }
                precondition(ok)
            }
            i += 1
            if i == data.count { i = 0 }
        }
    }

    // What an uncached read costs on the CPU: decompress, then verify against the content hash
    // (docs/INVARIANTS.md, verified reads). Blocks that LZ4 could not shrink are copied and hashed.
    // Codec: LZ4 decompress + XXH3-128 verify, 4 KiB
    Benchmark("Codec.lz4DecompressVerify.4KiB") { benchmark in
        let data = DataSet.shared
        let expected = data.hashes
        let destination = UnsafeMutableRawBufferPointer.allocate(byteCount: DataSet.blockBytes, alignment: 4096)
        defer { destination.deallocate() }
        var i = 0
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let c = data.compressed[i]
            if c.isEmpty || c.count >= DataSet.blockBytes {
                destination.copyMemory(from: data.block(i))
            } else {
                let ok = c.withUnsafeBytes { BlockCompression.decompress($0, into: destination) }
                precondition(ok)
            }
            precondition(HashFunction.xxh3.hash(UnsafeRawBufferPointer(destination), seed: benchmarkSeed) == expected[i])
            i += 1
            if i == data.count { i = 0 }
        }
    }

    // What a unique write costs on the CPU before any I/O: zero check, hash, compress.
    // Codec: zero check + XXH3-128 + LZ4 compress, 4 KiB
    Benchmark("Codec.zeroHashCompress.4KiB") { benchmark in
        let data = DataSet.shared
        let destination = UnsafeMutableRawBufferPointer.allocate(
            byteCount: BlockCompression.bound(DataSet.blockBytes), alignment: 64)
        defer { destination.deallocate() }
        var i = 0
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let block = data.block(i)
            if !isAllZero(block) {
                blackHole(HashFunction.xxh3.hash(block, seed: benchmarkSeed))
                blackHole(BlockCompression.compress(block, into: destination))
            }
            i += 1
            if i == data.count { i = 0 }
        }
    }
}
