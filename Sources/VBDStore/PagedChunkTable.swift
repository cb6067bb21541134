import VBDCore

// MARK: - Notes on the design
//
// The chunk table and the dedup index of ChunkTable.swift, in metadata pages, so that neither has
// to fit in memory nor be loaded at open.
//
// Chunk table: a paged array of 36-byte records (hash 16, location 8, shape 4, reference count 4,
// generation 4), 112 per page, indexed by chunk number. Freed numbers go on a stack that is itself
// a paged array, so allocation never scans. The generation (how many times the number was freed)
// is stored with the record: a cache key made from it stays unique across restarts.
//
// Dedup index: linear hashing (Litwin, 1980) over bucket pages. Each entry is a 64-bit fingerprint
// of the content hash and the chunk number; the fingerprint picks the bucket (its low bits) and
// filters candidates, and the chunk table's full hash and then the bytes decide. The table grows
// one bucket split at a time when the load passes 75 %, so no insert ever rehashes the whole index;
// a bucket that fills before its split is due chains an overflow page. 16 bytes per entry at
// 75 % load is about 21 bytes of disk per chunk, and only the pages in use are in memory.

/// One chunk's record as stored (see `ChunkEntry` for the fields).
struct ChunkRecord: PagedArrayElement, Equatable {
    var entry: ChunkEntry
    /// How many times this number was freed (wrapping): part of the cache key.
    var generation: UInt32

    static var byteCount: Int { 36 }
    static var leafKind: PageKind { .chunkRecords }
    static var zero: ChunkRecord { ChunkRecord(entry: .free, generation: 0) }

    init(entry: ChunkEntry, generation: UInt32) {
        self.entry = entry
        self.generation = generation
    }

    init(loading b: UnsafeRawBufferPointer) {
        let high = UInt64(littleEndian: b.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        let low = UInt64(littleEndian: b.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        entry = ChunkEntry(hash: ContentHash(high: high, low: low),
                           location: UInt64(littleEndian: b.loadUnaligned(fromByteOffset: 16, as: UInt64.self)),
                           shape: UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 24, as: UInt32.self)),
                           refcount: UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 28, as: UInt32.self)))
        generation = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 32, as: UInt32.self))
    }

    func store(into b: UnsafeMutableRawBufferPointer) {
        b.storeBytes(of: entry.hash.high.littleEndian, toByteOffset: 0, as: UInt64.self)
        b.storeBytes(of: entry.hash.low.littleEndian, toByteOffset: 8, as: UInt64.self)
        b.storeBytes(of: entry.location.littleEndian, toByteOffset: 16, as: UInt64.self)
        b.storeBytes(of: entry.shape.littleEndian, toByteOffset: 24, as: UInt32.self)
        b.storeBytes(of: entry.refcount.littleEndian, toByteOffset: 28, as: UInt32.self)
        b.storeBytes(of: generation.littleEndian, toByteOffset: 32, as: UInt32.self)
    }

    static func == (a: ChunkRecord, b: ChunkRecord) -> Bool {
        a.entry.hash == b.entry.hash && a.entry.location == b.entry.location && a.entry.shape == b.entry.shape
            && a.entry.refcount == b.entry.refcount && a.generation == b.generation
    }
}

/// Chunk number -> record, in pages. Kept in the superblock as its roots and counters.
struct PagedChunkTable: Equatable {
    var records = PagedArray<ChunkRecord>()
    /// Freed numbers, reused first (a stack: `freeCount` entries).
    var freeNumbers = PagedArray<UInt64>()
    var freeCount: UInt64 = 0
    /// Highest number handed out so far + 1 (chunk 0 is never used: it means "zero block").
    var end: UInt64 = 1
    var liveCount: UInt64 = 0
    /// Numbers handed out by `allocateNumber` and not yet installed or returned (memory only): a
    /// number can be on the free stack twice (see `allocateNumber`), and a write holds its number
    /// for a while without the lock.
    var reserved: Set<UInt64> = []

    /// Map slots hold chunk numbers in 48 bits, one value of which means "allocated zeroes".
    static let chunkNumberMax: UInt64 = (1 << 48) - 2

    func record(_ chunk: UInt64, pager: MetadataPager) throws -> ChunkRecord {
        guard chunk > 0 && chunk < end else { throw StoreError.corrupted("chunk \(chunk) is out of range (end \(end))") }
        return try records.get(chunk, pager: pager)
    }

    func entry(_ chunk: UInt64, pager: MetadataPager) throws -> ChunkEntry { try record(chunk, pager: pager).entry }

    func contains(_ chunk: UInt64, pager: MetadataPager) throws -> Bool {
        guard chunk > 0 && chunk < end else { return false }
        return try records.get(chunk, pager: pager).entry.isInstalled
    }

    /// Changes the entry of `chunk` in place.
    mutating func update(_ chunk: UInt64, pager: MetadataPager, _ body: (inout ChunkEntry) throws -> Void) throws {
        guard chunk > 0 && chunk < end else { throw StoreError.corrupted("chunk \(chunk) is out of range (end \(end))") }
        let (leaf, i) = try records.writableLeaf(chunk, pager: pager)
        try body(&leaf.elements[i].entry)
    }

    /// A number for a new chunk; nil when the table is full. Numbers on the free stack that are in
    /// use are skipped: replay installs chunks at the numbers the live store used without taking
    /// them off the stack (the order in which the live store popped them is not journaled).
    mutating func allocateNumber(pager: MetadataPager) throws -> UInt64? {
        while freeCount > 0 {
            freeCount -= 1
            let n = try freeNumbers.get(freeCount, pager: pager)
            if try !reserved.contains(n) && !records.get(n, pager: pager).entry.isInstalled {
                reserved.insert(n)
                return n
            }
        }
        guard end <= PagedChunkTable.chunkNumberMax else { return nil }
        end += 1
        reserved.insert(end - 1)
        return end - 1
    }

    /// Reads, changing nothing, the pages the next `count` calls of `allocateNumber` would read
    /// (the free stack's top entries and their records), for a probe: carries on past a miss.
    func probeAllocation(_ count: Int, pager: MetadataPager) {
        var k = freeCount
        for _ in 0..<count where k > 0 {
            k -= 1
            if let n = try? freeNumbers.get(k, pager: pager) { _ = try? records.get(n, pager: pager) }
        }
    }

    /// Installs an entry at a number from `allocateNumber`, or (replay) at any free number; the
    /// numbers skipped past `end` go on the free stack.
    mutating func install(_ entry: ChunkEntry, at chunk: UInt64, pager: MetadataPager) throws {
        guard chunk > 0 && chunk <= PagedChunkTable.chunkNumberMax else { throw StoreError.corrupted("chunk number \(chunk) out of range") }
        while chunk >= end {
            if end < chunk { try pushFree(end, pager: pager) }
            end += 1
        }
        let (leaf, i) = try records.writableLeaf(chunk, pager: pager)
        guard !leaf.elements[i].entry.isInstalled else { throw StoreError.corrupted("chunk \(chunk) installed twice") }
        leaf.elements[i].entry = entry
        liveCount += 1
        reserved.remove(chunk)
    }

    private mutating func pushFree(_ chunk: UInt64, pager: MetadataPager) throws {
        try freeNumbers.set(freeCount, chunk, pager: pager)
        freeCount += 1
    }

    /// Returns a number from `allocateNumber` that was not used after all.
    mutating func returnNumber(_ chunk: UInt64, pager: MetadataPager) throws {
        reserved.remove(chunk)
        let (leaf, i) = try records.writableLeaf(chunk, pager: pager)
        leaf.elements[i].generation &+= 1
        try pushFree(chunk, pager: pager)
    }

    /// Frees an installed number; its next user gets a new generation.
    mutating func releaseNumber(_ chunk: UInt64, pager: MetadataPager) throws {
        let (leaf, i) = try records.writableLeaf(chunk, pager: pager)
        leaf.elements[i].entry = .free
        leaf.elements[i].generation &+= 1
        try pushFree(chunk, pager: pager)
        liveCount -= 1
    }
}

// MARK: - Dedup index

/// Entries of one bucket: u16 count | u16 zero | u32 zero | u64 overflow page | count x (u64
/// fingerprint, u64 chunk).
///
/// In memory the entries are kept in fingerprint order, so a lookup touches a cache line or two
/// of the page instead of scanning all of it: fingerprints are uniform (they come from the keyed
/// content hash), so an entry's place is guessed from its value and found from there. Pages are
/// written in that order; a page in any other order (as older stores wrote them) is sorted when read.
final class DedupBucketPage: MetadataPageObject {
    struct Entry: Equatable {
        var fingerprint: UInt64
        var chunk: UInt64
    }

    static let kind = PageKind.dedupBucket
    static let capacity = (MetadataPageFile.payloadBytes - 16) / 16   // 253
    /// Sorted by fingerprint (equal fingerprints in any order).
    private(set) var entries: [Entry]
    var overflow: PageNumber

    init() {
        entries = []
        overflow = .none
    }

    private init(entries: [Entry], overflow: PageNumber) {
        self.entries = entries
        self.overflow = overflow
    }

    init(decoding payload: UnsafeRawBufferPointer) throws(PageDecodingError) {
        let n = Int(UInt16(littleEndian: payload.loadUnaligned(fromByteOffset: 0, as: UInt16.self)))
        guard n <= DedupBucketPage.capacity else { throw PageDecodingError("dedup bucket holds \(n) entries") }
        overflow = PageNumber(UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: 8, as: UInt64.self)))
        entries = []
        entries.reserveCapacity(n)
        var sorted = true
        for k in 0..<n {
            let fingerprint = UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: 16 + k * 16, as: UInt64.self))
            let c = UInt64(littleEndian: payload.loadUnaligned(fromByteOffset: 24 + k * 16, as: UInt64.self))
            guard c != 0 else { throw PageDecodingError("dedup bucket entry \(k) names chunk 0") }
            if let last = entries.last, last.fingerprint > fingerprint { sorted = false }
            entries.append(Entry(fingerprint: fingerprint, chunk: c))
        }
        if !sorted { entries.sort { $0.fingerprint < $1.fingerprint } }
    }

    func encode(into payload: UnsafeMutableRawBufferPointer) {
        payload.storeBytes(of: UInt16(entries.count).littleEndian, toByteOffset: 0, as: UInt16.self)
        payload.storeBytes(of: overflow.rawValue.littleEndian, toByteOffset: 8, as: UInt64.self)
        for (k, e) in entries.enumerated() {
            payload.storeBytes(of: e.fingerprint.littleEndian, toByteOffset: 16 + k * 16, as: UInt64.self)
            payload.storeBytes(of: e.chunk.littleEndian, toByteOffset: 24 + k * 16, as: UInt64.self)
        }
    }

    func copy() -> DedupBucketPage { DedupBucketPage(entries: entries, overflow: overflow) }
    var residentBytes: Int { 96 + entries.capacity * 16 }
    var count: Int { entries.count }
    var isFull: Bool { entries.count >= Self.capacity }

    /// The index of the first entry whose fingerprint is not below `fingerprint`: a guess from
    /// the value, then steps that double until the place is bracketed, then a binary search
    /// (O(1) expected for uniform fingerprints, O(log n) at worst).
    func lowerBound(_ fingerprint: UInt64) -> Int {
        entries.withUnsafeBufferPointer { e in
            let n = e.count
            if n == 0 { return 0 }
            let guess = Int(truncatingIfNeeded: fingerprint.multipliedFullWidth(by: UInt64(n)).high)
            // The answer lies in low...high; e[high] is not below the fingerprint, or high == n.
            var low = 0, high = n
            var bound = guess, step = 1
            if e[guess].fingerprint < fingerprint {
                while true {
                    let next = bound + step
                    if next >= n { low = bound + 1; high = n; break }
                    if e[next].fingerprint >= fingerprint { low = bound + 1; high = next; break }
                    bound = next
                    step &*= 2
                }
            } else {
                while true {
                    let next = bound - step
                    if next < 0 { low = 0; high = bound; break }
                    if e[next].fingerprint < fingerprint { low = next + 1; high = bound; break }
                    bound = next
                    step &*= 2
                }
            }
            while low < high {
                let mid = (low + high) / 2
                if e[mid].fingerprint < fingerprint { low = mid + 1 } else { high = mid }
            }
            return low
        }
    }

    /// Calls `body` with each chunk stored under `fingerprint` until it returns true.
    func firstChunk(withFingerprint fingerprint: UInt64, _ body: (UInt64) throws -> Bool) rethrows -> UInt64? {
        var k = lowerBound(fingerprint)
        while k < entries.count && entries[k].fingerprint == fingerprint {
            if try body(entries[k].chunk) { return entries[k].chunk }
            k += 1
        }
        return nil
    }

    /// Adds an entry in order; the page must not be full.
    func insert(_ entry: Entry) {
        precondition(!isFull, "dedup bucket page is full")
        entries.insert(entry, at: lowerBound(entry.fingerprint))
    }

    /// Where the page holds `entry`, if it does.
    func index(of entry: Entry) -> Int? {
        var k = lowerBound(entry.fingerprint)
        while k < entries.count && entries[k].fingerprint == entry.fingerprint {
            if entries[k].chunk == entry.chunk { return k }
            k += 1
        }
        return nil
    }

    func remove(at index: Int) { entries.remove(at: index) }

    /// Removes the entry, if the page holds it.
    func remove(_ entry: Entry) -> Bool {
        guard let k = index(of: entry) else { return false }
        remove(at: k)
        return true
    }
}

/// Content hash -> candidate chunk numbers, in pages (linear hashing). Kept in the superblock.
struct PagedDedupIndex: Equatable {
    /// Bucket number -> its first page.
    var buckets = PagedArray<UInt64>()
    /// 2^level buckets before the split pointer's round; `split` of them already split in two.
    var level: Int = 0
    var split: UInt64 = 0
    var count: UInt64 = 0

    static let loadPercent: UInt64 = 75

    var bucketCount: UInt64 { (UInt64(1) << UInt64(level)) + split }

    @inline(__always)
    static func fingerprint(_ hash: ContentHash) -> UInt64 {
        // A weak test hash that only fills `low` still spreads.
        (hash.low ^ (hash.high &* 0x9E37_79B9_7F4A_7C15)) &* 0xBF58_476D_1CE4_E5B9
    }

    private func bucket(of fingerprint: UInt64) -> UInt64 {
        let mask = (UInt64(1) << UInt64(level)) - 1
        var b = fingerprint & mask
        if b < split { b = fingerprint & ((mask << 1) | 1) }
        return b
    }

    private mutating func headPage(_ bucket: UInt64, pager: MetadataPager) throws -> PageNumber {
        let head = PageNumber(try buckets.get(bucket, pager: pager))
        if head != .none { return head }
        let page = try pager.allocate(DedupBucketPage())
        try buckets.set(bucket, page.rawValue, pager: pager)
        return page
    }

    /// Calls `body` with each chunk whose fingerprint matches until it returns true; the caller
    /// compares full hashes (`hashOf`) and bytes.
    func firstMatch(_ hash: ContentHash, pager: MetadataPager, hashOf: (UInt64) throws -> ContentHash,
                    _ body: (UInt64) throws -> Bool) throws -> UInt64? {
        let fp = Self.fingerprint(hash)
        var page = PageNumber(try buckets.get(bucket(of: fp), pager: pager))
        while page != .none {
            let b = try pager.read(page, as: DedupBucketPage.self)
            if let c = try b.firstChunk(withFingerprint: fp, { c in try hashOf(c) == hash && body(c) }) { return c }
            page = b.overflow
        }
        return nil
    }

    mutating func insert(_ chunk: UInt64, hash: ContentHash, pager: MetadataPager) throws {
        try add(chunk, fingerprint: Self.fingerprint(hash), to: bucket(of: Self.fingerprint(hash)), pager: pager)
        count += 1
        if count * 100 > bucketCount * UInt64(DedupBucketPage.capacity) * Self.loadPercent {
            try splitNext(pager: pager)
        }
    }

    private mutating func add(_ chunk: UInt64, fingerprint: UInt64, to bucket: UInt64, pager: MetadataPager) throws {
        var page = try headPage(bucket, pager: pager)
        while true {
            let b = try pager.read(page, as: DedupBucketPage.self)
            if !b.isFull {
                try pager.writable(page, as: DedupBucketPage.self).insert(.init(fingerprint: fingerprint, chunk: chunk))
                return
            }
            if b.overflow == .none {
                let next = try pager.allocate(DedupBucketPage())
                try pager.writable(page, as: DedupBucketPage.self).overflow = next
            }
            page = try pager.read(page, as: DedupBucketPage.self).overflow
        }
    }

    /// Splits the bucket at the split pointer: its entries go to it or to its new sibling.
    private mutating func splitNext(pager: MetadataPager) throws {
        let old = split
        let sibling = bucketCount
        // Collect and free the old chain, then advance the pointer and re-add.
        var entries: [(UInt64, UInt64)] = []
        var page = PageNumber(try buckets.get(old, pager: pager))
        while page != .none {
            let b = try pager.read(page, as: DedupBucketPage.self)
            for e in b.entries { entries.append((e.fingerprint, e.chunk)) }
            let next = b.overflow
            try pager.release(page)
            page = next
        }
        try buckets.set(old, 0, pager: pager)
        split += 1
        if split == UInt64(1) << UInt64(level) {
            level += 1
            split = 0
        }
        for (fp, c) in entries {
            let target = bucket(of: fp)
            precondition(target == old || target == sibling, "linear hashing moved an entry to bucket \(target)")
            try add(c, fingerprint: fp, to: target, pager: pager)
        }
    }

    /// Removes `chunk`, which must be present under `hash`.
    mutating func remove(_ chunk: UInt64, hash: ContentHash, pager: MetadataPager) throws {
        let fp = Self.fingerprint(hash)
        let bucket = bucket(of: fp)
        var previous = PageNumber.none
        var page = PageNumber(try buckets.get(bucket, pager: pager))
        while page != .none {
            let b = try pager.read(page, as: DedupBucketPage.self)
            // Found in the page as read, removed from the writable one (a copy while a commit
            // writes it): the same entries, so the same index.
            if let k = b.index(of: DedupBucketPage.Entry(fingerprint: fp, chunk: chunk)) {
                let w = try pager.writable(page, as: DedupBucketPage.self)
                w.remove(at: k)
                // An emptied overflow page leaves the chain.
                if w.count == 0 && previous != .none {
                    try pager.writable(previous, as: DedupBucketPage.self).overflow = w.overflow
                    try pager.release(page)
                }
                count -= 1
                return
            }
            previous = page
            page = b.overflow
        }
        throw StoreError.corrupted("the dedup index lost chunk \(chunk)")
    }

    /// Every (chunk, fingerprint) entry, for fsck.
    func forEach(pager: MetadataPager, _ body: (UInt64, UInt64) throws -> Void) throws {
        for bucket in 0..<bucketCount {
            var page = PageNumber(try buckets.get(bucket, pager: pager))
            while page != .none {
                let b = try pager.read(page, as: DedupBucketPage.self)
                for e in b.entries { try body(e.chunk, e.fingerprint) }
                page = b.overflow
            }
        }
    }
}
