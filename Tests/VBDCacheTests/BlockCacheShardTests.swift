import Testing
@testable import VBDCache

/// Invariants of one shard that the public API cannot reach deterministically (they guard races).
@Suite struct BlockCacheShardTests {
    let owner = CacheOwner(volume: 1, group: 1)

    func shardEvictingKeyZero() -> (BlockCacheShard, [(UInt64, BlockCacheShard.CachedBlock)], UInt64) {
        var shard = BlockCacheShard(
            capacityBytes: 2 * (4096 + BlockCache.mainEntryOverheadBytes),
            lastChanceCapacityBytes: 1 << 20, ownersMax: 8)
        var evicted: [(UInt64, BlockCacheShard.CachedBlock)] = []
        for key in 0..<3 as Range<UInt64> {
            shard.insert(key, block: .init(bytes: blockBytes(for: key), owner: owner), evicted: &evicted)
        }
        return (shard, evicted, shard.removalEpoch)
    }

    /// Invariant 4: a block evicted before a `remove` of the shard is not admitted after it. Without
    /// the epoch check, a freed key (soon reused for other content) could come back with old bytes.
    @Test func admissionOvertakenByARemoveIsDropped() {
        var (shard, evicted, epoch) = shardEvictingKeyZero()
        #expect(evicted.map(\.0) == [0])
        shard.remove(0)                           // the store frees chunk 0 while its admission is pending
        let stored = evicted.map { ($0.0, BlockCache.compress($0.1.bytes, owner: $0.1.owner)) }
        shard.admitToLastChance(stored, evictedAtEpoch: epoch)
        #expect(!(shard.lastChance?.contains(0) ?? true))
        #expect(shard.totals.lastChanceEntries == 0)
    }

    @Test func admissionWithoutAnInterveningRemoveIsKept() {
        var (shard, evicted, epoch) = shardEvictingKeyZero()
        let stored = evicted.map { ($0.0, BlockCache.compress($0.1.bytes, owner: $0.1.owner)) }
        shard.admitToLastChance(stored, evictedAtEpoch: epoch)
        #expect(shard.lastChance?.contains(0) == true)
        #expect(shard.totals.lastChanceEntries == 1)
    }

    /// Invariant 1: an admission skips a key that came back into main meanwhile (tiers stay exclusive).
    @Test func admissionSkipsAKeyBackInMain() {
        var (shard, evicted, epoch) = shardEvictingKeyZero()
        var more: [(UInt64, BlockCacheShard.CachedBlock)] = []
        shard.insert(0, block: .init(bytes: blockBytes(for: 0), owner: owner), evicted: &more)
        let stored = evicted.map { ($0.0, BlockCache.compress($0.1.bytes, owner: $0.1.owner)) }
        shard.admitToLastChance(stored, evictedAtEpoch: epoch)
        #expect(shard.main.contains(0))
        #expect(!(shard.lastChance?.contains(0) ?? true))
    }
}
