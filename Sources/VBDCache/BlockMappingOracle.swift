/// The store's answer to "which chunk does this volume map here, now?", for the clean-page interface.
///
/// The clean-page cache is coherent because it never trusts what it recorded: a get hits only if the
/// oracle still names the chunk recorded at put. The store implements this over its volume maps.
///
/// ### Isolation
/// Both methods return nil when `domain` does not hold `volume` (no lease, another tenant's volume):
/// a domain must not learn through put/get what another domain's volume contains.
public protocol BlockMappingOracle: Sendable {
    /// The chunk `volume` maps at byte `offset` now, or nil if the block is a hole or zero, the offset
    /// is not block-aligned or out of range, or `domain` may not read `volume`.
    func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64) -> MappedChunk?

    /// Like ``mappedChunk(domain:volume:offset:)``, but only if `page` is exactly that chunk's content,
    /// compared byte for byte (a hash match alone is not enough: docs/INVARIANTS.md 2).
    func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64, verifying page: UnsafeRawBufferPointer) -> MappedChunk?
}

/// A chunk a volume maps, and the cache owner its reads are charged to.
public struct MappedChunk: Hashable, Sendable {
    /// The chunk key, as used with ``BlockCache``.
    public var key: UInt64
    /// The volume and its sharing group.
    public var owner: CacheOwner

    public init(key: UInt64, owner: CacheOwner) {
        self.key = key
        self.owner = owner
    }
}
