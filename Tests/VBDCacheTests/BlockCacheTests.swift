import Dispatch
import Synchronization
import Testing
import VBDCache
import VBDCore

@Suite struct BlockCacheTests {
    /// An insert with a token skips only when its own key was removed since: writers and readers
    /// insert outside the store lock while other chunks are freed all the time, and a shard-wide
    /// check dropped almost every insert under overwrites.
    @Test func insertWithATokenSkipsOnlyWhenItsOwnKeyWasRemoved() {
        let cache = BlockCache(configuration: .init(capacityBytes: 64 << 20, lastChanceCapacityBytes: 0, shardCount: 1))
        let owner = CacheOwner(volume: 1, group: 1)
        let bytes = blockBytes(for: 5)
        let token = cache.removalToken(for: 5)
        for other in 100..<200 as Range<UInt64> { cache.remove(other) }
        bytes.withUnsafeBytes { cache.insert(5, bytes: $0, owner: owner, ifUnremovedSince: token) }
        var buffer = [UInt8](repeating: 0, count: 4096)
        #expect(buffer.withUnsafeMutableBytes { cache.read(5, into: $0, owner: owner) })
        #expect(buffer == bytes)

        let stale = cache.removalToken(for: 6)
        cache.remove(6)
        blockBytes(for: 6).withUnsafeBytes { cache.insert(6, bytes: $0, owner: owner, ifUnremovedSince: stale) }
        #expect(!buffer.withUnsafeMutableBytes { cache.read(6, into: $0, owner: owner) })
    }

    let alice = CacheOwner(volume: 1, group: 10)
    let aliceClone = CacheOwner(volume: 2, group: 10)
    let mallory = CacheOwner(volume: 3, group: 66)

    /// A one-shard cache holding `mainBlocks` 4 KiB blocks and `lastChanceBlocks` raw 4 KiB blocks.
    func smallCache(mainBlocks: Int, lastChanceBlocks: Int) -> BlockCache {
        BlockCache(configuration: .init(
            capacityBytes: mainBlocks * (4096 + BlockCache.mainEntryOverheadBytes),
            lastChanceCapacityBytes: lastChanceBlocks * (4096 + BlockCache.lastChanceEntryOverheadBytes),
            shardCount: 1))
    }

    @Test func insertedBlockReadsBackAndMissesAreCounted() {
        let cache = BlockCache(configuration: .init(capacityBytes: 64 << 20, shardCount: 4))
        #expect(cache.read(5, owner: alice) == nil)
        cache.insert(5, blockBytes(for: 5), owner: alice)
        #expect(cache.read(5, owner: alice) == blockBytes(for: 5))
        let stats = cache.statistics
        #expect(stats.hits == 1 && stats.misses == 1 && stats.insertions == 1)
        #expect(stats.bytesHeld == 4096 && stats.entries == 1)
    }

    /// The store's dedup verification compares against the main tier in place: equal bytes,
    /// different bytes, and no answer (nil) for another group, another size, a block not held or
    /// removed. Not an access: the statistics do not move.
    @Test func equalsComparesTheMainTierBlockInPlaceForItsGroupOnly() {
        let cache = smallCache(mainBlocks: 2, lastChanceBlocks: 4)
        let bytes = blockBytes(for: 7)
        cache.insert(7, bytes, owner: alice)
        let before = cache.statistics
        var other = bytes
        other[4095] ^= 1
        bytes.withUnsafeBytes { #expect(cache.equals(7, bytes: $0, group: alice.group) == true) }
        bytes.withUnsafeBytes { #expect(cache.equals(7, bytes: $0, group: aliceClone.group) == true, "same group, other volume") }
        other.withUnsafeBytes { #expect(cache.equals(7, bytes: $0, group: alice.group) == false) }
        bytes.withUnsafeBytes { #expect(cache.equals(7, bytes: $0, group: mallory.group) == nil, "another group's block") }
        bytes.withUnsafeBytes { #expect(cache.equals(8, bytes: $0, group: alice.group) == nil, "not held") }
        Array(bytes[0..<512]).withUnsafeBytes { #expect(cache.equals(7, bytes: $0, group: alice.group) == nil, "other size") }
        let after = cache.statistics
        #expect(after.hits == before.hits && after.misses == before.misses && after.isolationRefusals == before.isolationRefusals)
        cache.insert(8, blockBytes(for: 8), owner: alice)
        cache.remove(8)
        blockBytes(for: 8).withUnsafeBytes { #expect(cache.equals(8, bytes: $0, group: alice.group) == nil, "removed") }
    }

    @Test func removeForgetsBlockInBothTiers() {
        let cache = smallCache(mainBlocks: 4, lastChanceBlocks: 64)
        for key in 0..<20 as Range<UInt64> { cache.insert(key, blockBytes(for: key), owner: alice) }
        #expect(cache.statistics.lastChanceEntries > 0)
        for key in 0..<20 as Range<UInt64> {
            #expect(cache.contains(key))
            cache.remove(key)
            #expect(!cache.contains(key))
            #expect(cache.read(key, owner: alice) == nil)
        }
        let stats = cache.statistics
        #expect(stats.bytesHeld == 0 && stats.entries == 0)
        #expect(stats.lastChanceBytesHeld == 0 && stats.lastChanceEntries == 0)
        #expect(stats.removals == 20)
    }

    /// Blocks of mixed sizes (512 B ... 64 KiB) and compressibility never push either tier past its
    /// budget, counted with the documented per-entry overheads.
    @Test func byteBoundsHoldUnderMixedBlockSizes() {
        let capacity = 256 << 10, lastChanceCapacity = 96 << 10
        let cache = BlockCache(configuration: .init(
            capacityBytes: capacity, lastChanceCapacityBytes: lastChanceCapacity, shardCount: 2))
        var generator = SplitMix64(seed: 9)
        let sizes = [512, 1024, 4096, 4096, 4096, 16384, 65536]
        for key in 0..<600 as Range<UInt64> {
            let size = sizes[Int(generator.next() % UInt64(sizes.count))]
            cache.insert(key, blockBytes(for: key, count: size, compressible: key % 3 != 0), owner: alice)
            if generator.next() % 2 == 0 { _ = cache.read(generator.next() % (key + 1), count: size, owner: alice) }
            let stats = cache.statistics
            #expect(Int(stats.bytesHeld) + Int(stats.entries) * BlockCache.mainEntryOverheadBytes <= capacity)
            #expect(Int(stats.lastChanceBytesHeld) + Int(stats.lastChanceEntries) * BlockCache.lastChanceEntryOverheadBytes
                    <= lastChanceCapacity)
        }
        #expect(cache.statistics.evictions > 0 && cache.statistics.lastChanceEvictions > 0)
    }

    @Test func evictedBlockHitsLastChanceTierAndIsPromoted() {
        let cache = smallCache(mainBlocks: 8, lastChanceBlocks: 64)
        for key in 0..<40 as Range<UInt64> { cache.insert(key, blockBytes(for: key), owner: alice) }
        let before = cache.statistics
        #expect(before.evictions >= 32)
        #expect(before.lastChanceEntries >= 30, "compressed blocks fit many more than 64 raw ones' budget")
        #expect(cache.read(0, owner: alice) == blockBytes(for: 0))
        let afterPromotion = cache.statistics
        #expect(afterPromotion.lastChanceHits == 1 && afterPromotion.hits == 0 && afterPromotion.misses == 0)
        #expect(cache.read(0, owner: alice) == blockBytes(for: 0))
        #expect(cache.statistics.hits == 1, "a promoted block is served by the main tier")
        #expect((afterPromotion.lastChanceCompressionRatio ?? 0) > 10, "a repeated-byte block compresses well")
    }

    @Test func incompressibleBlocksAreStoredRaw() {
        let cache = smallCache(mainBlocks: 2, lastChanceBlocks: 16)
        for key in 0..<10 as Range<UInt64> { cache.insert(key, blockBytes(for: key, compressible: false), owner: alice) }
        let stats = cache.statistics
        #expect(stats.lastChanceEntries > 0)
        #expect(stats.lastChanceBytesHeld == stats.lastChanceUncompressedBytes)
        #expect(cache.read(0, owner: alice) == blockBytes(for: 0, compressible: false))
    }

    @Test func anotherGroupCannotReadABlockInEitherTier() {
        let cache = smallCache(mainBlocks: 4, lastChanceBlocks: 64)
        cache.insert(1, blockBytes(for: 1), owner: alice)
        #expect(cache.read(1, owner: mallory) == nil)
        for key in 100..<120 as Range<UInt64> { cache.insert(key, blockBytes(for: key), owner: alice) }
        #expect(cache.contains(100) && cache.statistics.lastChanceEntries > 0)
        #expect(cache.read(100, owner: mallory) == nil, "last-chance tier must refuse too")
        #expect(cache.statistics.isolationRefusals == 2)
        // Mallory's own counters must look exactly like two plain misses: nothing reveals that the
        // keys exist in another group.
        var twoMisses = CacheStatistics()
        twoMisses.misses = 2
        #expect(cache.statistics(for: mallory) == twoMisses)
        #expect(cache.read(100, owner: alice) == blockBytes(for: 100))
    }

    @Test func readWithWrongBlockSizeIsRefused() {
        let cache = smallCache(mainBlocks: 4, lastChanceBlocks: 4)
        cache.insert(1, blockBytes(for: 1), owner: alice)
        #expect(cache.read(1, count: 512, owner: alice) == nil)
        #expect(cache.statistics.isolationRefusals == 1)
    }

    @Test func sharingAcrossVolumesOfOneGroupIsAHitAndCounted() {
        let cache = smallCache(mainBlocks: 16, lastChanceBlocks: 4)
        cache.insert(1, blockBytes(for: 1), owner: alice)
        #expect(cache.read(1, owner: aliceClone) == blockBytes(for: 1))
        #expect(cache.read(1, owner: aliceClone) == blockBytes(for: 1))
        let stats = cache.statistics
        #expect(stats.bytesSavedBySharing == 4096, "counted once per block, not per hit")
        #expect(cache.statistics(for: aliceClone)?.hits == 2)
        #expect(cache.statistics(for: alice)?.bytesHeld == 4096, "bytes held are charged to the loader")
        #expect(cache.statistics(for: aliceClone)?.bytesHeld == 0)
        cache.remove(1)
        #expect(cache.statistics.bytesSavedBySharing == 0)
    }

    @Test func perOwnerCountersSeeOnlyTheirOwner() {
        let cache = smallCache(mainBlocks: 16, lastChanceBlocks: 4)
        cache.insert(1, blockBytes(for: 1), owner: alice)
        _ = cache.read(1, owner: alice)
        _ = cache.read(2, owner: mallory)
        #expect(cache.statistics(for: alice)?.hits == 1)
        #expect(cache.statistics(for: alice)?.misses == 0)
        #expect(cache.statistics(for: mallory)?.misses == 1)
        #expect(cache.statistics(for: mallory)?.bytesHeld == 0)
        #expect(cache.statistics(for: CacheOwner(volume: 99, group: 10)) == nil)
        cache.forgetStatistics(for: alice)
        #expect(cache.statistics(for: alice) == nil)
        #expect(cache.statistics.hits == 1, "totals outlive forgotten owners")
    }

    @Test func ownerTableIsBounded() {
        let cache = BlockCache(configuration: .init(capacityBytes: 1 << 20, shardCount: 1, ownersTrackedPerShardMax: 8))
        for volume in 0..<50 as Range<UInt64> { _ = cache.read(volume, owner: CacheOwner(volume: volume, group: 1)) }
        let tracked = (0..<50 as Range<UInt64>).filter { cache.statistics(for: CacheOwner(volume: $0, group: 1)) != nil }
        #expect(tracked.count == 8)
        #expect(cache.statistics.misses == 50)
    }

    /// Four threads insert, read, and remove overlapping keys. Every hit must return the key's own
    /// bytes, and the byte bound must hold at the end. Bounded: 4 x 3000 operations.
    @Test func concurrentUseReturnsOnlyCorrectBlocks() {
        let cache = BlockCache(configuration: .init(
            capacityBytes: 64 * (4096 + BlockCache.mainEntryOverheadBytes),
            lastChanceCapacityBytes: 64 * 4096, shardCount: 4))
        let wrongBytes = Atomic<Int>(0)
        let hits = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 4) { thread in
            var generator = SplitMix64(seed: UInt64(thread) + 100)
            let owner = CacheOwner(volume: UInt64(thread), group: 1)
            for _ in 0..<3000 {
                let key = generator.next() % 256
                switch generator.next() % 8 {
                case 0..<5:
                    if let bytes = cache.read(key, owner: owner) {
                        hits.add(1, ordering: .relaxed)
                        if bytes != blockBytes(for: key) { wrongBytes.add(1, ordering: .relaxed) }
                    } else {
                        cache.insert(key, blockBytes(for: key), owner: owner)
                    }
                case 5..<7: cache.insert(key, blockBytes(for: key), owner: owner)
                default: cache.remove(key)
                }
            }
        }
        #expect(wrongBytes.load(ordering: .relaxed) == 0)
        #expect(hits.load(ordering: .relaxed) > 0)
        let stats = cache.statistics
        #expect(Int(stats.bytesHeld) + Int(stats.entries) * BlockCache.mainEntryOverheadBytes
                <= cache.configuration.capacityBytes)
        #expect(stats.hits + stats.lastChanceHits + stats.misses + stats.isolationRefusals > 0)
    }

    /// The sharded cache and the pure two-tier replay (used for the hit-ratio tables) make the same
    /// decisions on the same requests: equal hits, last-chance hits and misses.
    @Test func blockCacheAgreesWithTwoTierReplay() {
        let requests = CacheWorkloads.zipfWithScan(itemCount: 600, count: 2500, exponent: 0.9, scanLength: 400, seed: 3)
        let mainCapacity = 40 * (4096 + BlockCache.mainEntryOverheadBytes)
        let lastChanceCapacity = 30 * (4096 + BlockCache.lastChanceEntryOverheadBytes)
        func bytes(_ key: UInt64) -> [UInt8] { blockBytes(for: key, compressible: key % 3 != 0) }
        func storedBytes(_ key: UInt64) -> Int {
            bytes(key).withUnsafeBytes { source in
                withUnsafeTemporaryAllocation(byteCount: BlockCompression.bound(4096), alignment: 16) { scratch in
                    let length = BlockCompression.compress(source, into: scratch) ?? 4096
                    return min(length, 4096)
                }
            }
        }
        let cache = BlockCache(configuration: .init(
            capacityBytes: mainCapacity, lastChanceCapacityBytes: lastChanceCapacity, shardCount: 1))
        let owner = CacheOwner(volume: 1, group: 1)
        for request in requests where cache.read(request.key, owner: owner) == nil {
            cache.insert(request.key, bytes(request.key), owner: owner)
        }
        var main = S3FIFOPolicy<Void>(capacityBytes: mainCapacity)
        var lastChance = FIFOPolicy<Void>(capacityBytes: lastChanceCapacity)
        let replay = TraceReplay.runTwoTier(
            requests, main: &main, blockBytes: 4096, mainOverhead: BlockCache.mainEntryOverheadBytes,
            lastChance: &lastChance, lastChanceOverhead: BlockCache.lastChanceEntryOverheadBytes,
            storedBytes: storedBytes)
        let stats = cache.statistics
        #expect(stats.hits == UInt64(replay.hits))
        #expect(stats.lastChanceHits == UInt64(replay.lastChanceHits))
        #expect(stats.misses == UInt64(replay.reads - replay.hits - replay.lastChanceHits))
        #expect(replay.lastChanceHits > 0, "the workload must exercise the last-chance tier")
    }

    @Test func defaultConfigurationIsASensibleFractionOfMemory() {
        #expect(BlockCache.Configuration.defaultCapacityBytes(physicalMemoryBytes: 16 << 30) == 2 << 30)
        #expect(BlockCache.Configuration.defaultCapacityBytes(physicalMemoryBytes: 128 << 20) == 64 << 20)
        #expect(BlockCache.Configuration.defaultCapacityBytes(physicalMemoryBytes: 1 << 40) == 32 << 30)
        #expect(BlockCache.Configuration.defaultShardCount(capacityBytes: 2 << 30) == 64)
        #expect(BlockCache.Configuration.defaultShardCount(capacityBytes: 64 << 20) == 8)
        #expect(BlockCache.Configuration.defaultShardCount(capacityBytes: 1 << 20) == 1)
        let configuration = BlockCache.Configuration()
        #expect(configuration.capacityBytes >= 64 << 20)
        #expect(configuration.lastChanceCapacityBytes == configuration.capacityBytes / 4)
    }

    @Test func overheadConstantsCoverTheEntryLayout() {
        print("per-entry overhead: main \(BlockCache.mainEntryOverheadBytes) B, last chance "
              + "\(BlockCache.lastChanceEntryOverheadBytes) B, ghost key \(BlockCache.ghostEntryBytes) B")
        #expect(BlockCache.mainEntryOverheadBytes >= 64 + 16 + 32)
        #expect(BlockCache.lastChanceEntryOverheadBytes >= 64 + 16 + 32)
        #expect(BlockCache.mainEntryOverheadBytes <= 256, "overhead grew: update docs/CACHE.md")
    }
}
