import VBDCore
import VBDCache

// MARK: - Notes on the design
//
// Every stored block ("chunk") has a number, its index in the chunk table (PagedChunkTable.swift).
// Maps hold chunk numbers, never hashes: with a weak or colliding hash, two different contents
// still get two numbers, and the byte comparison before sharing decides which number a write may
// reuse (VDO does the same with physical block numbers and an advisory hash index).

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
