import Testing
@testable import VBDCache
import VBDCore

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

    /// A removal of another key in the shard does not cancel an admission: only the key's own does.
    @Test func admissionOvertakenOnlyByAnotherKeysRemoveIsKept() {
        var (shard, evicted, epoch) = shardEvictingKeyZero()
        shard.remove(1)
        shard.remove(99)
        let stored = evicted.map { ($0.0, BlockCache.compress($0.1.bytes, owner: $0.1.owner)) }
        shard.admitToLastChance(stored, evictedAtEpoch: epoch)
        #expect(shard.lastChance?.contains(0) == true)
    }

    /// `removed(_:since:)` against a model that remembers every removal: exact while a token spans
    /// at most `removalLogLength` removals (through several turns of the log), "removed" beyond.
    @Test func removedSinceMatchesEveryRemovalWithinTheLog() {
        var shard = BlockCacheShard(capacityBytes: 1 << 20, lastChanceCapacityBytes: 0, ownersMax: 8)
        var generator = SplitMix64(seed: 41)
        var history: [UInt64] = []            // history[e - 1]: the key of removal e
        var tokens: [UInt64] = [0]
        let length = UInt64(BlockCacheShard.removalLogLength)
        for step in 0..<6000 {
            // Few keys, so keys come back often; some steps remove many in a row.
            let burst = generator.next() % 8 == 0 ? Int(generator.next() % 300) : 1
            for _ in 0..<burst {
                let key = generator.next() % 64
                shard.remove(key)
                history.append(key)
            }
            if step % 7 == 0 { tokens.append(shard.removalEpoch) }
            for token in tokens.suffix(12) + [tokens[Int(generator.next() % UInt64(tokens.count))]] {
                let key = generator.next() % 64
                let since = history[Int(token)...]
                let expected = shard.removalEpoch - token > length || since.contains(key)
                #expect(shard.removed(key, since: token) == expected, "key \(key) since \(token) at \(shard.removalEpoch)")
            }
        }
        #expect(history.count > 3 * BlockCacheShard.removalLogLength)
    }
}
