import VBDCore

/// One shard of ``BlockCache``: both tiers for the keys that hash here, and their counters.
///
/// A pure value (no locks, no I/O; LZ4 decompression of a promoted block is the only call out).
/// ``BlockCache`` keeps each shard behind its own mutex and does the expensive work, copying a block in
/// and compressing evicted blocks, outside it.
///
/// ### Invariants
/// 1. The tiers are exclusive: a key is held by the main tier or the last-chance tier, never both
///    (an insert or promotion removes it from the last-chance tier; an admission skips keys held in main).
/// 2. `totals` gauges (bytes, entries) equal the sums over the entries held.
/// 3. An entry is returned only to a reader of the sharing group that inserted it.
/// 4. A block evicted before a `remove` of its key is not admitted to the last-chance tier after it,
///    and an insert whose token predates a `remove` of its key is dropped (`removed(_:since:)`), so a
///    freed and reused key can never come back with old contents.
struct BlockCacheShard: Sendable {
    struct CachedBlock: Sendable {
        var bytes: [UInt8]
        /// The owner that loaded the block; its per-owner `bytesHeld` is charged.
        var owner: CacheOwner
        /// Set when a second volume read the block: from then on it counts in `bytesSavedBySharing`.
        var sharedAcrossVolumes = false
    }

    struct StoredBlock: Sendable {
        /// LZ4 block format when `isCompressed`, else the block itself.
        var stored: [UInt8]
        var uncompressedCount: Int
        var isCompressed: Bool
        var owner: CacheOwner
    }

    enum ReadOutcome { case hit, lastChanceHit, miss, refused }

    var main: S3FIFOPolicy<CachedBlock>
    var lastChance: FIFOPolicy<StoredBlock>?
    private(set) var totals = CacheStatistics()
    private(set) var owners: [CacheOwner: CacheStatistics] = [:]
    let ownersMax: Int
    /// Incremented by every `remove`; see invariant 4.
    private(set) var removalEpoch: UInt64 = 0
    /// The keys of the last `removalLogLength` removals, removal `e` at `(e - 1) % removalLogLength`,
    /// and for each key in it the epoch of its latest removal: `removed(_:since:)` answers for one
    /// key. A shard-wide epoch alone made every removal in the shard cancel every insert in flight:
    /// under overwrites (each frees the chunks it replaces) most written and read blocks were never
    /// cached, and a cache of 2.9 GiB held 626 MiB after 8 s of 1 MiB overwrites of a 1 GiB volume.
    private var removalLog: [UInt64] = []
    private var latestRemoval: [UInt64: UInt64] = [:]
    /// Removals one token can span and still be judged per key; an older token counts as overtaken.
    static let removalLogLength = 1024

    init(capacityBytes: Int, lastChanceCapacityBytes: Int, ownersMax: Int) {
        main = S3FIFOPolicy(capacityBytes: capacityBytes)
        lastChance = lastChanceCapacityBytes > 0 ? FIFOPolicy(capacityBytes: lastChanceCapacityBytes) : nil
        self.ownersMax = ownersMax
    }

    // MARK: Operations

    /// Serves `key` into `buffer` from either tier. A last-chance hit is decompressed into `buffer`
    /// and promoted; blocks that promotion evicts from main are appended to `evicted`.
    /// With `countingMisses` false a miss or refusal is not counted (a probe whose caller will
    /// look again the ordinary way, which counts it then).
    mutating func read(
        _ key: UInt64, into buffer: UnsafeMutableRawBufferPointer, owner: CacheOwner,
        evicted: inout [(UInt64, CachedBlock)], countingMisses: Bool = true
    ) -> ReadOutcome {
        var refused = false
        let hit = main.lookup(key) { block -> (sharedNow: Bool, size: Int, loader: CacheOwner)? in
            guard block.owner.group == owner.group, block.bytes.count == buffer.count else {
                refused = true
                return nil
            }
            block.bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
            let sharedNow = !block.sharedAcrossVolumes && block.owner.volume != owner.volume
            if sharedNow { block.sharedAcrossVolumes = true }
            return (sharedNow, block.bytes.count, block.owner)
        }
        if let hit {
            count(owner) { $0.hits += 1 }
            if hit.sharedNow { count(hit.loader) { $0.bytesSavedBySharing += UInt64(hit.size) } }
            return .hit
        }
        if refused { return countingMisses ? refuse(owner) : .refused }
        guard let stored = lastChance?.lookup(key, { $0 }) else {
            if countingMisses { count(owner) { $0.misses += 1 } }
            return .miss
        }
        guard stored.owner.group == owner.group, stored.uncompressedCount == buffer.count else {
            return countingMisses ? refuse(owner) : .refused
        }
        let decoded: Bool
        if stored.isCompressed {
            decoded = stored.stored.withUnsafeBytes { BlockCompression.decompress($0, into: buffer) }
        } else {
            stored.stored.withUnsafeBytes { buffer.copyMemory(from: $0) }
            decoded = true
        }
        removeFromLastChance(key)
        guard decoded else {
            // Memory corruption of our own buffer; never return it as data.
            count(owner) { $0.misses += 1 }
            return .miss
        }
        count(owner) { $0.lastChanceHits += 1 }
        let bytes = [UInt8](UnsafeRawBufferPointer(buffer))
        insertIntoMain(key, CachedBlock(bytes: bytes, owner: stored.owner), evicted: &evicted)
        return .lastChanceHit
    }

    mutating func insert(_ key: UInt64, block: CachedBlock, evicted: inout [(UInt64, CachedBlock)]) {
        if main.contains(key) {
            // Totals only: the held block may (through a store bug) belong to another group, and the
            // inserting owner's counters must not reveal that it exists.
            totals.redundantInsertions += 1
            return
        }
        removeFromLastChance(key)
        insertIntoMain(key, block, evicted: &evicted)
    }

    /// Forgets `key` in both tiers (the store freed the chunk). True if anything was held.
    @discardableResult
    mutating func remove(_ key: UInt64) -> Bool {
        removalEpoch &+= 1
        logRemoval(key)
        var removed = false
        if let block = main.remove(key) {
            uncharge(block)
            removed = true
        }
        if removeFromLastChance(key) { removed = true }
        if removed { totals.removals += 1 }
        return removed
    }

    /// Whether `key` was removed after `epoch` (a `removalEpoch` read earlier), or may have been: a
    /// token older than the removal log counts as overtaken.
    func removed(_ key: UInt64, since epoch: UInt64) -> Bool {
        guard epoch != removalEpoch else { return false }
        guard removalEpoch &- epoch <= UInt64(Self.removalLogLength) else { return true }
        return (latestRemoval[key] ?? 0) > epoch
    }

    /// Notes that removal `removalEpoch` was of `key`, forgetting the removal it replaces in the log.
    private mutating func logRemoval(_ key: UInt64) {
        let slot = Int((removalEpoch &- 1) % UInt64(Self.removalLogLength))
        if slot == removalLog.count {
            removalLog.append(key)
        } else {
            let old = removalLog[slot]
            if latestRemoval[old] == removalEpoch &- UInt64(Self.removalLogLength) { latestRemoval[old] = nil }
            removalLog[slot] = key
        }
        latestRemoval[key] = removalEpoch
    }

    /// Adds blocks evicted from main, compressed outside the lock, to the last-chance tier, unless a
    /// `remove` of their key ran since they were evicted (invariant 4) or a key came back into main
    /// meanwhile.
    mutating func admitToLastChance(_ blocks: [(UInt64, StoredBlock)], evictedAtEpoch epoch: UInt64) {
        guard lastChance != nil else { return }
        for (key, block) in blocks where !main.contains(key) && !removed(key, since: epoch) {
            removeFromLastChance(key)
            let charge = block.stored.count + BlockCache.lastChanceEntryOverheadBytes
            var dropped: [(UInt64, StoredBlock)] = []
            let admitted = lastChance!.insert(key, value: block, charge: charge) { dropped.append(($0, $1)) }
            for (_, old) in dropped {
                unchargeLastChance(old)
                count(old.owner) { $0.lastChanceEvictions += 1 }
            }
            if admitted { chargeLastChance(block) }
        }
    }

    /// Whether either tier holds `key` for `group`.
    func holds(_ key: UInt64, group: SharingGroupID) -> Bool {
        if let owner = main.peek(key, { $0.owner }) { return owner.group == group }
        if let owner = lastChance?.peek(key, { $0.owner }) { return owner.group == group }
        return false
    }

    /// Serves a clean page (hypervisor get) from either tier without promoting it: the page goes
    /// back into the guest, and keeping it here lets other domains reading the same content hit too.
    mutating func readCleanPage(_ key: UInt64, into buffer: UnsafeMutableRawBufferPointer, group: SharingGroupID) -> Bool {
        let fromMain = main.lookup(key) { block -> Bool? in
            guard block.owner.group == group, block.bytes.count == buffer.count else { return nil }
            block.bytes.withUnsafeBytes { buffer.copyMemory(from: $0) }
            return true
        }
        if fromMain != nil { return true }
        guard let stored = lastChance?.lookup(key, { $0 }),
              stored.owner.group == group, stored.uncompressedCount == buffer.count
        else { return false }
        if stored.isCompressed {
            return stored.stored.withUnsafeBytes { BlockCompression.decompress($0, into: buffer) }
        }
        stored.stored.withUnsafeBytes { buffer.copyMemory(from: $0) }
        return true
    }

    // MARK: Per-owner counters

    func statistics(for owner: CacheOwner) -> CacheStatistics? { owners[owner] }

    mutating func forgetStatistics(for owner: CacheOwner) { owners[owner] = nil }

    // MARK: Bookkeeping

    /// A read refused for isolation looks exactly like a miss to the reader's own counters (they must
    /// not reveal that another group holds the key); only the operator's totals count the refusal.
    private mutating func refuse(_ owner: CacheOwner) -> ReadOutcome {
        count(owner) { $0.misses += 1 }
        totals.isolationRefusals += 1
        return .refused
    }

    private mutating func insertIntoMain(_ key: UInt64, _ block: CachedBlock, evicted: inout [(UInt64, CachedBlock)]) {
        let charge = block.bytes.count + BlockCache.mainEntryOverheadBytes
        let firstEvicted = evicted.count
        let inserted = main.insert(key, value: block, charge: charge) { evicted.append(($0, $1)) }
        for (_, old) in evicted[firstEvicted...] {
            uncharge(old)
            count(old.owner) { $0.evictions += 1 }
        }
        guard inserted else { return }
        count(block.owner) {
            $0.insertions += 1
            $0.bytesHeld += UInt64(block.bytes.count)
            $0.entries += 1
        }
    }

    private mutating func uncharge(_ block: CachedBlock) {
        let size = UInt64(block.bytes.count)
        count(block.owner) {
            $0.bytesHeld.decrement(by: size)
            $0.entries.decrement(by: 1)
            if block.sharedAcrossVolumes { $0.bytesSavedBySharing.decrement(by: size) }
        }
    }

    @discardableResult
    private mutating func removeFromLastChance(_ key: UInt64) -> Bool {
        guard let old = lastChance?.remove(key) else { return false }
        unchargeLastChance(old)
        return true
    }

    private mutating func chargeLastChance(_ block: StoredBlock) {
        count(block.owner) {
            $0.lastChanceBytesHeld += UInt64(block.stored.count)
            $0.lastChanceUncompressedBytes += UInt64(block.uncompressedCount)
            $0.lastChanceEntries += 1
        }
    }

    private mutating func unchargeLastChance(_ block: StoredBlock) {
        count(block.owner) {
            $0.lastChanceBytesHeld.decrement(by: UInt64(block.stored.count))
            $0.lastChanceUncompressedBytes.decrement(by: UInt64(block.uncompressedCount))
            $0.lastChanceEntries.decrement(by: 1)
        }
    }

    /// Applies `update` to the shard totals and to `owner`'s counters. A new owner gets counters while
    /// fewer than `ownersMax` are tracked here; past that only the totals count (bounded memory).
    private mutating func count(_ owner: CacheOwner, _ update: (inout CacheStatistics) -> Void) {
        update(&totals)
        if let position = owners.index(forKey: owner) {
            update(&owners.values[position])
        } else if owners.count < ownersMax {
            var fresh = CacheStatistics()
            update(&fresh)
            owners[owner] = fresh
        }
    }
}

extension UInt64 {
    /// Per-owner gauges saturate at zero: after `forgetStatistics(for:)` an owner's blocks may still
    /// leave the cache, and a counter recreated in between must not wrap.
    fileprivate mutating func decrement(by amount: UInt64) {
        self = self >= amount ? self - amount : 0
    }
}
