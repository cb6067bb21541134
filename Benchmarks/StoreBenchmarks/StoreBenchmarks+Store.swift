// MARK: - Notes on the design
//
// Store-level benchmarks through the public VBDStore API (`Store`, `VolumeDevice`), on a real
// store directory in $VBD_BENCH_TMP (default /tmp) that setup creates and teardown removes.
// Every volume is 1 TiB; blocks are 4 KiB; written contents are data set blocks.
//
// What each one costs, and what it does not:
//   - unique write: zero test, XXH3-128, dedup-index miss, LZ4, sector allocation, pwrite to
//     the data file, journal record; the implicit flush (fsync of data file and journal) every
//     `pendingJournalBytesMax` of journal is included, amortized. No FUA, no explicit flush.
//     Each block gets a fresh 8-byte counter in its first bytes so that it is unique.
//   - random overwrite, 64 KiB incompressible: what one scheduled piece of a large write costs;
//     includes generating the random bytes (SplitMix64, ~8 K words), cache insertion and the
//     release of the blocks it replaces.
//   - duplicate write: same content already stored in another LBA: hash, index hit, byte
//     comparison against the stored chunk (read back, decompressed, verified), refcount.
//   - cached read: `Store.Options.cache` holds the block: either the product's universal cache
//     (VBDCache.BlockCache, 256 MiB, every block resident) or a plain dictionary cache in this
//     file, which shows the store's own overhead around a hit.
//   - uncached read: no cache; the data file is warm in the OS page cache, so this is pread +
//     LZ4 decompress + XXH3-128 verify + the map lookup, not disk latency.
//   - snapshot / share of a 1 TiB volume with 64 MiB written: O(1) map work plus the flush that
//     makes a control operation durable (two fsyncs); on this VM's disk the fsyncs dominate.
//   - read at share depth 1 vs 100: a chain volume -> snapshot -> share -> snapshot -> ... ;
//     reads of the same blocks from the first and the hundredth share (cached in BlockCache, so
//     the map lookup is what differs). docs/INVARIANTS.md promises these cost the same.

import Benchmark
import Foundation
import Synchronization
import VBDCache
import VBDCore
import VBDStore

let volumeBytes: UInt64 = 1 << 40
let blockBytes = DataSet.blockBytes

/// A ChunkCache that keeps everything: enough to measure a hit. Not the product's cache.
final class DictionaryChunkCache: ChunkCache {
    private let entries = Mutex<[UInt64: [UInt8]]>([:])
    /// Counts removals, so an insert that raced with one is skipped (the ChunkCache contract).
    private let removals = Mutex<UInt64>(0)

    func lookup(_ key: UInt64, into buffer: UnsafeMutableRawBufferPointer, volume: UInt64, group: SharingGroupID,
                countingMisses: Bool) -> CacheLookup {
        entries.withLock { entries in
            guard let bytes = entries[key], bytes.count == buffer.count else { return .miss }
            bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
            return .hit
        }
    }

    func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, volume: UInt64, group: SharingGroupID) {
        entries.withLock { $0[key] = Array(bytes) }
    }

    func remove(_ key: UInt64) {
        _ = entries.withLock { $0.removeValue(forKey: key) }
        removals.withLock { $0 &+= 1 }
    }

    func removalToken(for key: UInt64) -> UInt64 { removals.withLock { $0 } }

    func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, volume: UInt64, group: SharingGroupID, ifUnremovedSince token: UInt64) {
        removals.withLock { r in
            if r == token { entries.withLock { $0[key] = Array(bytes) } }
        }
    }
}

/// One store directory for one benchmark: created in setup, closed and removed in teardown.
final class StoreFixture: @unchecked Sendable {
    nonisolated(unsafe) static var current: StoreFixture?

    let path: String
    let store: Store
    let volume: VolumeDevice
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: DataSet.blockBytes, alignment: 4096)
    var devices: [String: VolumeDevice] = [:]
    var counter: UInt64 = 0

    enum CacheKind { case none, dictionary, blockCache }

    init(cache: CacheKind) throws {
        let base = ProcessInfo.processInfo.environment["VBD_BENCH_TMP"] ?? NSTemporaryDirectory()
        path = (base as NSString).appendingPathComponent("vbd-bench-store-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        var options = Store.Options()
        switch cache {
        case .none: break
        case .dictionary: options.cache = DictionaryChunkCache()
        case .blockCache:
            // 256 MiB main tier: the 64 MiB written stay resident; no last-chance tier.
            options.cache = BlockCache(configuration: .init(capacityBytes: 256 << 20, lastChanceCapacityBytes: 0))
        }
        store = try Store.initialize(path: path, options: options)
        try store.createVolume(name: "bench", size: volumeBytes)
        volume = try store.device(named: "bench")
    }

    /// Writes data set blocks 0..<count to LBAs 0..<count and flushes.
    func fill(blocks count: Int) throws {
        let data = DataSet.shared
        for i in 0..<count {
            try volume.write(offset: UInt64(i * blockBytes), data: data.block(i % data.count), fua: false)
        }
        try store.flush()
    }

    func close() {
        try? store.close()
        buffer.deallocate()
        try? FileManager.default.removeItem(atPath: path)
    }

    static func start(cache: CacheKind = .none, fill: Int = 0) throws {
        let fixture = try StoreFixture(cache: cache)
        if fill > 0 { try fixture.fill(blocks: fill) }
        current = fixture
    }

    static func stop() {
        current?.close()
        current = nil
    }
}

/// Blocks written before the read, duplicate and control-operation benchmarks: 64 MiB.
let filledBlocks = 16384

func storeBenchmarks() {
    let perBlock = Benchmark.Configuration(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        scalingFactor: .kilo,
        maxDuration: .seconds(3),
        maxIterations: 1000
    )
    let perOperation = Benchmark.Configuration(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        scalingFactor: .one,
        maxDuration: .seconds(3),
        maxIterations: 2000
    )

    // Store: unique write, 4 KiB, real data (1 TiB volume)
    Benchmark("Store.uniqueWrite.4KiB", configuration: perBlock) { benchmark in
        let f = StoreFixture.current!
        let data = DataSet.shared
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            f.buffer.copyMemory(from: data.block(Int(f.counter % UInt64(data.count))))
            f.buffer.storeBytes(of: f.counter | 0x8000_0000_0000_0000, toByteOffset: 0, as: UInt64.self)
            try f.volume.write(offset: f.counter * UInt64(blockBytes), data: UnsafeRawBufferPointer(f.buffer), fua: false)
            f.counter += 1
        }
    } setup: {
        try StoreFixture.start()
    } teardown: {
        StoreFixture.stop()
    }

    // Issue 14's in-process targets, per core: one sample is one 1 MiB request (256 data set
    // blocks) written by one thread, with the product's cache as `vbdtool serve` has it; the
    // request is prepared before the measurement starts. The store does the whole write on the
    // calling thread, so MB/s per core = 1 MiB / wall clock (on a loaded machine p0 is the
    // unloaded cost; cpuTotal counts in 10 ms ticks here, too coarse for one request).
    let perRequest = Benchmark.Configuration(
        metrics: [.wallClock, .throughput, .mallocCountTotal],
        scalingFactor: .one,
        maxDuration: .seconds(4),
        maxIterations: 2000
    )
    let requestBlocks = 256

    // Store: unique writes, 1 MiB requests of data set blocks, each block stamped unique (fresh
    // LBAs of a 1 TiB volume: no overwrites); implicit flushes amortized.
    Benchmark("Store.uniqueWrite.1MiB", configuration: perRequest) { benchmark in
        let f = StoreFixture.current!
        let data = DataSet.shared
        let request = UnsafeMutableRawBufferPointer.allocate(byteCount: requestBlocks * blockBytes, alignment: 4096)
        defer { request.deallocate() }
        for k in 0..<requestBlocks {
            let slot = UnsafeMutableRawBufferPointer(rebasing: request[k * blockBytes..<(k + 1) * blockBytes])
            slot.copyMemory(from: data.block(Int((f.counter + UInt64(k)) % UInt64(data.count))))
            slot.storeBytes(of: (f.counter + UInt64(k)) | 0x8000_0000_0000_0000, toByteOffset: 0, as: UInt64.self)
        }
        benchmark.startMeasurement()
        try f.volume.write(offset: f.counter * UInt64(blockBytes), data: UnsafeRawBufferPointer(request), fua: false)
        benchmark.stopMeasurement()
        f.counter += UInt64(requestBlocks)
    } setup: {
        try StoreFixture.start(cache: .blockCache)
    } teardown: {
        StoreFixture.stop()
    }

    // Store: duplicate writes, 1 MiB requests: blocks k..<k+256 of the 64 MiB written in setup
    // (each already stored at LBA k...) written again at LBA filledBlocks + k: hash, index hit,
    // byte comparison against the cached block, map update.
    Benchmark("Store.duplicateWrite.1MiB", configuration: perRequest) { benchmark in
        let f = StoreFixture.current!
        let data = DataSet.shared
        let k = Int(f.counter % UInt64(filledBlocks / requestBlocks)) * requestBlocks
        let request = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(data.bytes)[k * blockBytes..<(k + requestBlocks) * blockBytes])
        benchmark.startMeasurement()
        try f.volume.write(offset: UInt64((filledBlocks + k) * blockBytes), data: request, fua: false)
        benchmark.stopMeasurement()
        f.counter += 1
    } setup: {
        precondition(DataSet.shared.count >= filledBlocks, "the duplicate benchmark needs \(filledBlocks) data set blocks")
        try StoreFixture.start(cache: .blockCache, fill: filledBlocks)
    } teardown: {
        StoreFixture.stop()
    }

    // Store: overwrite of 64 KiB of incompressible bytes at a random aligned offset in the first
    // 256 MiB, with the product's cache: one scheduled piece of the hostile-workload bulk writer
    // (Benchmarks/hostile.sh). Every block is new, fails to compress and replaces an older one.
    Benchmark("Store.randomOverwrite.64KiB.incompressible", configuration: perOperation) { benchmark in
        let f = StoreFixture.current!
        let piece = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 4096)
        defer { piece.deallocate() }
        var rng = SplitMix64(seed: 7)
        let pieces = UInt64((256 << 20) / piece.count)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            for word in 0..<(piece.count / 8) { piece.storeBytes(of: rng.next(), toByteOffset: word * 8, as: UInt64.self) }
            let offset = (rng.next() % pieces) * UInt64(piece.count)
            try f.volume.write(offset: offset, data: UnsafeRawBufferPointer(piece), fua: false)
        }
    } setup: {
        try StoreFixture.start(cache: .blockCache)
    } teardown: {
        StoreFixture.stop()
    }

    // Store: duplicate write, 4 KiB (content stored at another LBA)
    Benchmark("Store.duplicateWrite.4KiB", configuration: perBlock) { benchmark in
        let f = StoreFixture.current!
        let data = DataSet.shared
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            // Block k (already at LBA k) written again to LBA filledBlocks + k.
            let k = Int(f.counter % UInt64(filledBlocks))
            try f.volume.write(offset: UInt64((filledBlocks + k) * blockBytes), data: data.block(k % data.count), fua: false)
            f.counter += 1
        }
    } setup: {
        try StoreFixture.start(fill: filledBlocks)
    } teardown: {
        StoreFixture.stop()
    }

    // Store: cached read, 4 KiB (VBDCache BlockCache hit)
    Benchmark("Store.cachedRead.BlockCache.4KiB", configuration: perBlock) { benchmark in
        let f = StoreFixture.current!
        var rng = SplitMix64(seed: 1)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let lba = rng.next() % UInt64(filledBlocks)
            try f.volume.read(offset: lba * UInt64(blockBytes), into: f.buffer)
        }
    } setup: {
        try StoreFixture.start(cache: .blockCache, fill: filledBlocks)
        let f = StoreFixture.current!
        for lba in 0..<filledBlocks { try f.volume.read(offset: UInt64(lba * blockBytes), into: f.buffer) }
    } teardown: {
        StoreFixture.stop()
    }

    // Store: cached read, 4 KiB (dictionary ChunkCache hit)
    Benchmark("Store.cachedRead.dictionary.4KiB", configuration: perBlock) { benchmark in
        let f = StoreFixture.current!
        var rng = SplitMix64(seed: 1)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let lba = rng.next() % UInt64(filledBlocks)
            try f.volume.read(offset: lba * UInt64(blockBytes), into: f.buffer)
        }
    } setup: {
        try StoreFixture.start(cache: .dictionary, fill: filledBlocks)
        let f = StoreFixture.current!
        for lba in 0..<filledBlocks { try f.volume.read(offset: UInt64(lba * blockBytes), into: f.buffer) }
    } teardown: {
        StoreFixture.stop()
    }

    // Store: uncached read, 4 KiB (pread + LZ4 decompress + verify)
    Benchmark("Store.uncachedRead.4KiB", configuration: perBlock) { benchmark in
        let f = StoreFixture.current!
        var rng = SplitMix64(seed: 1)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let lba = rng.next() % UInt64(filledBlocks)
            try f.volume.read(offset: lba * UInt64(blockBytes), into: f.buffer)
        }
    } setup: {
        try StoreFixture.start(fill: filledBlocks)
    } teardown: {
        StoreFixture.stop()
    }

    // Store: snapshot of a 1 TiB volume (64 MiB written), durable
    Benchmark("Store.snapshot.1TiB", configuration: perOperation) { benchmark in
        let f = StoreFixture.current!
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try f.store.snapshot(volume: "bench", name: "s\(f.counter)")
            f.counter += 1
        }
    } setup: {
        try StoreFixture.start(fill: filledBlocks)
    } teardown: {
        StoreFixture.stop()
    }

    // Store: share of a snapshot of a 1 TiB volume, durable
    Benchmark("Store.share.1TiB", configuration: perOperation) { benchmark in
        let f = StoreFixture.current!
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            try f.store.share(snapshot: "bench@gold", as: "v\(f.counter)")
            f.counter += 1
        }
    } setup: {
        try StoreFixture.start(fill: filledBlocks)
        try StoreFixture.current!.store.snapshot(volume: "bench", name: "gold")
    } teardown: {
        StoreFixture.stop()
    }

    for depth in [1, 100] {
        // Store: cached read at share depth N, 4 KiB
        Benchmark("Store.cachedRead.shareDepth\(depth).4KiB", configuration: perBlock) { benchmark in
            let f = StoreFixture.current!
            let device = f.devices["deep"]!
            var rng = SplitMix64(seed: 1)
            benchmark.startMeasurement()
            for _ in benchmark.scaledIterations {
                let lba = rng.next() % UInt64(filledBlocks)
                try device.read(offset: lba * UInt64(blockBytes), into: f.buffer)
            }
        } setup: {
            try StoreFixture.start(cache: .blockCache, fill: filledBlocks)
            let f = StoreFixture.current!
            // bench -> bench@s -> d1 -> d1@s -> d2 ... -> d<depth>
            var source = "bench"
            for level in 1...depth {
                try f.store.snapshot(volume: source, name: "s")
                try f.store.share(snapshot: source + "@s", as: "d\(level)")
                source = "d\(level)"
            }
            let device = try f.store.device(named: source)
            f.devices["deep"] = device
            for lba in 0..<filledBlocks { try device.read(offset: UInt64(lba * blockBytes), into: f.buffer) }
        } teardown: {
            StoreFixture.stop()
        }
    }
}
