import Synchronization
import VBDCache
import VBDCore

// MARK: - Notes on the design
//
// The seam between the store's metadata and the place its chunks' stored bytes live
// (docs/RADOS.md, "Chunks as shared objects inside the store", step 3). The store keeps
// everything that decides WHAT a chunk is (its number, hash, shape, reference count, dedup) and
// verifies every read itself (decompress + rehash against the record's hash, docs/INVARIANTS.md 3);
// a `ChunkStorage` only puts stored bytes somewhere and gives them back.
//
// Two kinds of place. The data file's (`placesAreDataFileSectors`): sectors the store reserves
// with its space allocator (phase D), records in its sector map and reuses once the record freeing
// them is durable (`releaseFrees`); the store keeps that bookkeeping, the storage only writes,
// reads and syncs. Any other storage (RADOS objects, `RadosChunkStorage`) hands out its own
// places in `writeNew` and gets freed chunks back through `release`, once durable; the store then
// keeps no sector map and no data file content.

/// Where one chunk's stored bytes are, as its chunk record says.
public struct StoredChunkPlace: Sendable, Equatable {
    /// The chunk's number in the chunk table.
    public var number: UInt64
    /// Bits 0-47 of the record's location: the data file's first sector; in a store whose chunks
    /// are shared objects, the object's collision index and the reference serial (docs/RADOS.md).
    public var place: UInt64
    public var group: SharingGroupID
    /// The content hash of the raw chunk.
    public var hash: ContentHash
    public var storedBytes: Int
    /// The stored bytes are the raw chunk LZ4-compressed; else they are the raw chunk.
    public var isCompressed: Bool
    public var rawBytes: Int

    public init(number: UInt64, place: UInt64, group: SharingGroupID, hash: ContentHash, storedBytes: Int,
                isCompressed: Bool, rawBytes: Int) {
        self.number = number
        self.place = place
        self.group = group
        self.hash = hash
        self.storedBytes = storedBytes
        self.isCompressed = isCompressed
        self.rawBytes = rawBytes
    }
}

/// A new chunk for ``ChunkStorage/writeNew(_:)``: its place as reserved, and its stored bytes.
public struct NewStoredChunk {
    public var place: StoredChunkPlace
    public var stored: UnsafeRawBufferPointer

    public init(place: StoredChunkPlace, stored: UnsafeRawBufferPointer) {
        precondition(stored.count == place.storedBytes)
        self.place = place
        self.stored = stored
    }
}

/// Where the store's chunk bytes live. Called without the store's `mutex` held; any number of
/// threads at once.
public protocol ChunkStorage: AnyObject, Sendable {
    /// Places are sectors of the store's data file, handed out and freed by the store's space
    /// allocator. Otherwise `writeNew` fills in each place and freed chunks go to `release`.
    var placesAreDataFileSectors: Bool { get }
    /// Stores new chunks whose places were reserved (phase E of a write). Returns once a later
    /// `readStored` sees them; durability is the flush's business. May change a chunk's
    /// `place.place` (the place a record then names); the store records what it finds there after
    /// the call. On a failure none of the chunks is named by a record.
    func writeNew(_ chunks: inout [NewStoredChunk]) throws(StorageError)
    /// Fills `buffer` (exactly `chunk.storedBytes`) with the chunk's stored bytes. The caller
    /// verifies them; a chunk that is missing is an error, never zeroes.
    func readStored(_ chunk: StoredChunkPlace, into buffer: UnsafeMutableRawBufferPointer) throws(StorageError)
    /// Makes every chunk an earlier `writeNew` returned durable (a flush calls it before its
    /// marker says the records naming them are).
    func sync() throws(StorageError)
    /// Gives back chunks no durable record names any more: freed chunks once the record freeing
    /// them is durable, and chunks `writeNew` stored that no record ever named. Idempotent (a
    /// crash may repeat it). Never called when `placesAreDataFileSectors`.
    func release(_ chunks: [StoredChunkPlace]) throws(StorageError)
    /// `Store.gc`'s last step: gives back what this storage holds for `store` that no record
    /// claims (what a crash left: docs/RADOS.md, "What a crash leaves"), while the store keeps
    /// serving writes (``Store/chunkClaimsForSweep()`` says what they may still need). Called
    /// without any store lock held. The data file has nothing of the kind (its free sectors are
    /// the allocator's): the default does nothing.
    func releaseUnclaimed(claimedBy store: Store) throws -> UnclaimedChunkRelease
}

extension ChunkStorage {
    public func releaseUnclaimed(claimedBy store: Store) throws -> UnclaimedChunkRelease { UnclaimedChunkRelease() }
}

/// What `gc` released that no record of the store claimed (``ChunkStorage/releaseUnclaimed(claimedBy:)``).
public struct UnclaimedChunkRelease: Equatable, Sendable {
    /// References given back (RADOS: `refcount` tags of the family no record claims).
    public var references = 0
    /// Objects whose last reference that was, and their bytes (the OSDs removed them).
    public var objectsRemoved = 0
    public var bytesRemoved: UInt64 = 0
    /// False when the storage has no such references to look for (the data file).
    public var swept = false

    public init(references: Int = 0, objectsRemoved: Int = 0, bytesRemoved: UInt64 = 0, swept: Bool = false) {
        self.references = references
        self.objectsRemoved = objectsRemoved
        self.bytesRemoved = bytesRemoved
        self.swept = swept
    }
}

/// What a served store's records and writes in flight claim, read a window of the chunk table
/// per hold of its `mutex`: for a leak sweep that runs while the store serves
/// (``Store/chunkClaimsForSweep()`` says why that is enough).
public struct ChunkClaims: Sendable {
    /// Every installed chunk.
    public var installed: [StoredChunkPlace]
    /// The hashes of the new contents writes hold claims on (phases B-F): a write between its
    /// phase E (the chunk stored) and F (its record installed) is one of them, and its chunk is
    /// named by nothing else yet.
    public var hashesInFlight: Set<ContentHash>
}

/// The store's chunks in its data file: each at its first sector, padded with zeroes to a sector
/// boundary (SpaceAllocator.swift hands out the sectors).
final class DataFileChunkStorage: ChunkStorage, @unchecked Sendable {
    // @unchecked: `file` is a StorageFile, whose implementations serialize what needs it.
    let file: any StorageFile
    /// Bytes written one after another in the file after which their write-back is started (0:
    /// never; the syncs do it all).
    let writeBackBytes: UInt64
    /// The run of the file written one write after another since the write-back was last
    /// started. Guarded by its own mutex, a leaf taken by writers of new chunks.
    private let sequentialRun = Mutex(SequentialRun())

    init(file: any StorageFile, writeBackBytes: UInt64 = 0) {
        self.file = file
        self.writeBackBytes = writeBackBytes
    }

    var placesAreDataFileSectors: Bool { true }

    func sync() throws(StorageError) { try file.sync() }

    func release(_ chunks: [StoredChunkPlace]) throws(StorageError) {
        preconditionFailure("the data file's sectors are freed by the store's space allocator")
    }

    /// One gathered write per run of adjacent sectors (a sequential write of many blocks usually
    /// lands in one run), each chunk followed by zeroes to its sector boundary (no staging copy).
    func writeNew(_ chunks: inout [NewStoredChunk]) throws(StorageError) {
        let sorted = chunks.sorted { $0.place.place < $1.place.place }
        let zeros = Self.sectorOfZeros
        var parts: [UnsafeRawBufferPointer] = []
        parts.reserveCapacity(2 * sorted.count)
        func sectorCount(_ c: NewStoredChunk) -> Int { (c.stored.count + Limits.sectorBytes - 1) / Limits.sectorBytes }
        var i = 0
        while i < sorted.count {
            parts.removeAll(keepingCapacity: true)
            var j = i
            repeat {
                let stored = sorted[j].stored
                parts.append(stored)
                let padding = sectorCount(sorted[j]) * Limits.sectorBytes - stored.count
                if padding > 0 { parts.append(UnsafeRawBufferPointer(rebasing: zeros[0..<padding])) }
                j += 1
            } while j < sorted.count && sorted[j].place.place == sorted[j - 1].place.place + UInt64(sectorCount(sorted[j - 1]))
            let offset = sorted[i].place.place * UInt64(Limits.sectorBytes)
            try file.write(gathering: parts, at: offset)
            noteWritten(offset: offset, length: parts.reduce(0) { $0 + UInt64($1.count) })
            i = j
        }
    }

    /// Starts the write-back of a run written in order (each write where the last ended) once it
    /// reaches `writeBackBytes`, as RocksDB's bytes_per_sync does for its sequential files: what a
    /// sync then finds dirty of a streaming writer, and what a read of the disk may queue behind,
    /// is a slice of it. Scattered writes (new chunks in freed sectors all over the file) are left
    /// to the sync, which sorts and merges them; started one by one they would reach the disk as
    /// scattered small writes among the readers' reads.
    private func noteWritten(offset: UInt64, length: UInt64) {
        guard writeBackBytes > 0 else { return }
        let end = offset + length
        let step = writeBackBytes
        // The run's start when it is long enough to start (the run then begins anew at `end`).
        let start = sequentialRun.withLock { (run: inout SequentialRun) -> UInt64 in
            run.extend(offset: offset, end: end)
            return run.takeIfLonger(than: step)
        }
        if start != .max { file.writeBack(offset: start, length: end - start, waiting: false) }
    }

    func readStored(_ chunk: StoredChunkPlace, into buffer: UnsafeMutableRawBufferPointer) throws(StorageError) {
        precondition(buffer.count == chunk.storedBytes)
        try file.readExactly(into: buffer, at: chunk.place * UInt64(Limits.sectorBytes))
    }

    /// Padding for the tail of a chunk's last sector; never written to.
    nonisolated(unsafe) private static let sectorOfZeros: UnsafeRawBufferPointer = {
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: Limits.sectorBytes, alignment: 16)
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        return UnsafeRawBufferPointer(zeros)
    }()
}

/// A run of a file written one write after another (`DataFileChunkStorage.noteWritten`).
struct SequentialRun {
    var start: UInt64 = 0
    var end: UInt64 = 0

    /// A write at `offset` where the run ends extends it; anywhere else it begins a new run.
    mutating func extend(offset: UInt64, end newEnd: UInt64) {
        if offset != end { start = offset }
        end = newEnd
    }

    /// The run's start if it reached `bytes` (the run then begins again at its end), else `.max`.
    mutating func takeIfLonger(than bytes: UInt64) -> UInt64 {
        guard end - start >= bytes else { return .max }
        defer { start = end }
        return start
    }
}

/// Frees waiting for the records that made them to be durable: the data file's sectors (the space
/// allocator's) and, where the chunk storage keeps its own places, the chunks to `release`.
struct DeferredFrees {
    var sectors: [(sector: UInt64, count: Int)] = []
    var chunks: [StoredChunkPlace] = []

    var isEmpty: Bool { sectors.isEmpty && chunks.isEmpty }
    var count: Int { sectors.count + chunks.count }
}

extension ChunkEntry {
    /// The entry's chunk as its storage sees it.
    func storedPlace(number: UInt64) -> StoredChunkPlace {
        StoredChunkPlace(number: number, place: sector, group: group, hash: hash, storedBytes: storedBytes,
                         isCompressed: isCompressed, rawBytes: rawBytes)
    }
}

extension Store {
    /// The places of every installed chunk: what the store's records claim in its chunk storage
    /// (the claim list of a RADOS family's leak sweep, docs/RADOS.md step 6). Walks the whole
    /// chunk table holding `mutex`: for a maintenance pass before the store serves anything (no
    /// write in flight can then have stored a chunk its records do not list yet).
    public func installedChunkPlaces() throws -> [StoredChunkPlace] {
        try mutex.withLock {
            var places: [StoredChunkPlace] = []
            try chunks.records.forEachLeaf(pager: pager) { first, leaf in
                for (k, r) in leaf.elements.enumerated() where r.entry.isInstalled {
                    places.append(r.entry.storedPlace(number: first + UInt64(k)))
                }
            }
            return places
        }
    }

    /// The claims of a leak sweep that runs while the store serves writes (`gc`): the installed
    /// chunks, walked `sweepClaimLeavesPerHold` chunk-table leaves per hold of `mutex` (read before
    /// each hold, not under it), and the new contents in flight at any of those holds. A write's
    /// new chunk is claimed (`newContentInFlight`) from phase B until the hold of phase F that
    /// installs its record (or gives it back), so at the first hold every chunk a write stored is
    /// installed or in flight; one in flight then is claimed whatever window it installs into. An
    /// installed chunk freed before its window is walked is left out, which is right once the
    /// sweeper's flush after this call made the free durable. A write whose phase D comes after
    /// the first hold takes its reference serial after it too (phase E), so a sweeper that read the
    /// serial counter before this call knows those by their serials (docs/RADOS.md, "The sweep in
    /// gc").
    public func chunkClaimsForSweep() throws -> ChunkClaims {
        var places: [StoredChunkPlace] = []
        var hashesInFlight = Set<ContentHash>()
        let leafElements = UInt64(PagedArray<ChunkRecord>.Leaf.capacity)
        let perHold = Store.sweepClaimLeavesPerHold * leafElements
        var next: UInt64 = 0
        while true {
            let walked = try withLockAfterLoadingPages(probingAlways: true, probe: {
                var n = next
                let end = min(next + perHold, chunks.end)
                while n < end { _ = try? chunks.entry(n, pager: pager); n += leafElements }
            }) { () throws -> Bool in
                hashesInFlight.formUnion(newContentInFlight.keys)
                let end = chunks.end
                guard next < end else { return false }
                let upper = min(next + perHold, end)
                try chunks.records.forEachLeaf(in: next..<upper, pager: pager) { first, leaf in
                    for (k, r) in leaf.elements.enumerated() where r.entry.isInstalled {
                        let number = first + UInt64(k)
                        if number >= next && number < upper { places.append(r.entry.storedPlace(number: number)) }
                    }
                }
                next = upper
                return true
            }
            if !walked { break }
        }
        return ChunkClaims(installed: places, hashesInFlight: hashesInFlight)
    }

    /// Chunk-table leaves (253 records each) a sweep's claims walk per hold of the store lock.
    static let sweepClaimLeavesPerHold: UInt64 = 16
}
