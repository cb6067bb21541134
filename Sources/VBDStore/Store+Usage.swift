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

    /// Walks every image's map once, a window of blocks per hold of the store lock. The cost
    /// follows the allocated blocks of all images, so this is an operator command (and a metrics
    /// refresh), not a hot path; the figures are as of the walk, not of one instant (an image
    /// deleted during it is left out, writes during it are counted where the walk finds them).
    public func usage() throws -> StoreUsage { try usage(elementsPerHold: Self.usageElementsPerHold) }

    /// `usage()` with another window (tests walk tiny windows to cross many holds).
    func usage(elementsPerHold window: UInt64) throws -> StoreUsage {
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
        var holders: [UInt64: (refs: UInt32, firstImage: UInt64, images: UInt8)] = [:]
        // Pass 1: who holds each chunk.
        for id in ids {
            try forEachWindow(of: id) { image, start, count in
                try image.root.walk(start: start, count: count, pager: pager, chunkShared: { _, _ in false }) { _, _, chunk, _ in
                    guard chunk != 0, chunk < zeroAllocatedChunk else { return true }
                    if var h = holders[chunk] {
                        h.refs += 1
                        if h.firstImage != id { h.images = 2 }
                        holders[chunk] = h
                    } else {
                        holders[chunk] = (1, id, 1)
                    }
                    return true
                }
            }
        }
        // Pass 2: per image figures.
        var total = StoreUsage()
        for id in ids {
            var u: ImageUsage?
            var seenExclusive = Set<UInt64>()
            try forEachWindow(of: id) { image, start, count in
                if u == nil { u = ImageUsage(name: fullNameLocked(image.record), logicalBytes: image.record.size) }
                let bs = UInt64(image.record.blockSize)
                var failure: (any Error)?
                try image.root.walk(start: start, count: count, pager: pager, chunkShared: { _, _ in false }) { block, _, chunk, _ in
                    guard chunk != 0, chunk < zeroAllocatedChunk, let h = holders[chunk] else { return true }
                    let bytes = min(bs, image.record.size - block * bs)
                    u!.allocatedBytes += bytes
                    let sectorCount: Int
                    do { sectorCount = try chunks.entry(chunk, pager: pager).sectorCount } catch {
                        failure = error
                        return false
                    }
                    let stored = UInt64(sectorCount * Limits.sectorBytes)
                    if h.refs == 1 {
                        u!.uniqueBytes += bytes
                    } else {
                        u!.sharedBytes += bytes
                    }
                    if h.images == 1 && seenExclusive.insert(chunk).inserted { u!.exclusiveStoredBytes += stored }
                    u!.fairStoredBytes += Double(stored) / Double(h.refs)
                    return true
                }
                if let failure { throw failure }
            }
            // An image deleted before its first window is left out; an empty one still counts.
            if u == nil {
                u = mutex.withLock { images[id].map { ImageUsage(name: fullNameLocked($0.record), logicalBytes: $0.record.size) } }
            }
            guard let u else { continue }
            total.logicalAllocatedBytes += u.allocatedBytes
            total.images.append(u)
        }
        // The chunk table, a range of records per hold.
        let leafElements = UInt64(PagedArray<ChunkRecord>.Leaf.capacity)
        let recordsPerHold = max(leafElements, window / leafElements * leafElements)
        var first: UInt64 = 0
        while true {
            let more: Bool = try mutex.withLock {
                try chunks.records.forEachLeaf(in: first..<(first + recordsPerHold), pager: pager) { _, leaf in
                    for r in leaf.elements where r.entry.isInstalled {
                        total.uniqueChunks += 1
                        total.storedBytes += UInt64(r.entry.sectorCount * Limits.sectorBytes)
                        total.chunkRawBytes += UInt64(r.entry.rawBytes)
                    }
                }
                first += recordsPerHold
                return first < PagedArray<ChunkRecord>.capacity(levels: chunks.records.levels)
                    && chunks.records.root != .none
            }
            if !more { break }
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
                let slice = mutex.withLock { space.reserveFreePagesForPunching(fromPage: from, pageCount: Store.gcPagesPerHold) }
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

extension Store {
    /// Data-file pages `gc` examines per hold of the store lock (1 GiB of file, well under a
    /// millisecond of bitmap scanning).
    static let gcPagesPerHold: UInt64 = 1 << 18
}

extension SpaceAllocator {
    /// One past the last used sector.
    var endSectorInUse: UInt64 {
        var w = bitmap.count
        while w > 0 && bitmap[w - 1] == 0 { w -= 1 }
        guard w > 0 else { return 0 }
        return UInt64(w - 1) * 64 + UInt64(64 - bitmap[w - 1].leadingZeroBitCount)
    }

    mutating func trimEnd() {
        let end = endSectorInUse
        setEndSector(end)
    }
}
