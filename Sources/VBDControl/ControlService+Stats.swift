import VBDCache
import VBDCore
import VBDStore

extension ControlService {
    /// Space, sharing, dedup and compression figures from `Store.usage()` (one walk of every
    /// map under the store lock), plus cache counters when the store reads through a cache.
    func statistics() throws -> StoreStatistics {
        let usage = try store.usage()
        let infos = Dictionary(store.list().map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        let images = usage.images.map { image -> ImageStatistics in
            let info = infos[image.name]
            let fair = UInt64(image.fairStoredBytes.rounded())
            return ImageStatistics(
                name: image.name, kind: info?.isReadOnly == true ? "snapshot" : "volume", size: image.logicalBytes,
                allocatedBytes: image.allocatedBytes, uniqueBytes: image.uniqueBytes, sharedBytes: image.sharedBytes,
                exclusiveStoredBytes: image.exclusiveStoredBytes, fairStoredBytes: fair,
                dataReductionRatio: fair == 0 ? nil : Double(image.allocatedBytes) / image.fairStoredBytes,
                cache: info.flatMap(cacheFigures(of:)))
        }
        let empty = usage.storedBytes == 0 || usage.chunkRawBytes == 0
        return StoreStatistics(
            storePath: storePath, live: status != nil, uniqueChunks: usage.uniqueChunks, storedBytes: usage.storedBytes,
            chunkRawBytes: usage.chunkRawBytes, logicalAllocatedBytes: usage.logicalAllocatedBytes,
            dataFileBytes: usage.dataFileBytes, dataFileBytesOnDisk: StoreFiles.dataBytesOnDisk(storePath),
            metadataBytesOnDisk: StoreFiles.metadataBytesOnDisk(storePath), indexMemoryBytes: usage.indexMemoryBytes,
            dedupRatio: empty ? nil : usage.dedupRatio, compressionRatio: empty ? nil : usage.compressionRatio,
            dataReductionRatio: empty ? nil : Double(usage.logicalAllocatedBytes) / Double(usage.storedBytes),
            images: images, cache: cache.map { CacheFigures($0.statistics, configuration: $0.configuration) })
    }

    /// The cache counts per owner: (image id, its sharing group).
    func cacheOwner(of info: ImageInfo) -> CacheOwner? {
        store.sharingGroup(named: info.group).map { CacheOwner(volume: info.id, group: $0) }
    }

    func cacheFigures(of info: ImageInfo) -> CacheFigures? {
        guard let cache, let owner = cacheOwner(of: info), let figures = cache.statistics(for: owner) else { return nil }
        return CacheFigures(figures, configuration: nil)
    }

    /// The images `delete(name, force:)` removes: the image, and with `force` a volume's snapshots.
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
