/// Counters of the universal cache and its last-chance tier, for the whole cache or for one owner.
///
/// Read as a snapshot: ``BlockCache/statistics`` sums the shards one after another without stopping
/// them, so counters taken while the cache is busy may be a few operations apart from each other.
public struct CacheStatistics: Equatable, Sendable {
    /// Reads served from the main tier.
    public var hits: UInt64 = 0
    /// Reads that missed the main tier and were served from the last-chance tier (then promoted).
    public var lastChanceHits: UInt64 = 0
    /// Reads that missed both tiers (the store goes to disk).
    public var misses: UInt64 = 0
    /// Blocks inserted into the main tier (by `insert` or by a last-chance promotion).
    public var insertions: UInt64 = 0
    /// Inserts that did nothing because the block was already held (global statistics only).
    public var redundantInsertions: UInt64 = 0
    /// Blocks evicted from the main tier (each goes to the last-chance tier).
    public var evictions: UInt64 = 0
    /// Blocks dropped from the last-chance tier to make room.
    public var lastChanceEvictions: UInt64 = 0
    /// Blocks removed because the store freed their chunk.
    public var removals: UInt64 = 0
    /// Reads refused because the block belongs to another sharing group or has another size; they
    /// also count as misses. Global statistics only: an owner's own counters show a plain miss.
    public var isolationRefusals: UInt64 = 0

    /// Block bytes held in the main tier (uncompressed; without per-entry overhead).
    public var bytesHeld: UInt64 = 0
    /// Blocks held in the main tier.
    public var entries: UInt64 = 0
    /// Bytes stored in the last-chance tier (compressed where LZ4 saved space, raw otherwise).
    public var lastChanceBytesHeld: UInt64 = 0
    /// What the blocks in the last-chance tier would take uncompressed.
    public var lastChanceUncompressedBytes: UInt64 = 0
    /// Blocks held in the last-chance tier.
    public var lastChanceEntries: UInt64 = 0
    /// A lower bound of the memory sharing saves: block bytes held in the main tier whose block was
    /// read through at least two volumes (without one shared cache each of them would hold a copy).
    public var bytesSavedBySharing: UInt64 = 0

    public init() {}

    /// Reads that hit either tier, over all reads; nil before the first read.
    public var hitRatio: Double? {
        let reads = hits + lastChanceHits + misses
        return reads == 0 ? nil : Double(hits + lastChanceHits) / Double(reads)
    }

    /// Uncompressed over stored bytes in the last-chance tier; nil when it is empty.
    public var lastChanceCompressionRatio: Double? {
        lastChanceBytesHeld == 0 ? nil : Double(lastChanceUncompressedBytes) / Double(lastChanceBytesHeld)
    }

    mutating func add(_ other: CacheStatistics) {
        hits += other.hits
        lastChanceHits += other.lastChanceHits
        misses += other.misses
        insertions += other.insertions
        redundantInsertions += other.redundantInsertions
        evictions += other.evictions
        lastChanceEvictions += other.lastChanceEvictions
        removals += other.removals
        isolationRefusals += other.isolationRefusals
        bytesHeld += other.bytesHeld
        entries += other.entries
        lastChanceBytesHeld += other.lastChanceBytesHeld
        lastChanceUncompressedBytes += other.lastChanceUncompressedBytes
        lastChanceEntries += other.lastChanceEntries
        bytesSavedBySharing += other.bytesSavedBySharing
    }
}

/// Which tier answered one block lookup.
public enum CacheLookup: Equatable, Sendable {
    case hit
    /// Found in the compressed last-chance tier (and promoted back to main).
    case lastChanceHit
    /// Not found, or held for another sharing group (an isolation refusal).
    case miss
}
