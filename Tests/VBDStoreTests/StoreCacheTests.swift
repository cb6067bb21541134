import Foundation
import Testing
import VBDCache
import VBDCore
@testable import VBDStore

@Suite struct StoreCacheTests {
    func cachedStore(_ dir: TemporaryStoreDirectory, capacity: Int = 8 << 20) throws -> (Store, BlockCache) {
        let cache = BlockCache(configuration: .init(capacityBytes: capacity, lastChanceCapacityBytes: capacity / 4))
        var options = Store.Options()
        options.cache = cache
        return (try Store.initialize(path: dir.path, options: options), cache)
    }

    /// docs/INVARIANTS.md 2 with the cache in the loop: with an 8-bit hash nearly every write
    /// meets candidates, and those held by the cache are compared where they lie
    /// (`BlockCache.equals`); distinct contents must stay apart and equal ones be shared.
    @Test func dedupVerificationAgainstTheCacheNeverMergesDifferentContents() throws {
        let dir = TemporaryStoreDirectory()
        let cache = BlockCache(configuration: .init(capacityBytes: 64 << 20))
        var options = Store.Options()
        options.cache = cache
        options.hashFunction = .weak(bits: 8)
        let store = try Store.initialize(path: dir.path, options: options)
        try store.createVolume(name: "v", size: 4096 * 2000)
        let dev = try store.device(named: "v")
        // 1000 distinct contents, each written twice: the second copy's candidates are cached.
        for i in 0..<2000 { try dev.write(block(seed: UInt64(i % 1000)), at: UInt64(i) * 4096) }
        #expect(store.uniqueChunkCount == 1000)
        // Contents one bit apart from a stored block: with 1000 contents over 256 hash values it
        // meets about four cached candidates, and shares none of them.
        var near = block(seed: 3)
        near[4095] ^= 1
        try dev.write(near, at: 0)
        #expect(store.uniqueChunkCount == 1001)
        #expect(try dev.read(4096, at: 0) == near)
        for i in 1..<2000 { #expect(try dev.read(4096, at: UInt64(i) * 4096) == block(seed: UInt64(i % 1000))) }
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// One copy in memory for every share of an image: the second share's reads all hit.
    @Test func sharesOfOneImageHitTheSameCachedBlocks() throws {
        let dir = TemporaryStoreDirectory()
        let (store, cache) = try cachedStore(dir)
        try store.createVolume(name: "img", size: 1 << 22)
        for i in 0..<256 { try store.device(named: "img").write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }
        try store.snapshot(volume: "img", name: "gold")
        try store.share(snapshot: "img@gold", as: "vm1")
        try store.share(snapshot: "img@gold", as: "vm2")
        _ = try store.device(named: "vm1").read(256 * 4096, at: 0)
        let before = cache.statistics
        let vm2 = try store.device(named: "vm2")
        #expect(try vm2.read(256 * 4096, at: 0) == (0..<256).flatMap { block(seed: UInt64($0)) })
        let after = cache.statistics
        #expect(after.hits - before.hits + after.lastChanceHits - before.lastChanceHits == 256)
        #expect(after.misses == before.misses)
        try store.close()
    }

    /// Every block of a read is counted once, by where it came from: the basis of per-domain
    /// cache accounting (the NBD server charges these counts to the domain that asked).
    @Test func readsReportWhetherEachBlockCameFromTheCacheTheLastChanceTierOrDisk() throws {
        let dir = TemporaryStoreDirectory()
        do {
            let (store, _) = try cachedStore(dir)
            try store.createVolume(name: "vol", size: 1 << 20)
            for i in 0..<64 { try store.device(named: "vol").write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }
            try store.close()
        }
        // Main tier: 16 blocks (4 shards x 4); the last-chance tier holds what main evicts.
        let blockCost = 4096 + BlockCache.mainEntryOverheadBytes
        let cache = BlockCache(configuration: .init(capacityBytes: 16 * blockCost, lastChanceCapacityBytes: 1 << 20,
                                                    shardCount: 4))
        var options = Store.Options()
        options.cache = cache
        let store = try Store.open(path: dir.path, options: options)
        let device = try store.device(named: "vol")
        func read(_ offset: UInt64, _ count: Int) throws -> ReadSources {
            var sources = ReadSources()
            try withUnsafeTemporaryAllocation(byteCount: count, alignment: 16) { buffer in
                try device.read(offset: offset, into: buffer, sources: &sources)
            }
            return sources
        }
        #expect(try read(0, 4 * 4096) == ReadSources(diskReads: 4), "a cold read comes from disk")
        #expect(try read(0, 4 * 4096) == ReadSources(cacheHits: 4), "then from the cache")
        #expect(try read(4096 + 100, 200) == ReadSources(cacheHits: 1), "part of a block counts as that block")
        #expect(try read(100 * 4096, 4096) == ReadSources(), "an unwritten block is read from nowhere")
        // Read everything: main (16 blocks) evicts into the last-chance tier; the early blocks then
        // come back from there.
        let all = try read(0, 64 * 4096)
        #expect(all.cacheHits + all.lastChanceHits + all.diskReads == 64)
        let again = try read(0, 64 * 4096)
        #expect(again.lastChanceHits > 0, "evicted blocks are served by the last-chance tier: \(again)")
        #expect(again.cacheHits + again.lastChanceHits + again.diskReads == 64)
        let statistics = cache.statistics
        #expect(statistics.lastChanceHits >= again.lastChanceHits)
        try store.close()
    }

    /// The event-loop fast path: a read wholly in memory is served at once and counted as hits;
    /// anything else (a block not cached, the store lock held, out of range, too large) returns nil
    /// having counted nothing, and the ordinary read then counts it once.
    @Test func readIfCachedServesOnlyWhatIsInMemoryAndCountsNothingOtherwise() throws {
        let dir = TemporaryStoreDirectory()
        let (store, cache) = try cachedStore(dir)
        try store.createVolume(name: "vol", size: 1 << 20)
        let device = try store.device(named: "vol")
        for i in 0..<4 { try device.write(block(seed: UInt64(i)), at: UInt64(i) * 4096) }   // cached by the write
        let id = try store.info("vol").id
        var buffer = [UInt8](repeating: 0xFF, count: 6 * 4096)
        // Blocks 0-3 cached, 4-5 never written (zeroes): served from memory, 4 hits.
        let sources = buffer.withUnsafeMutableBytes { store.readIfCached(image: id, offset: 0, into: $0) }
        #expect(sources == ReadSources(cacheHits: 4))
        #expect(Array(buffer[0..<4 * 4096]) == (0..<4).flatMap { block(seed: UInt64($0)) })
        #expect(buffer[4 * 4096..<6 * 4096].allSatisfy { $0 == 0 })
        // A caller that describes zero blocks as holes is sent the ordinary way instead.
        #expect(buffer.withUnsafeMutableBytes {
            store.readIfCached(image: id, offset: 0, into: $0, zeroBlocksAllowed: false)
        } == nil)
        #expect(buffer.withUnsafeMutableBytes {
            store.readIfCached(image: id, offset: 0, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<4 * 4096]),
                               zeroBlocksAllowed: false)
        } == ReadSources(cacheHits: 4))
        // A part of a block.
        var part = [UInt8](repeating: 0, count: 100)
        #expect(part.withUnsafeMutableBytes { store.readIfCached(image: id, offset: 4096 + 7, into: $0) } == ReadSources(cacheHits: 1))
        #expect(part == Array(block(seed: 1)[7..<107]))
        // Not in memory: nil, and the miss is counted only by the ordinary read that follows.
        for k in 0..<4 { cache.remove(UInt64(k)); cache.remove(UInt64(k + 1)) }
        let owner = CacheOwner(volume: id, group: store.sharingGroup(named: try store.info("vol").group) ?? 0)
        let missesBefore = cache.statistics(for: owner)?.misses ?? 0
        #expect(buffer.withUnsafeMutableBytes { store.readIfCached(image: id, offset: 0, into: $0) } == nil)
        #expect((cache.statistics(for: owner)?.misses ?? 0) == missesBefore, "the probe counts no miss")
        #expect(try device.read(4096, at: 0) == block(seed: 0))
        #expect((cache.statistics(for: owner)?.misses ?? 0) == missesBefore + 1)
        // Out of range and oversized requests are left to the ordinary read (which reports errors).
        #expect(buffer.withUnsafeMutableBytes { store.readIfCached(image: id, offset: (1 << 20) - 4096, into: $0) } == nil)
        var big = [UInt8](repeating: 0, count: Store.cachedReadBytesMax + 4096)
        #expect(big.withUnsafeMutableBytes { store.readIfCached(image: id, offset: 0, into: $0) } == nil)
        // The store lock held elsewhere (a checkpoint, say): give up after a bounded wait, never block.
        store.mutex.lock()
        let started = ContinuousClock.now
        #expect(buffer.withUnsafeMutableBytes { store.readIfCached(image: id, offset: 0, into: $0) } == nil)
        #expect(ContinuousClock.now - started < .seconds(1))
        store.mutex.unlock()
        _ = try device.read(6 * 4096, at: 0)   // caches blocks 1-3 again
        #expect(buffer.withUnsafeMutableBytes { store.readIfCached(image: id, offset: 0, into: $0) } == ReadSources(cacheHits: 4))
        try store.close()
    }

    /// Two sharing groups: the same bytes are stored and cached separately, so reading a block
    /// another tenant holds is an ordinary miss, with no timing signal of the other's data.
    @Test func groupsDoNotShareBlocksOrCacheEntries() throws {
        let dir = TemporaryStoreDirectory()
        let (store, cache) = try cachedStore(dir)
        try store.createVolume(name: "a", size: 1 << 20, group: "tenant-a")
        try store.createVolume(name: "b", size: 1 << 20, group: "tenant-b")
        let a = try store.device(named: "a"), b = try store.device(named: "b")
        try a.write(block(seed: 1), at: 0)
        #expect(store.uniqueChunkCount == 1)
        try b.write(block(seed: 1), at: 0)
        #expect(store.uniqueChunkCount == 2)   // not deduplicated across groups
        #expect(try a.extents(offset: 0, length: 4096, maxExtents: 4) == [Extent(length: 4096, flags: [])])
        #expect(try b.extents(offset: 0, length: 4096, maxExtents: 4) == [Extent(length: 4096, flags: [])])
        try b.write(block(seed: 2), at: 4096)
        for k in 0..<10_000 { cache.remove(UInt64(k)) }   // drop everything: both reads start cold
        let bKey = CacheOwner(volume: try store.info("b").id, group: 2)
        let missesBefore = cache.statistics(for: bKey)?.misses ?? 0
        _ = try b.read(4096, at: 0)   // a holds the same bytes, cached after this read of a:
        _ = try a.read(4096, at: 0)
        _ = try b.read(4096, at: 4096)
        let missesAfter = cache.statistics(for: bKey)?.misses ?? 0
        #expect(missesAfter - missesBefore == 2, "b's reads of shared-content and private blocks both miss")
        #expect(store.fsck().isClean)
        try store.close()
    }

    /// Readers and writers on several threads over a small cache: every read returns one of the
    /// contents written to that block, never another block's or a freed chunk's.
    @Test func concurrentReadsAndOverwritesNeverReturnStaleCacheData() throws {
        let dir = TemporaryStoreDirectory()
        let (store, _) = try cachedStore(dir, capacity: 256 << 10)
        try store.createVolume(name: "v", size: 64 * 4096)
        let dev = try store.device(named: "v")
        for b in 0..<64 { try dev.write(selfDescribingBlock(UInt64(b) << 32), at: UInt64(b) * 4096) }
        let failures = ManagedCounter(), errors = ManagedCounter()
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            var g = SplitMix64(seed: UInt64(worker + 1))
            for n in 0..<600 {
                let b = Int(g.next() % 64)
                do {
                    if worker < 2 {
                        let version = UInt64(worker * 1_000_000 + n)
                        try dev.write(selfDescribingBlock(UInt64(b) << 32 | version), at: UInt64(b) * 4096)
                        if n % 50 == 0 { try store.flush() }
                    } else if !isBlockOf(b, try dev.read(4096, at: UInt64(b) * 4096)) {
                        failures.add()
                    }
                } catch {
                    errors.add()
                }
            }
        }
        #expect(errors.value == 0, "writes, flushes or reads failed")
        #expect(failures.value == 0, "reads returned another block's or a freed chunk's bytes")
        #expect(store.fsck().isClean)
        try store.close()
    }
}

/// A block that names its own seed in its first 8 bytes, so a reader can check it in O(1).
func selfDescribingBlock(_ seed: UInt64) -> [UInt8] {
    var out = block(seed: seed)
    withUnsafeBytes(of: seed.littleEndian) { out.replaceSubrange(0..<8, with: $0) }
    return out
}

/// Whether `bytes` is a self-describing block written for block index `b`.
func isBlockOf(_ b: Int, _ bytes: [UInt8]) -> Bool {
    let seed = bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
    return seed >> 32 == UInt64(b) && selfDescribingBlock(seed) == bytes
}

final class ManagedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    func add() { lock.lock(); count += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
}
