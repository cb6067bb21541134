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
        let failures = ManagedCounter()
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            var g = SplitMix64(seed: UInt64(worker + 1))
            for n in 0..<600 {
                let b = Int(g.next() % 64)
                if worker < 2 {
                    let version = UInt64(worker * 1_000_000 + n)
                    try? dev.write(selfDescribingBlock(UInt64(b) << 32 | version), at: UInt64(b) * 4096)
                    if n % 50 == 0 { try? store.flush() }
                } else {
                    guard let got = try? dev.read(4096, at: UInt64(b) * 4096) else { failures.add(); continue }
                    if !isBlockOf(b, got) { failures.add() }
                }
            }
        }
        #expect(failures.value == 0)
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
