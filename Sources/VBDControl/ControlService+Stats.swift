import VBDCache
import VBDCore
import VBDStore

extension ControlService {
    /// Space and sharing figures for the store and for every image, computed from public store
    /// API: the extents of each image (with the store's `shared` flag) and the store's totals.
    ///
    /// Per-image compression needs the stored length of each chunk, which the store does not
    /// expose; compression is reported store-wide only (see the report to the lead:
    /// `Store.usage(of:)`).
    func statistics() throws -> StoreStatistics {
        var images: [ImageUsage] = []
        var referencedBlocks: UInt64 = 0
        var referencedBytes: UInt64 = 0
        for info in store.list() {
            let walk = try usage(of: info)
            images.append(walk.usage)
            referencedBlocks += walk.dataBlocks
            referencedBytes += walk.usage.dataBytes
        }
        let chunks = store.uniqueChunkCount
        let stored = store.storedBytes
        var dedup: Double?, compression: Double?, reduction: Double?
        if chunks > 0 && referencedBlocks > 0 && stored > 0 {
            dedup = Double(referencedBlocks) / Double(chunks)
            let averageBlockBytes = Double(referencedBytes) / Double(referencedBlocks)
            compression = Double(chunks) * averageBlockBytes / Double(stored)
            reduction = Double(referencedBytes) / Double(stored)
        }
        return StoreStatistics(
            storePath: storePath, live: status != nil, uniqueChunks: chunks, storedBytes: stored,
            dataFileBytesOnDisk: StoreFiles.dataBytesOnDisk(storePath),
            metadataBytesOnDisk: StoreFiles.metadataBytesOnDisk(storePath), indexMemoryBytes: store.indexMemoryBytes,
            referencedBlocks: referencedBlocks, referencedBytes: referencedBytes, dedupRatio: dedup,
            compressionRatio: compression, dataReductionRatio: reduction, images: images,
            cache: cache.map { CacheFigures($0.statistics, configuration: $0.configuration) })
    }

    struct ImageWalk {
        var usage: ImageUsage
        /// Blocks that map stored content (a partial last block counts as one).
        var dataBlocks: UInt64
        /// Byte offset of the first such block, if any.
        var firstDataOffset: UInt64?
    }

    /// Walks the extents of one image in bounded batches.
    func usage(of info: ImageInfo) throws -> ImageWalk {
        let device = try store.device(named: info.name)
        var usage = ImageUsage(name: info.name, kind: info.isReadOnly ? "snapshot" : "volume", size: info.size,
                               allocatedBytes: 0, dataBytes: 0, zeroBytes: 0, uniqueBytes: 0, sharedBytes: 0, cache: nil)
        var walk = ImageWalk(usage: usage, dataBlocks: 0, firstDataOffset: nil)
        let blockBytes = UInt64(info.blockSize)
        var offset: UInt64 = 0
        while offset < info.size {
            let extents = try device.extents(offset: offset, length: info.size - offset, maxExtents: ControlLimits.extentsPerCallMax)
            guard !extents.isEmpty else { break }
            for extent in extents {
                if extent.flags.contains(.hole) {
                    // no storage
                } else if extent.flags.contains(.zero) {
                    usage.zeroBytes += extent.length
                } else {
                    if walk.firstDataOffset == nil { walk.firstDataOffset = offset }
                    usage.dataBytes += extent.length
                    walk.dataBlocks += (extent.length + blockBytes - 1) / blockBytes
                    if extent.flags.contains(.shared) { usage.sharedBytes += extent.length } else { usage.uniqueBytes += extent.length }
                }
                offset += extent.length
            }
        }
        usage.allocatedBytes = usage.dataBytes + usage.zeroBytes
        if let cache, let owner = cacheOwner(of: info, firstDataOffset: walk.firstDataOffset),
           let figures = cache.statistics(for: owner) {
            usage.cache = CacheFigures(figures, configuration: nil)
        }
        walk.usage = usage
        return walk
    }

    /// The cache counts per (volume, sharing group); the group's number is not in `ImageInfo`, so
    /// it is read from the mapping oracle at a block that holds data. An image without data has
    /// never put anything in the cache.
    func cacheOwner(of info: ImageInfo, firstDataOffset: UInt64? = nil) -> CacheOwner? {
        let offset: UInt64?
        if let firstDataOffset {
            offset = firstDataOffset
        } else {
            offset = try? firstDataBlockOffset(of: info)
        }
        guard let offset else { return nil }
        let aligned = offset / UInt64(info.blockSize) * UInt64(info.blockSize)
        return StoreMappingOracle(store: store).mappedChunk(domain: 0, volume: info.id, offset: aligned)?.owner
    }

    private func firstDataBlockOffset(of info: ImageInfo) throws -> UInt64? {
        let device = try store.device(named: info.name)
        var offset: UInt64 = 0
        while offset < info.size {
            let extents = try device.extents(offset: offset, length: info.size - offset, maxExtents: ControlLimits.extentsPerCallMax)
            guard !extents.isEmpty else { return nil }
            for extent in extents {
                if !extent.flags.contains(.zero) { return offset }
                offset += extent.length
            }
        }
        return nil
    }

    /// The image `delete(name, force:)` would remove: the image, and with `force` a volume's snapshots.
    func imagesRemoved(byDeleting name: String, force: Bool) -> [ImageInfo] {
        let all = store.list()
        guard let target = all.first(where: { $0.name == name }) else { return [] }
        guard force, !target.isReadOnly else { return [target] }
        return [target] + all.filter { $0.isReadOnly && $0.name.hasPrefix(name + "@") }
    }
}

extension CacheFigures {
    init(_ s: CacheStatistics, configuration: BlockCache.Configuration?) {
        self.init(capacityBytes: configuration?.capacityBytes, lastChanceCapacityBytes: configuration?.lastChanceCapacityBytes,
                  hits: s.hits, lastChanceHits: s.lastChanceHits, misses: s.misses, hitRatio: s.hitRatio,
                  bytesHeld: s.bytesHeld, entries: s.entries, lastChanceBytesHeld: s.lastChanceBytesHeld,
                  lastChanceEntries: s.lastChanceEntries, lastChanceCompressionRatio: s.lastChanceCompressionRatio,
                  bytesSavedBySharing: s.bytesSavedBySharing)
    }
}
