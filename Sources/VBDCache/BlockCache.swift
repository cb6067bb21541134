#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import VBDCore

/// The universal buffer cache: one per host, shared by every volume and connection, holding
/// uncompressed blocks keyed by the store's chunk key, with a compressed last-chance tier behind it.
///
/// One key is one content (the store verifies bytes before it dedups), so 100 clones reading one
/// image block hold it once, and a read through any volume of the group that maps the key is a hit.
/// Blocks never change under a key: there is no write invalidation, only ``remove(_:)`` when the
/// store frees a chunk.
///
/// ### Tiers
/// - Main: S3-FIFO (``S3FIFOPolicy``) over `capacityBytes`, scan resistant.
/// - Last chance: blocks evicted from main are LZ4-compressed (kept raw when that saves nothing) into a
///   FIFO bounded by `lastChanceCapacityBytes` of stored bytes plus per-entry overhead. A read that
///   misses main and hits here is decompressed, promoted back to main and counted as a last-chance hit.
///
/// ### Concurrency
/// Keys are spread over shards by a mixed hash; each shard has its own `Mutex` and no call takes two.
/// A main hit holds one shard lock for a dictionary lookup, a counter store and the block copy.
/// Copying an inserted block in and compressing evicted blocks happen outside the lock.
///
/// ### Contract with the store
/// - `insert` only clean bytes that are the key's content.
/// - Call ``remove(_:)`` when a chunk is freed, before its key can name other content, and do not
///   `insert` a key after its `remove` from a read that began before it (quarantine freed keys until
///   reads that looked them up have finished). The cache itself never reintroduces a removed key: its
///   own deferred work (last-chance admission) is dropped when a `remove` overtook it.
///
/// ### Invariants
/// 1. Main holds at most `capacityBytes`, the last-chance tier at most `lastChanceCapacityBytes`,
///    both counted as block (or stored) bytes plus a fixed per-entry overhead
///    (``mainEntryOverheadBytes``, ``lastChanceEntryOverheadBytes``).
/// 2. A block is returned only to a reader of the sharing group that inserted it.
public final class BlockCache: Sendable {
    public let configuration: Configuration
    private let shards: [ShardBox]

    private final class ShardBox: Sendable {
        let state: Mutex<BlockCacheShard>
        init(_ shard: BlockCacheShard) { state = Mutex(shard) }
    }

    public init(configuration: Configuration = Configuration()) {
        configuration.validate()
        self.configuration = configuration
        let count = configuration.shardCount
        shards = (0..<count).map { _ in
            ShardBox(BlockCacheShard(
                capacityBytes: configuration.capacityBytes / count,
                lastChanceCapacityBytes: configuration.lastChanceCapacityBytes / count,
                ownersMax: configuration.ownersTrackedPerShardMax))
        }
    }

    // MARK: Block interface (the store)

    /// Copies the block cached under `key` into `buffer` (whose count is the block size).
    ///
    /// - Returns: true on a hit in either tier; a last-chance hit is promoted back to main. False on a
    ///   miss, and also when the block was inserted by another sharing group or has another size
    ///   (counted as an isolation refusal; `buffer` is then unspecified).
    public func read(_ key: UInt64, into buffer: UnsafeMutableRawBufferPointer, owner: CacheOwner) -> Bool {
        lookup(key, into: buffer, owner: owner) != .miss
    }

    /// As ``read(_:into:owner:)``, saying which tier answered (`.miss` also for a refusal).
    /// With `countingMisses` false a miss is not counted: for a probe that falls back to a normal
    /// read, which counts it.
    public func lookup(_ key: UInt64, into buffer: UnsafeMutableRawBufferPointer, owner: CacheOwner,
                       countingMisses: Bool = true) -> CacheLookup {
        precondition(buffer.count > 0 && buffer.count <= Limits.blockBytesMax, "block size out of range")
        let box = shard(for: key)
        var evicted: [(UInt64, BlockCacheShard.CachedBlock)] = []
        let (outcome, epoch) = box.state.withLock { shard in
            (shard.read(key, into: buffer, owner: owner, evicted: &evicted, countingMisses: countingMisses),
             shard.removalEpoch)
        }
        if !evicted.isEmpty { admitToLastChance(evicted, in: box, evictedAtEpoch: epoch) }
        switch outcome {
        case .hit: return .hit
        case .lastChanceHit: return .lastChanceHit
        case .miss, .refused: return .miss
        }
    }

    /// Caches `bytes` (clean data just read from or written to the store) as the content of `key`.
    /// Does nothing if the block is already held.
    public func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, owner: CacheOwner) {
        insert(key, bytes: bytes, owner: owner, ifUnremovedSince: nil)
    }

    /// A token for ``insert(_:bytes:owner:ifUnremovedSince:)``, taken while the caller knows `key`
    /// names the bytes it is about to insert (the store takes it under its own lock).
    public func removalToken(for key: UInt64) -> UInt64 {
        shard(for: key).state.withLock { $0.removalEpoch }
    }

    /// Inserts only if `key` was not removed since `token` was taken: a key freed (and perhaps
    /// reused for other contents) meanwhile is never cached with the old bytes. This lets the store
    /// insert without holding its own lock. Removals of other keys do not matter unless more than
    /// `BlockCacheShard.removalLogLength` of them ran in the shard meanwhile (then it skips).
    public func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, owner: CacheOwner, ifUnremovedSince token: UInt64?) {
        precondition(bytes.count > 0 && bytes.count <= Limits.blockBytesMax, "block size out of range")
        let block = BlockCacheShard.CachedBlock(bytes: [UInt8](bytes), owner: owner)   // copy outside the lock
        let box = shard(for: key)
        var evicted: [(UInt64, BlockCacheShard.CachedBlock)] = []
        let epoch = box.state.withLock { shard in
            if let token, shard.removed(key, since: token) { return shard.removalEpoch }
            shard.insert(key, block: block, evicted: &evicted)
            return shard.removalEpoch
        }
        if !evicted.isEmpty { admitToLastChance(evicted, in: box, evictedAtEpoch: epoch) }
    }

    /// Forgets `key` in both tiers. The store calls it when it frees the chunk, before reusing the key.
    public func remove(_ key: UInt64) {
        _ = shard(for: key).state.withLock { $0.remove(key) }
    }

    /// Whether the main tier's block for `key`, inserted by `group`, equals `bytes`: compared in
    /// place under the shard's lock, with no copy out. Nil when the main tier does not hold it for
    /// that group and size (the caller then loads the block the ordinary way). Not an access:
    /// statistics and eviction order are unchanged. The store's dedup verification uses it.
    public func equals(_ key: UInt64, bytes: UnsafeRawBufferPointer, group: SharingGroupID) -> Bool? {
        guard bytes.count > 0 else { return nil }
        return shard(for: key).state.withLock { shard -> Bool? in
            shard.main.peek(key) { block -> Bool? in
                guard block.owner.group == group, block.bytes.count == bytes.count else { return nil }
                return block.bytes.withUnsafeBytes { memcmp($0.baseAddress!, bytes.baseAddress!, bytes.count) == 0 }
            } ?? nil
        }
    }

    /// True if either tier holds `key` (whatever its group). Not an access; for tests and tools.
    public func contains(_ key: UInt64) -> Bool {
        shard(for: key).state.withLock { $0.main.contains(key) || ($0.lastChance?.contains(key) ?? false) }
    }

    // MARK: Statistics

    /// Counters summed over all shards.
    public var statistics: CacheStatistics {
        var sum = CacheStatistics()
        for box in shards { sum.add(box.state.withLock { $0.totals }) }
        return sum
    }

    /// Counters of one owner (volume in its group), or nil if the cache has none for it. Reads are
    /// counted for the reader, bytes held for the owner that loaded the block.
    public func statistics(for owner: CacheOwner) -> CacheStatistics? {
        var sum: CacheStatistics?
        for box in shards {
            guard let part = box.state.withLock({ $0.statistics(for: owner) }) else { continue }
            if sum == nil { sum = CacheStatistics() }
            sum!.add(part)
        }
        return sum
    }

    /// Drops the counters of `owner` (a deleted volume), freeing their slots.
    public func forgetStatistics(for owner: CacheOwner) {
        for box in shards { box.state.withLock { $0.forgetStatistics(for: owner) } }
    }

    // MARK: Clean pages (used by CleanPageCache)

    /// Keeps `page`, the content of `key`, in the last-chance tier unless either tier holds it already.
    func retainCleanPage(_ key: UInt64, page: UnsafeRawBufferPointer, owner: CacheOwner) {
        guard configuration.lastChanceCapacityBytes > 0 else { return }
        let box = shard(for: key)
        let (held, epoch) = box.state.withLock { ($0.holds(key, group: owner.group), $0.removalEpoch) }
        guard !held else { return }
        let stored = Self.compress([UInt8](page), owner: owner)
        box.state.withLock { $0.admitToLastChance([(key, stored)], evictedAtEpoch: epoch) }
    }

    /// Copies the content of `key` from either tier into `page` without promoting it.
    func readCleanPage(_ key: UInt64, into page: UnsafeMutableRawBufferPointer, group: SharingGroupID) -> Bool {
        shard(for: key).state.withLock { $0.readCleanPage(key, into: page, group: group) }
    }

    // MARK: Internals

    private func shard(for key: UInt64) -> ShardBox {
        shards[Int(Self.mix(key) % UInt64(shards.count))]
    }

    /// SplitMix64's finalizer: chunk keys are often sequential, and shards must not follow their low bits.
    @inline(__always)
    static func mix(_ key: UInt64) -> UInt64 {
        var z = key &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    private func admitToLastChance(
        _ evicted: [(UInt64, BlockCacheShard.CachedBlock)], in box: ShardBox, evictedAtEpoch epoch: UInt64
    ) {
        guard configuration.lastChanceCapacityBytes > 0 else { return }
        let stored = evicted.map { ($0.0, Self.compress($0.1.bytes, owner: $0.1.owner)) }
        box.state.withLock { $0.admitToLastChance(stored, evictedAtEpoch: epoch) }
    }

    /// LZ4-compresses a block; keeps it raw (sharing the array, no copy) when that saves nothing.
    static func compress(_ bytes: [UInt8], owner: CacheOwner) -> BlockCacheShard.StoredBlock {
        let compressed: [UInt8]? = bytes.withUnsafeBytes { source in
            withUnsafeTemporaryAllocation(byteCount: BlockCompression.bound(source.count), alignment: 16) { scratch in
                guard let length = BlockCompression.compress(source, into: scratch), length < source.count else {
                    return nil
                }
                return [UInt8](UnsafeRawBufferPointer(rebasing: scratch[..<length]))
            }
        }
        return BlockCacheShard.StoredBlock(
            stored: compressed ?? bytes, uncompressedCount: bytes.count, isCompressed: compressed != nil, owner: owner)
    }
}

extension BlockCache {
    /// Memory a main-tier entry costs beyond its block bytes, charged against `capacityBytes`. Worst
    /// case, just after the slab array or the dictionary doubled: the slab node (key, links, value,
    /// charge, frequency) twice over, a dictionary slot (8-byte key and 4-byte slot index) at Swift's
    /// lowest load after growth, 3/8, so 32 bytes, and the block array's heap object (32-byte header
    /// plus malloc's 16-byte chunk header and rounding). Measured on average: 155 bytes
    /// (scripts/measure-cache.sh, resident memory over 100,000 blocks); this charges 192.
    public static var mainEntryOverheadBytes: Int {
        2 * MemoryLayout<LinkedSlab<S3FIFOPolicy<BlockCacheShard.CachedBlock>.Entry>.Node>.stride + 32 + 48
    }

    /// Memory a last-chance entry costs beyond its stored bytes, charged against
    /// `lastChanceCapacityBytes`; the same parts as ``mainEntryOverheadBytes``.
    public static var lastChanceEntryOverheadBytes: Int {
        2 * MemoryLayout<LinkedSlab<(value: BlockCacheShard.StoredBlock, charge: Int)>.Node>.stride + 32 + 48
    }

    /// Memory of one ghost key, worst case: its ring slot (24 bytes) plus a dictionary entry (8-byte
    /// key, 16-byte value) at 3/8 load. The ghost holds at most one key per 4 KiB of main capacity, so
    /// it adds at most `capacityBytes * ghostEntryBytes / 4096` (about 2.1%) outside the byte budget.
    public static var ghostEntryBytes: Int { 24 + (8 + 16) * 8 / 3 }
}
