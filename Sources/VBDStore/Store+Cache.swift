import VBDCache
import VBDCore

/// The universal cache serves the store directly: (generation, chunk number) pairs are its keys
/// (`Store.cacheKey`), and the owner
/// (volume, sharing group) feeds its per-volume counters.
extension BlockCache: ChunkCache {
    public func lookup(_ key: UInt64, into buffer: UnsafeMutableRawBufferPointer, volume: UInt64, group: SharingGroupID,
                       countingMisses: Bool) -> CacheLookup {
        lookup(key, into: buffer, owner: CacheOwner(volume: volume, group: group), countingMisses: countingMisses)
    }

    public func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, volume: UInt64, group: SharingGroupID) {
        insert(key, bytes: bytes, owner: CacheOwner(volume: volume, group: group))
    }

    public func insert(_ key: UInt64, bytes: UnsafeRawBufferPointer, volume: UInt64, group: SharingGroupID, ifUnremovedSince token: UInt64) {
        insert(key, bytes: bytes, owner: CacheOwner(volume: volume, group: group), ifUnremovedSince: token)
    }
}

/// Lets the last-chance tier's clean-page interface check coherence against the live maps: a
/// page is only served while the volume still maps that offset to the same chunk, and only to a
/// domain that holds the volume.
public struct StoreMappingOracle: BlockMappingOracle {
    public let store: Store
    /// Whether a hypervisor domain holds the image of this export name (`VOLUME` or
    /// `VOLUME@SNAPSHOT`) and id now; the server answers from its tenants' leases, which follow
    /// the image by its id (a lease on an earlier image of the same name holds nothing).
    public let holds: @Sendable (HypervisorDomain, String, UInt64) -> Bool

    public init(store: Store, holds: @escaping @Sendable (_ domain: HypervisorDomain, _ image: String, _ imageID: UInt64) -> Bool) {
        self.store = store
        self.holds = holds
    }

    private func domain(_ domain: HypervisorDomain, holds volume: UInt64) -> Bool {
        guard let name = store.imageName(id: volume) else { return false }
        return holds(domain, name, volume)
    }

    public func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64) -> MappedChunk? {
        guard self.domain(domain, holds: volume) else { return nil }
        return store.mappedChunk(image: volume, offset: offset)
    }

    public func mappedChunk(domain: HypervisorDomain, volume: UInt64, offset: UInt64, verifying page: UnsafeRawBufferPointer) -> MappedChunk? {
        guard self.domain(domain, holds: volume),
              let found = store.mappedChunk(image: volume, offset: offset, pageBytes: page.count) else { return nil }
        // The page must be exactly the mapped block's contents (clean data), compared byte for byte.
        let same: Bool = withUnsafeTemporaryAllocation(byteCount: page.count, alignment: 16) { tmp in
            guard (try? store.read(image: volume, offset: offset, into: tmp)) != nil else { return false }
            return memcmp(tmp.baseAddress!, page.baseAddress!, page.count) == 0
        }
        guard same, store.mappedChunk(image: volume, offset: offset) == found else { return nil }
        return found
    }
}

#if canImport(Glibc)
import Glibc
#endif

extension Store {
    /// The export name (`VOLUME` or `VOLUME@SNAPSHOT`) of an image, if it still exists.
    public func imageName(id: UInt64) -> String? {
        mutex.withLock { images[id].map { fullNameLocked($0.record) } }
    }

    /// The chunk a volume maps at a block-aligned byte offset, or nil for unmapped, zero or
    /// unaligned offsets, or a page that is not exactly one block.
    func mappedChunk(image id: UInt64, offset: UInt64, pageBytes: Int? = nil) -> MappedChunk? {
        mutex.withLock {
            guard let image = images[id] else { return nil }
            let bs = UInt64(image.record.blockSize)
            guard offset % bs == 0, offset < image.record.size, pageBytes == nil || pageBytes == Int(bs) else { return nil }
            guard let c = try? image.root.lookup(offset / bs, pager: pager), c != 0, c < zeroAllocatedChunk,
                  let key = try? cacheKey(c) else { return nil }
            return MappedChunk(key: key, owner: CacheOwner(volume: id, group: image.record.group))
        }
    }
}
