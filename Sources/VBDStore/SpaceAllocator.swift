import VBDCore

// MARK: - Notes on the design
//
// The data file is an array of 512-byte sectors; each chunk occupies a run of them. A bitmap
// (1 bit per sector) says which are in use. Allocation is next-fit from a cursor with a bounded
// scan, falling back to appending at the end, so a write never scans the whole bitmap. Each
// release moves the cursor to the lowest word it freed, so the writes after a flush fill the
// space that flush gave back.
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
// Long runs are punched only beyond a budget of free space kept for reuse: overwriting a volume
// frees long runs at every flush, and punching them only for the next writes to refault the
// same pages (a zeroed page, a block allocation, a discard) cost more than the writes' own copy
// (Benchmarks/README.md, "Issue 14, second round"). The budget is twice what the writers
// allocated while those frees were recorded (they will want as much again before the next
// flush; halved per flush without writes), capped by `Store.Options.unpunchedFreeBytesMax`; frees with no
// writes around them (a deleted volume, a trim) are punched as before. Punched pages are tracked (`punchedPages`) so the budget counts
// only free space that still occupies the file.
//
// The punch runs outside the store lock, so the pages being punched stay marked in use until it
// has finished (`releaseReservingPunches`, `finishPunches`): otherwise a writer could take those
// sectors and write a chunk that the punch then erases after the write was acknowledged.
//
// The allocator keeps no bitmap of its own. What is in use is the union of the store's sector map
// (paged, committed with the metadata, read on demand through the pager under its budget: the
// sectors of installed chunks) and a small in-memory `overlay` of sectors in use that the sector
// map does not hold: allocations whose chunk record is not applied yet, frees not yet durable,
// pages reserved while being punched. All three are bounded by the work in flight and between
// flushes, so the allocator's RAM does not grow with the data file. The store's free-space
// summary (`SpaceSummary`, in the superblock) gives the counts an open needs without reading the
// sector map. A sector-map page that cannot be read counts as in use (never allocated, never
// punched), so a failed read costs only an append.
//
// The allocator keeps the words of the sector-map leaf it read last (`memoWords`: one leaf, 4 KiB):
// consecutive allocations fall in the same leaf (next-fit), and going through the pager for each
// one cost more than the rest of the allocation (Benchmarks/README.md, "Issue 14, sixth round").
// The memo is kept exact rather than invalidated: the store reports every word of the sector map
// it changes (`sectorMapWordChanged`, from `Store.setSectors`, the map's only writer), and the
// memo takes the new value. A memo missing a sector the map gained would hand that sector out
// again while a chunk lives in it.

struct SpaceAllocator {
    /// The words of sector-map leaf `k` (sectors `k * sectorsPerLeaf ..<`): empty when the leaf is
    /// absent (all free), nil when it cannot be read (then its sectors count as in use).
    typealias InstalledLeaf = (UInt64) -> [UInt64]?

    /// The store's sector map; a standalone allocator (tests, fsck) has none installed.
    private let installedLeaf: InstalledLeaf
    /// Sectors in use that the sector map does not hold (see the notes), by word: bit `s % 64` of
    /// `overlay[s / 64]`. Words that become zero are removed.
    private var overlay: [Int: UInt64] = [:]
    /// Sectors in the file (allocated or not).
    private(set) var endSector: UInt64 = 0
    private(set) var usedSectors: UInt64 = 0
    private var cursor: Int = 0
    /// Sectors freed in memory whose freeing is not yet durable.
    private(set) var deferred: [(sector: UInt64, count: Int)] = []
    /// One bit per 4 KiB page of the file: free and hole-punched (no file block behind it).
    private var punchedPages: [UInt64] = []
    /// Sectors of the pages in `punchedPages` (8 per page).
    private(set) var punchedFreeSectors: UInt64 = 0

    /// Free sectors inside the file that still occupy file blocks (freed, not punched).
    var unpunchedFreeSectors: UInt64 { endSector - usedSectors - punchedFreeSectors }
    /// Sectors `allocate` handed out since the last `takeDeferred`.
    private var allocatedSinceTake: UInt64 = 0
    /// Sectors allocated between the last two `takeDeferred` calls (while the frees being
    /// released were recorded), or half the previous figure if that is more: flushes that follow
    /// each other closely (several writers finding the journal full) must not read as "no
    /// writes". What a release keeps unpunched for reuse.
    private(set) var recentlyAllocatedSectors: UInt64 = 0

    /// Words of one sector-map leaf.
    static let wordsPerLeaf = ArrayLeafPage<UInt64>.capacity

    /// An allocator with nothing installed (tests, fsck's own count).
    init() { installedLeaf = { _ in [] } }

    /// The allocator of a store whose sector map (read through `installedLeaf`) holds
    /// `usedSectors` sectors, none at or past `endSector`: what the free-space summary says.
    init(endSector: UInt64, usedSectors: UInt64, installedLeaf: @escaping InstalledLeaf) {
        self.installedLeaf = installedLeaf
        self.endSector = endSector
        self.usedSectors = usedSectors
    }

    /// Bitmap words scanned before appending instead: bounds allocation time.
    static let scanWordsMax = 2048

    /// The sector-map leaf read last (`memoLeaf`) and its words as the map holds them now (empty:
    /// the leaf is absent, all free), kept across operations and updated by `sectorMapWordChanged`
    /// (see the notes). An unreadable leaf is read again by the next operation
    /// (`forgetUnreadableLeaf`).
    private var memoLeaf: UInt64 = .max
    private var memoWords: [UInt64] = []
    private var memoUnreadable = false

    private var wordCount: Int { Int((endSector + 63) >> 6) }

    /// Sectors of word `w` that the sector map holds (all, if its page is unreadable).
    private mutating func installedWord(_ w: Int) -> UInt64 {
        let k = UInt64(w / Self.wordsPerLeaf)
        if k != memoLeaf {
            memoLeaf = k
            let words = installedLeaf(k)
            memoWords = words ?? []
            memoUnreadable = words == nil
        }
        if memoUnreadable { return ~0 }
        let i = w % Self.wordsPerLeaf
        return i < memoWords.count ? memoWords[i] : 0
    }

    /// Sectors of word `w` in use: installed or in the overlay (all, if its page is unreadable).
    private mutating func word(_ w: Int) -> UInt64 {
        let installed = installedWord(w)
        return installed == ~0 ? installed : installed | (overlay[w] ?? 0)
    }

    /// An operation starts: a leaf that could not be read is tried again (its read may succeed
    /// now); within one operation it stays unread.
    private mutating func forgetUnreadableLeaf() {
        if memoUnreadable { memoLeaf = .max; memoWords = []; memoUnreadable = false }
    }

    /// The store set word `w` of the sector map to `bits` (a record applied, live or replayed):
    /// the memo, if it holds that leaf, takes the new value.
    mutating func sectorMapWordChanged(_ w: UInt64, to bits: UInt64) {
        guard w / UInt64(Self.wordsPerLeaf) == memoLeaf, !memoUnreadable else { return }
        let i = Int(w % UInt64(Self.wordsPerLeaf))
        if memoWords.isEmpty {   // the leaf was absent (all free); the store just created it
            if bits == 0 { return }
            memoWords = Array(repeating: 0, count: Self.wordsPerLeaf)
        }
        memoWords[i] = bits
    }

    /// The sectors `sector..<end` that lie in word `sector / 64`, as a mask of that word.
    @inline(__always)
    private static func wordMask(_ sector: UInt64, _ end: UInt64) -> (word: Int, mask: UInt64, next: UInt64) {
        let w = sector >> 6
        let next = min(end, (w + 1) << 6)
        let n = next - sector
        let mask = (n == 64 ? ~0 : (UInt64(1) << n) - 1) << (sector & 63)
        return (Int(w), mask, next)
    }

    /// Sets `mask` in the overlay's word `w`.
    @inline(__always)
    private mutating func overlayInsert(_ w: Int, _ mask: UInt64) {
        overlay[w, default: 0] |= mask
    }

    /// Clears `mask` in the overlay's word `w` (removing the word when it becomes zero); returns
    /// the bits of `mask` that were set.
    @inline(__always)
    private mutating func overlayRemove(_ w: Int, _ mask: UInt64) -> UInt64 {
        guard let i = overlay.index(forKey: w) else { return 0 }
        let bits = overlay.values[i]
        if bits & ~mask == 0 {
            overlay.remove(at: i)
        } else {
            overlay.values[i] = bits & ~mask
        }
        return bits & mask
    }

    mutating func markUsed(_ sector: UInt64, count: Int) {
        let end = sector + UInt64(count)
        var s = sector
        while s < end {
            let (w, mask, next) = Self.wordMask(s, end)
            let taken = word(w) & mask
            precondition(taken == 0, "sector \(UInt64(w) << 6 + UInt64(taken.trailingZeroBitCount)) allocated twice")
            overlayInsert(w, mask)
            s = next
        }
        usedSectors += UInt64(count)
        if end > endSector { endSector = end }
        if punchedFreeSectors > 0 { unmarkPunched(firstPage: sector >> 3, lastPage: (end - 1) >> 3) }
    }

    /// The store applied the record installing a chunk at these sectors: the sector map holds
    /// them now, so the overlay no longer does (sectors no allocation took become used).
    mutating func noteInstalled(_ sector: UInt64, count: Int) {
        let end = sector + UInt64(count)
        var s = sector
        while s < end {
            let (w, mask, next) = Self.wordMask(s, end)
            let fromOverlay = overlayRemove(w, mask)
            usedSectors += UInt64((mask & ~fromOverlay).nonzeroBitCount)
            s = next
        }
        endSector = max(endSector, end)
    }

    /// Pages about to hold data again are no longer punched (the write gives them a block).
    private mutating func unmarkPunched(firstPage: UInt64, lastPage: UInt64) {
        for p in firstPage...lastPage {
            let w = Int(p >> 6), b = p & 63
            guard w < punchedPages.count, punchedPages[w] & (1 << b) != 0 else { continue }
            punchedPages[w] &= ~(1 << b)
            punchedFreeSectors -= 8
        }
    }

    /// Records that the pages of `range` (4 KiB-aligned, free) were hole-punched.
    private mutating func markPunched(_ range: (offset: UInt64, length: UInt64)) {
        for p in range.offset / 4096..<(range.offset + range.length) / 4096 {
            let w = Int(p >> 6), b = p & 63
            if punchedPages.count <= w { punchedPages.append(contentsOf: repeatElement(0, count: w + 1 - punchedPages.count)) }
            guard punchedPages[w] & (1 << b) == 0 else { continue }
            punchedPages[w] |= 1 << b
            punchedFreeSectors += 8
        }
    }

    /// Sectors freed since the last scan that found nothing: scanning again before enough space
    /// came free would fail the same way, so allocation appends instead (bounded work per write).
    private var freedSinceFailedScan: UInt64 = .max

    /// Bit p is set when sectors p..<p+count of a word whose free sectors are `free` are all free
    /// (the shifts bring in zeros, so runs never cross the word's end).
    @inline(__always)
    private static func runStarts(free: UInt64, _ count: Int) -> UInt64 {
        var starts = free
        var k = 1
        while k < count && starts != 0 { starts &= free >> UInt64(k); k += 1 }
        return starts
    }

    /// Finds `count` consecutive free sectors, preferring holes inside the file. A hole is looked
    /// for a word (64 sectors) at a time with bit operations, for at most `scanWordsMax` words.
    mutating func allocate(_ count: Int) -> UInt64 {
        precondition(count > 0)
        forgetUnreadableLeaf()
        allocatedSinceTake += UInt64(count)
        let freeInside = endSector - usedSectors
        let words = wordCount
        // Reuse holes only when there is a fair amount of free space, so small holes in a full
        // file do not make every allocation scan; runs longer than a word are always appended.
        if count <= 32 && freeInside >= UInt64(count) * 4 && words > 0
            && freedSinceFailedScan >= UInt64(count) * 64 {
            let limit = min(words, SpaceAllocator.scanWordsMax)
            var w = cursor < words ? cursor : 0
            for _ in 0..<limit {
                // The overlay only adds sectors in use, so a word whose installed sectors leave
                // no run long enough is passed without looking the overlay up.
                let installed = installedWord(w)
                if Self.runStarts(free: ~installed, count) != 0 {
                    let starts = Self.runStarts(free: ~(installed | (overlay[w] ?? 0)), count)
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
                if w == words { w = 0 }
            }
            cursor = w
            freedSinceFailedScan = 0
        }
        let s = endSector
        markUsed(s, count: count)
        return s
    }

    /// Frees sectors once the free is durable (see the notes). The store has just taken them out
    /// of the sector map, so they move to the overlay until then (a standalone allocator's
    /// sectors are there already).
    mutating func deferFree(_ sector: UInt64, count: Int) {
        deferred.append((sector, count))
        let end = sector + UInt64(count)
        var s = sector
        while s < end {
            let (w, mask, next) = Self.wordMask(s, end)
            overlayInsert(w, mask)
            s = next
        }
    }

    /// Takes the deferred frees recorded so far; the caller releases them after its flush.
    mutating func takeDeferred() -> [(sector: UInt64, count: Int)] {
        defer { deferred.removeAll() }
        recentlyAllocatedSectors = max(allocatedSinceTake, recentlyAllocatedSectors / 2)
        allocatedSinceTake = 0
        return deferred
    }

    /// Puts frees back after a failed flush, ahead of newer ones.
    mutating func restoreDeferred(_ frees: [(sector: UInt64, count: Int)]) {
        deferred = frees + deferred
    }

    /// Marks sectors free; returns the 4 KiB-aligned byte ranges that are now entirely free and
    /// at least `punchRunBytesMin` long, to be hole-punched. With `unpunchedFreeBytesMax` above
    /// zero, only as many of those runs (in file order) as bring the free space still occupying
    /// the file down to the budget, twice `recentlyAllocatedSectors` but at most
    /// `unpunchedFreeBytesMax`; the rest stay for reuse (see the notes).
    mutating func release(_ frees: [(sector: UInt64, count: Int)], punchRunBytesMin: UInt64 = 4096,
                          unpunchedFreeBytesMax: UInt64 = 0) -> [(offset: UInt64, length: UInt64)] {
        forgetUnreadableLeaf()
        var pages: [UInt64] = []
        pages.reserveCapacity(frees.count * 2)
        var lowestWord = Int.max
        for (sector, count) in frees {
            lowestWord = min(lowestWord, Int(sector >> 6))
            let end = sector + UInt64(count)
            var s = sector
            while s < end {
                let (w, mask, next) = Self.wordMask(s, end)
                let was = overlayRemove(w, mask)
                precondition(was == mask, "sector \(UInt64(w) << 6 + UInt64((mask & ~was).trailingZeroBitCount)) freed twice")
                s = next
            }
            usedSectors -= UInt64(count)
            if freedSinceFailedScan != .max { freedSinceFailedScan += UInt64(count) }
            let first = sector >> 3, last = (end - 1) >> 3
            for p in first...last { pages.append(p) }
        }
        pages.sort()
        // The next allocations look here first: the space just freed, whose pages the file (and
        // likely the page cache) still holds. A cursor left where a scan last failed would make
        // every write until the next flush append, and the freed space pile up until punched.
        if lowestWord < wordCount { cursor = lowestWord }
        var punch: [(offset: UInt64, length: UInt64)] = []
        var previous = UInt64.max
        for p in pages where p != previous {
            previous = p
            // 8 sectors per 4 KiB page: all free (one byte of the bitmap), and inside the file's
            // allocated end (an append may take the sectors past it at any time).
            let w = Int((p * 8) >> 6), shift = (p * 8) & 63
            if p * 8 + 8 <= endSector && (word(w) >> shift) & 0xFF == 0 {
                if let last = punch.last, last.offset + last.length == p * 4096 {
                    punch[punch.count - 1].length += 4096
                } else {
                    punch.append((p * 4096, 4096))
                }
            }
        }
        let long = punchRunBytesMin <= 4096 ? punch : punch.filter { $0.length >= punchRunBytesMin }
        guard unpunchedFreeBytesMax > 0 else { return long }
        // Twice the recent allocations: frees arrive in bursts at flushes while allocations
        // spread over the interval, so what one interval did not reuse is still wanted next.
        let budget = min(unpunchedFreeBytesMax, 2 * recentlyAllocatedSectors * UInt64(Limits.sectorBytes))
        let unpunchedFreeBytes = unpunchedFreeSectors * UInt64(Limits.sectorBytes)
        guard unpunchedFreeBytes > budget else { return [] }
        var excess = unpunchedFreeBytes - budget
        var chosen: [(offset: UInt64, length: UInt64)] = []
        for run in long where excess > 0 {
            chosen.append(run)
            excess -= min(excess, run.length)
        }
        return chosen
    }

    /// Every fully free 4 KiB page inside the file that still has file blocks (not punched yet),
    /// as runs, each marked in use until `finishPunches` (as `releaseReservingPunches`): what `gc`
    /// punches. At most `pageCount` pages from `firstPage` are looked at, so that `gc` holds the
    /// store lock in bounded steps; `nextPage` is where the next call goes on, nil at the end.
    mutating func reserveFreePagesForPunching(fromPage firstPage: UInt64 = 0, pageCount: UInt64 = .max)
        -> (punches: [(offset: UInt64, length: UInt64)], nextPage: UInt64?) {
        var punch: [(offset: UInt64, length: UInt64)] = []
        func take(_ p: UInt64, _ n: UInt64) {
            if let last = punch.last, last.offset + last.length == p * 4096 {
                punch[punch.count - 1].length += n * 4096
            } else {
                punch.append((p * 4096, n * 4096))
            }
        }
        let pages = endSector / 8
        let stop = pageCount >= pages ? pages : min(pages, firstPage + pageCount)
        forgetUnreadableLeaf()
        var p = firstPage
        while p < stop {
            let w = Int((p * 8) >> 6), shift = (p * 8) & 63
            let used = word(w)
            if used == ~0 && shift == 0 {
                p += 8   // a whole word in use: nothing to punch
                continue
            }
            // Pages already punched have no file blocks left to give back.
            let punchedByte = Int(p >> 6) < punchedPages.count ? (punchedPages[Int(p >> 6)] >> (p & 63)) & 0xFF : 0
            if used == 0 && shift == 0 && p + 8 <= stop && punchedByte == 0 {
                take(p, 8)   // a whole bitmap word (8 pages) free: take it at once
                p += 8
                continue
            }
            if (used >> shift) & 0xFF == 0 && !isPunched(p) { take(p, 1) }
            p += 1
        }
        for r in punch { setPageBits(r, inUse: true) }
        return (punch, stop < pages ? stop : nil)
    }

    private func isPunched(_ page: UInt64) -> Bool {
        let w = Int(page >> 6)
        return w < punchedPages.count && punchedPages[w] & (1 << (page & 63)) != 0
    }

    /// `release`, but the pages to punch stay marked in use (not counted in `usedSectors`) until
    /// `finishPunches`, so no allocation can take them while the punch runs outside the lock.
    mutating func releaseReservingPunches(_ frees: [(sector: UInt64, count: Int)], punchRunBytesMin: UInt64,
                                          unpunchedFreeBytesMax: UInt64 = 0) -> [(offset: UInt64, length: UInt64)] {
        let punches = release(frees, punchRunBytesMin: punchRunBytesMin, unpunchedFreeBytesMax: unpunchedFreeBytesMax)
        for p in punches { setPageBits(p, inUse: true) }
        return punches
    }

    /// The punches from `releaseReservingPunches` are done: their pages are free and, unless
    /// `punched` is false (the punch failed), hold no file blocks.
    mutating func finishPunches(_ punches: [(offset: UInt64, length: UInt64)], punched: Bool = true) {
        forgetUnreadableLeaf()
        for p in punches {
            setPageBits(p, inUse: false)
            if punched { markPunched(p) }
        }
    }

    /// Reserves (or gives back) the sectors of free pages being punched: they are never in the
    /// sector map meanwhile, so the overlay alone holds them.
    private mutating func setPageBits(_ range: (offset: UInt64, length: UInt64), inUse: Bool) {
        let sectorBytes = UInt64(Limits.sectorBytes)
        let end = (range.offset + range.length) / sectorBytes
        var s = range.offset / sectorBytes
        while s < end {
            let (w, mask, next) = Self.wordMask(s, end)
            let used = word(w) & mask
            precondition(used == (inUse ? 0 : mask), "punch reservation of sector \(s) out of step")
            if inUse { overlayInsert(w, mask) } else { _ = overlayRemove(w, mask) }
            s = next
        }
    }

    /// Frees immediately (used when nothing durable can reference the space: a failed write).
    mutating func releaseNow(_ sector: UInt64, count: Int) {
        _ = release([(sector, count)])
    }

    /// RAM the allocator holds (the sector map's pages are the pager's): the overlay, the
    /// punched-page bits and the remembered leaf (counted although it often shares the page's
    /// buffer). Named for the whole bitmap it held before issue 15's fifth round.
    var bitmapBytes: Int {
        overlay.capacity * (MemoryLayout<Int>.stride + MemoryLayout<UInt64>.stride + 1) + punchedPages.capacity * 8
            + memoWords.capacity * 8
    }

    /// Sectors in the overlay (in use but not in the sector map); `usedSectors` minus these is
    /// what the sector map holds.
    var overlaySectors: UInt64 { overlay.values.reduce(0) { $0 + UInt64($1.nonzeroBitCount) } }

    func isFreeSector(_ s: UInt64) -> Bool {
        guard s < endSector else { return true }
        let w = Int(s >> 6), k = UInt64(w / Self.wordsPerLeaf), i = w % Self.wordsPerLeaf
        guard let words = k == memoLeaf && !memoUnreadable ? memoWords : installedLeaf(k) else { return false }
        let installed = i < words.count ? words[i] : 0
        return (installed | (overlay[w] ?? 0)) & (1 << (s & 63)) == 0
    }

    func isUsedRange(_ sector: UInt64, count: Int) -> Bool {
        (sector..<sector + UInt64(count)).allSatisfy { !isFreeSector($0) }
    }

    /// One past the last used sector: the sector map's leaves from the end back to the first
    /// that holds a used sector, and the overlay.
    var endSectorInUse: UInt64 {
        var last: UInt64 = 0
        for (w, bits) in overlay where bits != 0 {
            last = max(last, UInt64(w) * 64 + UInt64(64 - bits.leadingZeroBitCount))
        }
        let words = wordCount
        guard words > 0 else { return last }
        var k = (words - 1) / Self.wordsPerLeaf
        while true {
            let first = k * Self.wordsPerLeaf
            guard let installed = installedLeaf(UInt64(k)) else {
                // Unreadable: keep everything up to this leaf's end.
                return max(last, min(endSector, UInt64(first + Self.wordsPerLeaf) * 64))
            }
            if let i = installed.indices.last(where: { installed[$0] != 0 && first + $0 < words }) {
                return max(last, UInt64(first + i) * 64 + UInt64(64 - installed[i].leadingZeroBitCount))
            }
            if k == 0 || UInt64(first) * 64 <= last { return last }
            k -= 1
        }
    }

    mutating func trimEnd() {
        setEndSector(endSectorInUse)
    }

    /// After truncating the file: nothing past `end` is in use (checked by the caller).
    mutating func setEndSector(_ end: UInt64) {
        precondition(end <= endSector)
        precondition(!overlay.contains { UInt64($0.key) * 64 + UInt64(64 - $0.value.leadingZeroBitCount) > end },
                     "sectors past the new end are in use")
        endSector = end
        if cursor >= wordCount { cursor = 0 }
        // Pages past the new end are gone from the file; count only those before it.
        let pages = (end + 7) >> 3
        if punchedPages.count > Int((pages + 63) >> 6) { punchedPages.removeLast(punchedPages.count - Int((pages + 63) >> 6)) }
        if pages & 63 != 0, let lastWord = punchedPages.indices.last { punchedPages[lastWord] &= (1 << (pages & 63)) - 1 }
        punchedFreeSectors = 8 * UInt64(punchedPages.reduce(0) { $0 + $1.nonzeroBitCount })
    }
}
