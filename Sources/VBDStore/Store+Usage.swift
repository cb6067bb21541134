import VBDCore

/// Space figures of one image (volume or snapshot).
public struct ImageUsage: Equatable, Sendable {
    public var name: String
    /// The image's size.
    public var logicalBytes: UInt64
    /// Bytes of blocks that hold data (neither holes nor zero).
    public var allocatedBytes: UInt64 = 0
    /// Allocated bytes whose contents no other image holds.
    public var uniqueBytes: UInt64 = 0
    /// Allocated bytes whose contents another image (or another block) also holds.
    public var sharedBytes: UInt64 = 0
    /// Bytes on disk of the chunks only this image holds.
    public var exclusiveStoredBytes: UInt64 = 0
    /// This image's fair share of the bytes on disk: every chunk's stored size split evenly among
    /// the blocks (of all images) that hold it, so the shares of all images add up to the store's
    /// stored bytes.
    public var fairStoredBytes: Double = 0
}

/// Store-wide space figures.
public struct StoreUsage: Equatable, Sendable {
    public var images: [ImageUsage] = []
    public var uniqueChunks = 0
    /// Bytes on disk of all chunks (compressed sizes, rounded to sectors).
    public var storedBytes: UInt64 = 0
    /// Uncompressed bytes of all chunks.
    public var chunkRawBytes: UInt64 = 0
    /// Allocated bytes summed over all images (what the data would take without sharing).
    public var logicalAllocatedBytes: UInt64 = 0
    /// Bytes of the data file on disk (what `du` counts), when known.
    public var dataFileBytes: UInt64 = 0
    public var indexMemoryBytes = 0

    public init() {}

    /// Raw chunk bytes per stored byte (LZ4).
    public var compressionRatio: Double { storedBytes == 0 ? 1 : Double(chunkRawBytes) / Double(storedBytes) }
    /// Logical allocated bytes per unique raw byte (dedup, snapshots and shares together).
    public var dedupRatio: Double { chunkRawBytes == 0 ? 1 : Double(logicalAllocatedBytes) / Double(chunkRawBytes) }
}

extension Store {
    /// Map blocks (or chunk records) `usage` visits per hold of the store lock: a few
    /// milliseconds at most, so that a metrics scrape of a large store never stalls I/O for long.
    static let usageElementsPerHold: UInt64 = 1 << 15
    /// Chunk numbers one pass of `usage` counts holders for: its two arrays take 8 bytes per
    /// chunk number (32 MiB), whatever the store's size; a store with more chunks takes more passes.
    static let usageChunksPerPass: UInt64 = 1 << 22

    /// Walks every image's map, a window of blocks per hold of the store lock, twice per range of
    /// chunk numbers. The cost follows the allocated blocks of all images, so this is an operator
    /// command (and a metrics refresh), not a hot path; the figures are as of the walk, not of one
    /// instant (an image deleted during it is left out, writes during it are counted where the
    /// walk finds them).
    public func usage() throws -> StoreUsage { try usage(elementsPerHold: Self.usageElementsPerHold) }

    /// `usage()` with other windows (tests walk tiny ones to cross many holds and passes).
    func usage(elementsPerHold window: UInt64, chunksPerPass: UInt64 = Store.usageChunksPerPass) throws -> StoreUsage {
        let ids: [UInt64] = mutex.withLock {
            images.values.sorted { fullNameLocked($0.record) < fullNameLocked($1.record) }.map(\.record.id)
        }
        /// Calls `body` under the lock for each window of `id`'s blocks, while the image exists.
        func forEachWindow(of id: UInt64, _ body: (Image, UInt64, UInt64) throws -> Void) throws {
            var start: UInt64 = 0
            while true {
                let more: Bool = try mutex.withLock {
                    guard let image = images[id], start < image.record.blockCount else { return false }
                    let count = min(window, image.record.blockCount - start)
                    try body(image, start, count)
                    start += count
                    return start < image.record.blockCount
                }
                if !more { return }
            }
        }
        var figures: [ImageUsage?] = mutex.withLock {
            ids.map { id in images[id].map { ImageUsage(name: fullNameLocked($0.record), logicalBytes: $0.record.size) } }
        }
        var total = StoreUsage()
        /// Calls `body` with each block of every image that maps a chunk of `range` (with the
        /// image's index and the chunk's position in the range), a window of blocks per hold.
        func forEachBlock(holding range: Range<UInt64>,
                          _ body: (_ index: Int, _ image: Image, _ block: UInt64, _ chunk: UInt64, _ k: Int) throws -> Void) throws {
            for (index, id) in ids.enumerated() where figures[index] != nil {
                try forEachWindow(of: id) { image, start, blocks in
                    var failure: (any Error)?
                    try image.root.walk(start: start, count: blocks, pager: pager, chunkShared: { _, _ in false }) { block, _, chunk, _ in
                        guard range.contains(chunk) else { return true }
                        do { try body(index, image, block, chunk, Int(chunk - range.lowerBound)) } catch {
                            failure = error
                            return false
                        }
                        return true
                    }
                    if let failure { throw failure }
                }
            }
        }
        var first: UInt64 = 1
        while true {
            let end = mutex.withLock { chunks.end }
            guard first < end else { break }
            let count = Int(min(chunksPerPass, end - first))
            let range = first..<(first + UInt64(count))
            // Per chunk number of the range: the blocks that hold it, and the one image holding it
            // (index + 1), or `manyImages`.
            let manyImages = UInt32.max
            var holders = [UInt32](repeating: 0, count: count)
            var holderImage = [UInt32](repeating: 0, count: count)
            try forEachBlock(holding: range) { index, _, _, _, k in
                let me = UInt32(index + 1)
                if holders[k] < UInt32.max { holders[k] += 1 }
                holderImage[k] = holderImage[k] == 0 || holderImage[k] == me ? me : manyImages
            }
            // Per image figures of the blocks holding a chunk of the range.
            try forEachBlock(holding: range) { index, image, block, chunk, k in
                guard holders[k] > 0 else { return }   // stored after the first walk passed
                let bs = UInt64(image.record.blockSize)
                let bytes = min(bs, image.record.size - block * bs)
                let sectorCount = try chunks.entry(chunk, pager: pager).sectorCount
                figures[index]!.allocatedBytes += bytes
                if holders[k] == 1 {
                    figures[index]!.uniqueBytes += bytes
                } else {
                    figures[index]!.sharedBytes += bytes
                }
                figures[index]!.fairStoredBytes += Double(sectorCount * Limits.sectorBytes) / Double(holders[k])
            }
            // The chunk table's records of the range, a run of leaves per hold: store-wide
            // figures, and the chunks only one image holds.
            let leafElements = UInt64(PagedArray<ChunkRecord>.Leaf.capacity)
            let recordsPerHold = max(leafElements, window / leafElements * leafElements)
            var next = range.lowerBound / leafElements * leafElements
            while next < range.upperBound {
                try mutex.withLock {
                    try chunks.records.forEachLeaf(in: next..<min(next + recordsPerHold, range.upperBound), pager: pager) { leafFirst, leaf in
                        for (i, r) in leaf.elements.enumerated() where r.entry.isInstalled {
                            let chunk = leafFirst + UInt64(i)
                            guard range.contains(chunk) else { continue }
                            let stored = UInt64(r.entry.sectorCount * Limits.sectorBytes)
                            total.uniqueChunks += 1
                            total.storedBytes += stored
                            total.chunkRawBytes += UInt64(r.entry.rawBytes)
                            let image = holderImage[Int(chunk - range.lowerBound)]
                            if image != 0 && image != manyImages { figures[Int(image) - 1]?.exclusiveStoredBytes += stored }
                        }
                    }
                }
                next += recordsPerHold
            }
            first = range.upperBound
        }
        for (index, id) in ids.enumerated() {
            // An image deleted during the walk is left out.
            guard let u = figures[index], mutex.withLock({ images[id] != nil }) else { continue }
            total.logicalAllocatedBytes += u.allocatedBytes
            total.images.append(u)
        }
        total.dataFileBytes = (try? dataFile.size()) ?? 0
        total.indexMemoryBytes = mutex.withLock { pager.residentBytes + space.bitmapBytes }
        return total
    }

    /// Reclaims what can be reclaimed now: makes pending frees durable (so their space is reused),
    /// writes a checkpoint (which empties the journal), hole-punches every free page of the data
    /// file and trims free space at its end. Returns the data file's size before and after.
    @discardableResult
    public func gc() throws -> (before: UInt64, after: UInt64) {
        let collected = try collectGarbage()
        return (collected.dataFileBytesBefore, collected.dataFileBytesAfter)
    }

    /// `gc()`, with what the chunk storage released that no record claimed (RADOS's leak sweep;
    /// the data file has none).
    public func collectGarbage() throws -> GarbageCollected {
        let sizes = try reclaimDataFileSpace()
        // Last, outside `flushMutex`: the storage's sweep flushes (docs/RADOS.md, "The sweep in gc").
        let unclaimed = try chunkStorage.releaseUnclaimed(claimedBy: self)
        return GarbageCollected(dataFileBytesBefore: sizes.before, dataFileBytesAfter: sizes.after, unclaimedChunks: unclaimed)
    }

    private func reclaimDataFileSpace() throws -> (before: UInt64, after: UInt64) {
        let before = (try? dataFile.size()) ?? 0
        try flush()
        // On a full disk a new checkpoint may not fit even though the flush above freed space
        // (its frees are punched); the journal stays, and the data file is still trimmed.
        do { try checkpoint() } catch StoreError.noSpace {}
        try flushMutex.withLock {
            // Flushes punch only long runs of freed pages; the scattered rest goes back now, a
            // slice of the file per hold of the store lock.
            var next: UInt64? = 0
            while let from = next {
                // The slice's sector-map leaves are read before the lock is held for it.
                let slice = withLockAfterLoadingPages(probingAlways: true, probe: {
                    probeSectorMap(fromPage: from, pageCount: Store.gcPagesPerHold)
                }) { space.reserveFreePagesForPunching(fromPage: from, pageCount: Store.gcPagesPerHold) }
                punchReserved(slice.punches)
                next = slice.nextPage
            }
            let truncated = try mutex.withLock { () throws -> Bool in
                let end = space.endSectorInUse * UInt64(Limits.sectorBytes)
                guard try dataFile.size() > end else { return false }
                // Its free tail was punched above, so the truncate has little left to free.
                try dataFile.truncate(to: end)
                space.trimEnd()
                return true
            }
            if truncated { try dataFile.sync() }
        }
        return (before, (try? dataFile.size()) ?? 0)
    }
}

/// What `Store.collectGarbage()` did.
public struct GarbageCollected: Equatable, Sendable {
    public var dataFileBytesBefore: UInt64
    public var dataFileBytesAfter: UInt64
    public var unclaimedChunks: UnclaimedChunkRelease
}

extension Store {
    /// Data-file pages `gc` examines per hold of the store lock (1 GiB of file, well under a
    /// millisecond of bitmap scanning).
    static let gcPagesPerHold: UInt64 = 1 << 18
}
