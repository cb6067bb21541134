// MARK: - Notes on the design
//
// The codec benchmarks run on real file-system blocks, not on random or constant bytes: hashing
// does not care, but LZ4's speed and ratio depend entirely on the data. The data set is the ext4
// image that `scripts/make-dataset.sh` builds from /usr/share and /usr/lib (see
// Benchmarks/README.md for its zero, duplicate and compression ratios).
//
// Lookup order for the image (first hit wins):
//   1. $VBD_BENCH_DATASET (any file; read as 4 KiB blocks)
//   2. fixtures/large/dataset.img      (512 MiB, git-ignored, `scripts/make-dataset.sh`)
//   3. fixtures/small/dataset-small.img (committed, <= 8 MiB)
//
// Zero blocks are dropped: the store never hashes or compresses them (docs/INVARIANTS.md), so timing them
// would flatter every number. The working set is capped at `blocksMax` blocks (256 MiB), taken
// at an even stride over the whole image. That is larger than L2 (2 MiB per core here) and about
// the size of the L3 this VM reports (260 MiB, shared with other guests), so the numbers are for
// blocks that are not hot in cache, as on a server's write and uncached-read paths.

import Foundation
import VBDCore

/// Non-zero 4 KiB blocks from the benchmark data set, loaded once per process.
final class DataSet: @unchecked Sendable {
    static let blockBytes = 4096
    /// 65536 blocks = 256 MiB: beyond L2 and about the reported L3; loads in about a second.
    static let blocksMax = 65536

    static let shared = DataSet()

    /// The file the blocks came from.
    let path: String
    /// `count * blockBytes` bytes of non-zero blocks, back to back, in image order.
    let bytes: UnsafeMutableRawBufferPointer
    let count: Int
    /// Each block LZ4-compressed, with its compressed length (for the decompress benchmark).
    let compressed: [[UInt8]]
    /// Each block's XXH3-128 with `benchmarkSeed` (for the verify benchmark).
    let hashes: [ContentHash]

    private init() {
        path = DataSet.locate()
        guard let handle = FileHandle(forReadingAtPath: path) else {
            fatalError("StoreBenchmarks: cannot open data set \(path)")
        }
        defer { try? handle.close() }
        let blockBytes = DataSet.blockBytes
        let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: DataSet.blocksMax * blockBytes, alignment: 4096)
        var n = 0
        // Stride through the image so that a 512 MiB image contributes blocks from its whole
        // length (all file types), not only its first 64 MiB.
        let fileBytes = (try? handle.seekToEnd()) ?? 0
        let totalBlocks = Int(fileBytes) / blockBytes
        let chunkBlocks = 256  // read 1 MiB at a time
        let strideChunks = max(1, totalBlocks / DataSet.blocksMax)
        var chunkStart = 0
        while n < DataSet.blocksMax && chunkStart < totalBlocks {
            try? handle.seek(toOffset: UInt64(chunkStart * blockBytes))
            guard let data = try? handle.read(upToCount: chunkBlocks * blockBytes), !data.isEmpty else { break }
            data.withUnsafeBytes { raw in
                var offset = 0
                while offset + blockBytes <= raw.count && n < DataSet.blocksMax {
                    let block = UnsafeRawBufferPointer(rebasing: raw[offset..<offset + blockBytes])
                    if !isAllZero(block) {
                        UnsafeMutableRawBufferPointer(rebasing: storage[n * blockBytes..<(n + 1) * blockBytes])
                            .copyMemory(from: block)
                        n += 1
                    }
                    offset += blockBytes
                }
            }
            chunkStart += chunkBlocks * strideChunks
        }
        precondition(n > 0, "StoreBenchmarks: data set \(path) has no non-zero 4 KiB block")
        // Shuffle (seeded, so every run sees the same order): a benchmark sample covers 1000
        // consecutive blocks, and in image order those are all one kind (an inode table, a
        // shared library, gzip'd man pages), which makes the distribution multi-modal. Shuffled,
        // each sample is a mix and p50 is close to the mean cost over the data set.
        var generator = SplitMix64(seed: 0x5eed_da7a_5e75_0001)
        let swapBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 4096)
        defer { swapBuffer.deallocate() }
        for i in stride(from: n - 1, to: 0, by: -1) {
            let j = Int(generator.next() % UInt64(i + 1))
            guard j != i else { continue }
            swapBuffer.copyMemory(from: UnsafeRawBufferPointer(storage.block(i)))
            storage.block(i).copyMemory(from: UnsafeRawBufferPointer(storage.block(j)))
            storage.block(j).copyMemory(from: UnsafeRawBufferPointer(swapBuffer))
        }
        bytes = storage
        count = n
        var compressed: [[UInt8]] = []
        compressed.reserveCapacity(n)
        let bound = BlockCompression.bound(blockBytes)
        var scratch = [UInt8](repeating: 0, count: bound)
        for i in 0..<n {
            let length = scratch.withUnsafeMutableBytes { dst in
                BlockCompression.compress(UnsafeRawBufferPointer(storage.block(i)), into: dst)
            }
            compressed.append(Array(scratch[0..<(length ?? 0)]))
        }
        self.compressed = compressed
        hashes = (0..<n).map { HashFunction.xxh3.hash(UnsafeRawBufferPointer(storage.block($0)), seed: benchmarkSeed) }
    }

    /// Block `i` (0 ..< count).
    @inline(__always)
    func block(_ i: Int) -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(bytes.block(i)) }

    /// Bytes of all blocks divided by bytes after LZ4 (blocks that do not shrink count as stored raw).
    var compressionRatio: Double {
        var stored = 0
        for c in compressed { stored += (c.isEmpty || c.count >= DataSet.blockBytes) ? DataSet.blockBytes : c.count }
        return Double(count * DataSet.blockBytes) / Double(stored)
    }

    private static func locate() -> String {
        if let path = ProcessInfo.processInfo.environment["VBD_BENCH_DATASET"], !path.isEmpty {
            return path
        }
        // #filePath = <repo>/Benchmarks/StoreBenchmarks/DataSet.swift
        let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        for candidate in ["fixtures/large/dataset.img", "fixtures/small/dataset-small.img"] {
            let path = repo.appendingPathComponent(candidate).path
            if FileManager.default.fileExists(atPath: path) { return path }
        }
        fatalError("StoreBenchmarks: no data set; run scripts/make-dataset.sh or set VBD_BENCH_DATASET")
    }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always)
    fileprivate func block(_ i: Int) -> UnsafeMutableRawBufferPointer {
        UnsafeMutableRawBufferPointer(rebasing: self[i * DataSet.blockBytes..<(i + 1) * DataSet.blockBytes])
    }
}
