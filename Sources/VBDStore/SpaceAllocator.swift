import VBDCore

// MARK: - Notes on the design
//
// The data file is an array of 512-byte sectors; each chunk occupies a run of them. A bitmap
// (1 bit per sector) says which are in use. Allocation is next-fit from a cursor with a bounded
// scan, falling back to appending at the end, so a write never scans the whole bitmap.
//
// Freed space is not reusable at once. Until the journal records that freed it are durable, a
// crash would bring back a state in which the old chunk still lives there, so overwriting it
// would destroy flushed data. Frees therefore wait in `deferred` until `Store.flush` has made
// the records durable, then the sectors become free and fully freed 4 KiB pages of the file
// are hole-punched when they form a run of at least `Store.Options.holePunchRunBytesMin`
// (deleting a volume frees long runs, which is how it gives space back to `du`). Shorter runs,
// the scattered frees of overwrites, stay allocated in the file: allocation reuses them, and
// writing into a page the page cache holds is far cheaper than into a punched one. `gc` punches
// every free page.
//
// The punch runs outside the store lock, so the pages being punched stay marked in use until it
// has finished (`releaseReservingPunches`, `finishPunches`): otherwise a writer could take those
// sectors and write a chunk that the punch then erases after the write was acknowledged.

struct SpaceAllocator {
    private(set) var bitmap: [UInt64] = []
    /// Sectors in the file (allocated or not).
    private(set) var endSector: UInt64 = 0
    private(set) var usedSectors: UInt64 = 0
    private var cursor: Int = 0
    /// Sectors freed in memory whose freeing is not yet durable.
    private(set) var deferred: [(sector: UInt64, count: Int)] = []

    init() {}

    /// An allocator whose sectors in use are the set bits of `words` (an open restores it from
    /// the store's sector map).
    init(bitmapWords words: [UInt64]) {
        var n = words.count
        while n > 0 && words[n - 1] == 0 { n -= 1 }
        bitmap = Array(words[0..<n])
        usedSectors = bitmap.reduce(0) { $0 + UInt64($1.nonzeroBitCount) }
        if let last = bitmap.last {
            endSector = UInt64(bitmap.count - 1) * 64 + UInt64(64 - last.leadingZeroBitCount)
        }
    }

    /// Bitmap words scanned before appending instead: bounds allocation time.
    static let scanWordsMax = 2048

    mutating func markUsed(_ sector: UInt64, count: Int) {
        let end = sector + UInt64(count)
        ensure(end)
        for s in sector..<end {
            let w = Int(s >> 6), b = s & 63
            precondition(bitmap[w] & (1 << b) == 0, "sector \(s) allocated twice")
            bitmap[w] |= 1 << b
        }
        usedSectors += UInt64(count)
        if end > endSector { endSector = end }
    }

    private mutating func ensure(_ sectors: UInt64) {
        let words = Int((sectors + 63) >> 6)
        if bitmap.count < words { bitmap.append(contentsOf: repeatElement(0, count: words - bitmap.count)) }
    }

    @inline(__always)
    private func isFree(_ s: UInt64) -> Bool {
        let w = Int(s >> 6)
        return w >= bitmap.count || bitmap[w] & (1 << (s & 63)) == 0
    }

    /// Sectors freed since the last scan that found nothing: scanning again before enough space
    /// came free would fail the same way, so allocation appends instead (bounded work per write).
    private var freedSinceFailedScan: UInt64 = .max

    /// Finds `count` consecutive free sectors, preferring holes inside the file. A hole is looked
    /// for a word (64 sectors) at a time with bit operations, for at most `scanWordsMax` words.
    mutating func allocate(_ count: Int) -> UInt64 {
        precondition(count > 0)
        let freeInside = endSector - usedSectors
        // Reuse holes only when there is a fair amount of free space, so small holes in a full
        // file do not make every allocation scan; runs longer than a word are always appended.
        if count <= 32 && freeInside >= UInt64(count) * 4 && !bitmap.isEmpty
            && freedSinceFailedScan >= UInt64(count) * 64 {
            let limit = min(bitmap.count, SpaceAllocator.scanWordsMax)
            var w = cursor < bitmap.count ? cursor : 0
            for _ in 0..<limit {
                let word = bitmap[w]
                if word != ~0 {
                    // Bit p of `starts` is set when sectors p..<p+count of this word are all free
                    // (the shifts bring in zeros, so runs never cross the word's end).
                    let free = ~word
                    var starts = free
                    var k = 1
                    while k < count && starts != 0 { starts &= free >> UInt64(k); k += 1 }
                    if starts != 0 {
                        let s = UInt64(w) << 6 + UInt64(starts.trailingZeroBitCount)
                        if s + UInt64(count) <= endSector {
                            markUsed(s, count: count)
                            cursor = w
                            return s
                        }
                    }
                }
                w += 1
                if w == bitmap.count { w = 0 }
            }
            cursor = w
            freedSinceFailedScan = 0
        }
        let s = endSector
        markUsed(s, count: count)
        return s
    }

    /// Frees sectors once the free is durable (see the notes).
    mutating func deferFree(_ sector: UInt64, count: Int) {
        deferred.append((sector, count))
    }

    /// Takes the deferred frees recorded so far; the caller releases them after its flush.
    mutating func takeDeferred() -> [(sector: UInt64, count: Int)] {
        defer { deferred.removeAll() }
        return deferred
    }

    /// Puts frees back after a failed flush, ahead of newer ones.
    mutating func restoreDeferred(_ frees: [(sector: UInt64, count: Int)]) {
        deferred = frees + deferred
    }

    /// Marks sectors free; returns the 4 KiB-aligned byte ranges that are now entirely free and
    /// at least `punchRunBytesMin` long, to be hole-punched.
    mutating func release(_ frees: [(sector: UInt64, count: Int)],
                          punchRunBytesMin: UInt64 = 4096) -> [(offset: UInt64, length: UInt64)] {
        var pages = Set<UInt64>()
        for (sector, count) in frees {
            for s in sector..<sector + UInt64(count) {
                let w = Int(s >> 6), b = s & 63
                precondition(bitmap[w] & (1 << b) != 0, "sector \(s) freed twice")
                bitmap[w] &= ~(1 << b)
            }
            usedSectors -= UInt64(count)
            if freedSinceFailedScan != .max { freedSinceFailedScan += UInt64(count) }
            let first = sector >> 3, last = (sector + UInt64(count) - 1) >> 3
            for p in first...last { pages.insert(p) }
        }
        var punch: [(offset: UInt64, length: UInt64)] = []
        for p in pages.sorted() {
            // 8 sectors per 4 KiB page: all free (one byte of the bitmap), and inside the file's
            // allocated end (an append may take the sectors past it at any time).
            let w = Int((p * 8) >> 6), shift = (p * 8) & 63
            if w < bitmap.count && (bitmap[w] >> shift) & 0xFF == 0 && p * 8 + 8 <= endSector {
                if let last = punch.last, last.offset + last.length == p * 4096 {
                    punch[punch.count - 1].length += 4096
                } else {
                    punch.append((p * 4096, 4096))
                }
            }
        }
        return punchRunBytesMin <= 4096 ? punch : punch.filter { $0.length >= punchRunBytesMin }
    }

    /// Every fully free 4 KiB page inside the file, as runs, each marked in use until
    /// `finishPunches` (as `releaseReservingPunches`): what `gc` punches.
    mutating func reserveFreePagesForPunching() -> [(offset: UInt64, length: UInt64)] {
        var punch: [(offset: UInt64, length: UInt64)] = []
        let pages = endSector / 8
        var p: UInt64 = 0
        while p < pages {
            let w = Int((p * 8) >> 6), shift = (p * 8) & 63
            if w < bitmap.count && bitmap[w] == ~0 && shift == 0 {
                p += 8   // a whole word in use: nothing to punch
                continue
            }
            if w < bitmap.count && bitmap[w] == 0 && shift == 0 && p + 8 <= pages {
                // A whole bitmap word (8 pages) free: take it at once.
                if let last = punch.last, last.offset + last.length == p * 4096 {
                    punch[punch.count - 1].length += 8 * 4096
                } else {
                    punch.append((p * 4096, 8 * 4096))
                }
                p += 8
                continue
            }
            if w >= bitmap.count || (bitmap[w] >> shift) & 0xFF == 0 {
                if let last = punch.last, last.offset + last.length == p * 4096 {
                    punch[punch.count - 1].length += 4096
                } else {
                    punch.append((p * 4096, 4096))
                }
            }
            p += 1
        }
        for r in punch { setPageBits(r, inUse: true) }
        return punch
    }

    /// `release`, but the pages to punch stay marked in use (not counted in `usedSectors`) until
    /// `finishPunches`, so no allocation can take them while the punch runs outside the lock.
    mutating func releaseReservingPunches(_ frees: [(sector: UInt64, count: Int)],
                                          punchRunBytesMin: UInt64) -> [(offset: UInt64, length: UInt64)] {
        let punches = release(frees, punchRunBytesMin: punchRunBytesMin)
        for p in punches { setPageBits(p, inUse: true) }
        return punches
    }

    /// The punches from `releaseReservingPunches` are done (or failed): their pages are free.
    mutating func finishPunches(_ punches: [(offset: UInt64, length: UInt64)]) {
        for p in punches { setPageBits(p, inUse: false) }
    }

    private mutating func setPageBits(_ range: (offset: UInt64, length: UInt64), inUse: Bool) {
        let sectorBytes = UInt64(Limits.sectorBytes)
        for s in range.offset / sectorBytes..<(range.offset + range.length) / sectorBytes {
            let w = Int(s >> 6), b = s & 63
            precondition((bitmap[w] & (1 << b) != 0) != inUse, "punch reservation of sector \(s) out of step")
            if inUse { bitmap[w] |= 1 << b } else { bitmap[w] &= ~(1 << b) }
        }
    }

    /// Frees immediately (used when nothing durable can reference the space: a failed write).
    mutating func releaseNow(_ sector: UInt64, count: Int) {
        _ = release([(sector, count)])
    }

    var bitmapBytes: Int { bitmap.capacity * 8 }

    /// After truncating the file: nothing past `end` is in use (checked by the caller).
    mutating func setEndSector(_ end: UInt64) {
        precondition(end <= endSector)
        endSector = end
        bitmap.removeLast(bitmap.count - Int((end + 63) >> 6))
        if cursor >= bitmap.count { cursor = 0 }
    }
}
