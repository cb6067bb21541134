import VBDCore
import VBDCache

// MARK: - Notes on the design
//
// Every stored block ("chunk") has a number, its index in `ChunkTable`. Maps hold chunk numbers,
// never hashes: with a weak or colliding hash, two different contents still get two numbers, and
// the byte comparison before sharing decides which number a write may reuse (VDO does the same
// with physical block numbers and an advisory hash index).
//
// Memory per unique chunk (measured by `StoreTests.indexMemoryPerUniqueBlock`):
//   32 bytes  ChunkEntry (hash 16, location 8, shape 4, refcount 4), in fixed pages of 4 Ki
//             entries so the table never holds a doubled, half-empty array;
//   4 bytes   the number's generation (cache key; see `generationPages`);
//   4-8 bytes DedupIndex slot (UInt32 chunk number, load factor 0.5-0.85).
// Total 40-44 bytes, under the 48-byte target. The data file's free-space bitmap adds 1 bit per
// 512-byte sector (about 1 byte per 4 KiB block stored raw).

/// Where and how one chunk is stored.
struct ChunkEntry {
    var hash: ContentHash
    /// Bits 0-47: first sector in the data file. Bits 48-63: sharing group.
    var location: UInt64
    /// Bits 0-20: stored byte count. Bit 21: LZ4-compressed. Bits 24-28: log2 of the raw length.
    var shape: UInt32
    /// Leaf slots holding this chunk (MapTree invariant 2). 0 means the entry is free.
    var refcount: UInt32

    static let free = ChunkEntry(hash: .zero, location: 0, shape: 0, refcount: 0)

    init(hash: ContentHash, location: UInt64, shape: UInt32, refcount: UInt32) {
        self.hash = hash
        self.location = location
        self.shape = shape
        self.refcount = refcount
    }

    init(hash: ContentHash, sector: UInt64, group: SharingGroupID, storedBytes: Int, compressed: Bool, rawBytes: Int) {
        precondition(sector < (1 << 48) && storedBytes < (1 << 21) && rawBytes.nonzeroBitCount == 1)
        self.hash = hash
        self.location = sector | (UInt64(group.rawValue) << 48)
        self.shape = UInt32(storedBytes) | (compressed ? 1 << 21 : 0) | (UInt32(rawBytes.trailingZeroBitCount) << 24)
        self.refcount = 1
    }

    var sector: UInt64 { location & 0xFFFF_FFFF_FFFF }
    var group: SharingGroupID { SharingGroupID(UInt16(location >> 48)) }
    var storedBytes: Int { Int(shape & 0x1F_FFFF) }
    var isCompressed: Bool { shape & (1 << 21) != 0 }
    var rawBytes: Int { 1 << Int((shape >> 24) & 0x1F) }
    /// One more holder. Saturates at `UInt32.max` instead of trapping: a trap here would recur at
    /// every open (replay and checkpoint loading count the same references again). A saturated
    /// count stays saturated, so the chunk is never freed (a leak, never a use after free).
    mutating func retainSaturating() {
        if refcount < .max { refcount += 1 }
    }

    /// One holder fewer; true when it was the last. A saturated count no longer knows how many
    /// holders there are, so it never drops (see `retainSaturating`).
    mutating func releaseSaturating() -> Bool {
        precondition(refcount > 0, "chunk released more often than retained")
        if refcount == .max { return false }
        refcount -= 1
        return refcount == 0
    }

    /// Free entries are all zero; an installed one always has a raw-length shift of at least 9.
    var isInstalled: Bool { shape != 0 }
    var sectorCount: Int { (storedBytes + Limits.sectorBytes - 1) / Limits.sectorBytes }
}

/// Chunk number -> entry, in fixed-size pages.
struct ChunkTable {
    static let pageShift = 12
    static let pageSize = 1 << pageShift

    private var pages: [UnsafeMutablePointer<ChunkEntry>] = []
    /// Per number, how many times it was freed (wrapping). Part of the cache key (`Store.cacheKey`):
    /// a reader that copied a number out before it was freed cannot match the cache entry of the
    /// chunk that reuses it, and the "unchanged?" re-check after a failed load sees the reuse.
    /// Memory only, like the cache; 4 bytes per number.
    private var generationPages: [UnsafeMutablePointer<UInt32>] = []
    /// Highest chunk number handed out so far + 1 (chunk 0 is never used: it means "zero block").
    private(set) var end: UInt64 = 1
    /// Freed numbers, reused first (LIFO).
    private var freeNumbers: [UInt32] = []
    private(set) var liveCount = 0

    /// The largest chunk number: DedupIndex slots are 32 bits.
    static let chunkNumberMax: UInt64 = UInt64(UInt32.max) - 1

    func deallocate() {
        for p in pages { p.deallocate() }
        for p in generationPages { p.deallocate() }
    }

    /// How many times `chunk`'s number has been freed (see `generationPages`).
    func generation(_ chunk: UInt64) -> UInt32 {
        precondition(chunk > 0 && chunk < end, "chunk \(chunk) out of range")
        return generationPages[Int(chunk >> UInt64(ChunkTable.pageShift))][Int(chunk & UInt64(ChunkTable.pageSize - 1))]
    }

    private func bumpGeneration(_ chunk: UInt64) {
        generationPages[Int(chunk >> UInt64(ChunkTable.pageShift))][Int(chunk & UInt64(ChunkTable.pageSize - 1))] &+= 1
    }

    subscript(_ chunk: UInt64) -> ChunkEntry {
        get {
            precondition(chunk > 0 && chunk < end, "chunk \(chunk) out of range")
            return pages[Int(chunk >> UInt64(ChunkTable.pageShift))][Int(chunk & UInt64(ChunkTable.pageSize - 1))]
        }
        nonmutating set {
            precondition(chunk > 0 && chunk < end, "chunk \(chunk) out of range")
            pages[Int(chunk >> UInt64(ChunkTable.pageShift))][Int(chunk & UInt64(ChunkTable.pageSize - 1))] = newValue
        }
    }

    func contains(_ chunk: UInt64) -> Bool { chunk > 0 && chunk < end && self[chunk].isInstalled }

    private mutating func extend(to newEnd: UInt64) {
        while UInt64(pages.count) << UInt64(ChunkTable.pageShift) < newEnd {
            let p = UnsafeMutablePointer<ChunkEntry>.allocate(capacity: ChunkTable.pageSize)
            p.initialize(repeating: .free, count: ChunkTable.pageSize)
            pages.append(p)
            let g = UnsafeMutablePointer<UInt32>.allocate(capacity: ChunkTable.pageSize)
            g.initialize(repeating: 0, count: ChunkTable.pageSize)
            generationPages.append(g)
        }
    }

    /// A number for a new chunk; nil when the table is full.
    mutating func allocateNumber() -> UInt64? {
        if let n = freeNumbers.popLast() { return UInt64(n) }
        guard end <= ChunkTable.chunkNumberMax else { return nil }
        extend(to: end + 1)
        end += 1
        return end - 1
    }

    /// Installs an entry at a specific number: one from `allocateNumber` (live writes), or any
    /// free number during a bulk load (journal replay, checkpoint load), which must end with
    /// `rebuildFreeList()`.
    mutating func install(_ entry: ChunkEntry, at chunk: UInt64) {
        precondition(chunk > 0 && chunk <= ChunkTable.chunkNumberMax)
        if chunk >= end {
            extend(to: chunk + 1)
            end = chunk + 1
        }
        precondition(!self[chunk].isInstalled, "chunk \(chunk) installed twice")
        self[chunk] = entry
        liveCount += 1
    }

    /// Returns a number from `allocateNumber` that was not used after all.
    mutating func returnNumber(_ chunk: UInt64) {
        precondition(!self[chunk].isInstalled)
        bumpGeneration(chunk)
        freeNumbers.append(UInt32(chunk))
    }

    /// Frees an installed number; its next user gets a new generation.
    mutating func releaseNumber(_ chunk: UInt64) {
        self[chunk] = .free
        bumpGeneration(chunk)
        freeNumbers.append(UInt32(chunk))
        liveCount -= 1
    }

    /// Rebuilds the free-number list after bulk loading (replay may leave holes anywhere).
    mutating func rebuildFreeList() {
        freeNumbers.removeAll()
        var n = end
        while n > 1 {
            n -= 1
            if !self[n].isInstalled { freeNumbers.append(UInt32(n)) }
        }
        freeNumbers.reverse()
    }

    var pageBytes: Int { pages.count * ChunkTable.pageSize * (MemoryLayout<ChunkEntry>.stride + MemoryLayout<UInt32>.stride) }
    var freeListBytes: Int { freeNumbers.capacity * 4 }
}

/// Content hash -> candidate chunk numbers. Open addressing with linear probing and
/// backward-shift deletion (no tombstones). Several entries may share a hash: colliding
/// contents, each verified by bytes before reuse.
struct DedupIndex {
    private var slots: UnsafeMutablePointer<UInt32>
    private var mask: Int
    private(set) var count = 0

    init(capacity: Int = 1024) {
        var n = 16
        while n < capacity { n <<= 1 }
        slots = .allocate(capacity: n)
        slots.initialize(repeating: 0, count: n)
        mask = n - 1
    }

    func deallocate() { slots.deallocate() }

    var slotBytes: Int { (mask + 1) * 4 }

    @inline(__always)
    private func home(_ hash: ContentHash) -> Int {
        // The hash is already uniformly distributed (and secret-seeded); fold both halves anyway
        // so a weak test hash that only fills `low` still spreads.
        Int(truncatingIfNeeded: (hash.low ^ (hash.high &* 0x9E37_79B9_7F4A_7C15)) &* 0xBF58_476D_1CE4_E5B9 >> 17) & mask
    }

    /// Calls `body` with each chunk whose stored hash equals `hash` until it returns true.
    func firstMatch(_ hash: ContentHash, hashOf: (UInt32) -> ContentHash, _ body: (UInt32) -> Bool) -> UInt32? {
        var i = home(hash)
        while true {
            let c = slots[i]
            if c == 0 { return nil }
            if hashOf(c) == hash && body(c) { return c }
            i = (i + 1) & mask
        }
    }

    mutating func insert(_ chunk: UInt32, hash: ContentHash, hashOf: (UInt32) -> ContentHash) {
        if (count + 1) * 100 > (mask + 1) * 85 { rehash(hashOf: hashOf) }
        var i = home(hash)
        while slots[i] != 0 { i = (i + 1) & mask }
        slots[i] = chunk
        count += 1
    }

    /// Removes `chunk`, which must be present under `hash`.
    mutating func remove(_ chunk: UInt32, hash: ContentHash, hashOf: (UInt32) -> ContentHash) {
        var i = home(hash)
        while slots[i] != chunk {
            precondition(slots[i] != 0, "dedup index lost chunk \(chunk)")
            i = (i + 1) & mask
        }
        // Backward-shift: move later members of the probe run into the gap.
        var gap = i
        var j = (i + 1) & mask
        while slots[j] != 0 {
            let h = home(hashOf(slots[j]))
            // Move slots[j] to gap if its home is not in (gap, j] cyclically.
            let inRange = gap <= j ? (h > gap && h <= j) : (h > gap || h <= j)
            if !inRange {
                slots[gap] = slots[j]
                gap = j
            }
            j = (j + 1) & mask
        }
        slots[gap] = 0
        count -= 1
    }

    /// Rebuilds the index at twice the size, re-reading each member's hash.
    mutating func rehash(hashOf: (UInt32) -> ContentHash) {
        let oldSlots = slots, oldCapacity = mask + 1
        let newCapacity = oldCapacity * 2
        slots = .allocate(capacity: newCapacity)
        slots.initialize(repeating: 0, count: newCapacity)
        mask = newCapacity - 1
        count = 0
        for k in 0..<oldCapacity where oldSlots[k] != 0 {
            let c = oldSlots[k]
            var i = home(hashOf(c))
            while slots[i] != 0 { i = (i + 1) & mask }
            slots[i] = c
            count += 1
        }
        oldSlots.deallocate()
    }

    /// Every member, for fsck.
    func forEach(_ body: (UInt32) -> Void) {
        for k in 0...mask where slots[k] != 0 { body(slots[k]) }
    }
}
