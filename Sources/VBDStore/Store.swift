import Synchronization
import VBDCore

#if canImport(Glibc)
import Glibc
import VBDCache
#endif

// MARK: - Notes on the design
//
// One `Store` owns one store directory:
//
//   superblock        two 4 KiB slots; the valid one with the higher generation names the
//                     current commit: the roots of the metadata in `meta` (LMDB's two meta pages)
//   meta              the metadata as 4 KiB pages: map trees, chunk table, dedup index, the
//                     data file's sector map, the image table (see MetadataPager.swift)
//   journal-G         frames of records since commit G (see Journal.swift)
//   data              chunk bytes, packed in 512-byte sectors (see SpaceAllocator.swift)
//   lock              the writer's pid; the lock itself is flock() on the directory
//   reserve           space held back for metadata on a full disk (Store+Persistence.swift)
//
// The metadata lives in pages of `meta`, read on demand through a cache with a byte budget
// (`Options.metadataCacheBytes`), and every change to it is a `JournalRecord` that is applied
// with the same code live and at recovery (`apply`), so replay cannot drift from what the live
// store did. A commit (`checkpoint()`) writes the pages changed since the last one and flips the
// superblock; an open reads the superblock and replays the journal since the last commit, so
// neither costs more as the store grows. Reference counts are stored with the pages but never
// journaled: they follow from the records, and fsck recounts them.
//
// Durability (docs/INVARIANTS.md 1): on local files a write is acknowledged once its
// records are written (not synced) to the journal, after the chunk bytes they name, so a killed
// process loses no acknowledged write; a flush syncs the data file, then writes a marker that
// covers those records and syncs the journal, so a power cut loses only what no flush covered
// (where unsynced writes die with the process, RADOS, records wait in memory for the flush's
// frame instead; see Journal.swift). A chunk's sectors are never reused before the records
// freeing it are covered by a durable marker. Recovery = newest valid superblock -> its metadata
// root -> the trusted frames of its journal and of the journals chained after it (or the older
// slot's, if the newest is damaged). Control
// operations (create, snapshot, share, delete, resize) are applied only once their records are
// durable (`commitDurably`). A failed sync poisons the store until it is reopened.
//
// Concurrency. Every lock, what it guards, and the order they are taken in (a thread holding a
// lock may only take locks further down this list):
//   1. stripeLocks[i]  (StoreMutex x 64) a partial-block read-modify-write of the blocks that
//                      hash to stripe i; a write takes its (at most two) stripes in index order.
//   2. flushMutex      (StoreMutex) one flush or checkpoint at a time: the deferred frees a flush
//                      took, the journal file (a checkpoint switches it), gc's truncation.
//   2a. journalMutex   (StoreMutex) one append to the journal at a time, so frames land in the
//                      order their records were queued: `recordBytesJournaled`; changes of
//                      `journalSequence` and `journalEnd` (made with `mutex` held too). A writer
//                      holds it for one unsynced write; a control operation (`commitDurably`)
//                      and a commit's preparation hold it across their syncs. A failed sync
//                      poisons the store inside a hold of it (`poisonAfterFailedSync`), and a
//                      writer checks the poison at the start of its hold, also when another
//                      frame carried its records: no frame is written after the poison, and
//                      no write is acknowledged after it.
//   2b. commitGate     (StoreMutex) held by a commit (with `flushMutex` and `journalMutex`) from
//                      the start of its freeze to its end, which takes `mutex` in steps so that
//                      readers run in between. Nothing may change metadata meanwhile: a change
//                      takes `mutex` through `lockForChange`, which, finding the freeze under way
//                      (`pager.freezing`), lets go and waits here. Only a thread holding none of
//                      the locks above waits here (`pager.freezing` is false while another holds
//                      `flushMutex`, `journalMutex` or the gate itself).
//   3. mutex           (StoreMutex) all metadata: `pager` (its cache and page table), images
//                      and their maps, `chunks` (entries, free numbers, generations), `index`,
//                      `sectorMap`, `spaceSummary`, `space` (including pages reserved while being punched), `chunkFreesDeferred`,
//                      `pending`, generation/journal counters, `closed`, `poisoned`. Functions named *Locked, `cacheKey`, `retainChunk`,
//                      `releaseChunk` and `loadChunk(lockHeld: true)` need it and assert it in
//                      debug builds (`StoreMutex.assertOwned`). Hashing, compression, data-file
//                      I/O and cache copies run outside it; reads take it only to copy out chunk
//                      entries (and once more to confirm bytes that came from the disk).
//   4. spaceReserveMutex (StoreMutex) a leaf: `reserveFile`, the reserve file's size and the
//                      changes of `spaceReserveInUse`. Taken under any of the above (a journal
//                      append that gets ENOSPC gives the reserve back holding `journalMutex`, a
//                      control operation's holding `mutex` too); takes nothing under it.
//   5. cache shard locks (BlockCache, CleanPageCache: Synchronization.Mutex) are leaves: taken
//                      under `mutex` or alone, and never call back into the store.
// File I/O under `mutex`: metadata pages read on a cache miss, the commit's seal frame, gc and a
// read's last attempt. A commit writes its pages with `mutex` released (MetadataPager.swift).
// The simulator's ControlledScheduler (options.interleaving) sees every StoreMutex operation.
// docs/ARCHITECTURE.md ("Concurrency") says why a reader that lost a race cannot see wrong bytes.

public final class Store: @unchecked Sendable {
    public struct Options: Sendable {
        /// The content hash; tests inject a weak one to force collisions.
        public var hashFunction: HashFunction = .xxh3
        /// Shared read cache, if any.
        public var cache: (any ChunkCache)?
        /// Wall clock for creation times (seconds since 1970); the simulator fixes it.
        public var now: @Sendable () -> UInt64 = { UInt64(time(nil)) }
        /// Journal size that triggers a checkpoint (a commit of the metadata pages).
        public var checkpointJournalBytes: UInt64 = Limits.journalBytesCheckpoint
        /// Bytes of metadata pages kept in memory; pages changed since the last commit stay until
        /// it, and a commit starts once they pass half of this (or `commitDirtyPagesMax`).
        public var metadataCacheBytes: Int = Limits.metadataCacheBytesDefault
        /// Changed metadata pages that start a commit even when the cache has room for more.
        public var commitDirtyPagesMax: Int = Limits.commitDirtyPagesMax
        /// Pages a commit freezes per hold of the store lock (`MetadataPager.continueFreeze`):
        /// what a reader may wait for behind a commit, whatever the commit's size.
        public var commitFreezeStepPages: Int = Limits.commitFreezeStepPages
        /// Bytes of new chunks written one after another in the data file after which their
        /// write-back is started; 0 leaves it all to the syncs.
        public var dataWriteBackBytes: UInt64 = Limits.dataWriteBackBytes
        /// Journal bytes no flush covers yet (queued, or journaled but not synced) that trigger an
        /// implicit flush.
        public var pendingJournalBytesMax: Int = Limits.pendingJournalBytesMax
        /// A flush hole-punches freed 4 KiB pages of the data file only in runs of at least this
        /// many bytes; shorter runs stay allocated for new chunks (SpaceAllocator.swift). `gc`
        /// punches every free page. 4096 punches every free page at every flush.
        public var holePunchRunBytesMin: UInt64 = Limits.holePunchRunBytesMin
        /// Most free bytes a flush keeps in the data file for reuse before punching long runs, as
        /// much as writes allocated meanwhile (SpaceAllocator.swift; 0: punch every long run at
        /// once). `gc` punches regardless.
        public var unpunchedFreeBytesMax: UInt64 = Limits.unpunchedFreeBytesMax
        /// The store secret for a new store; nil = from the system CSPRNG. The simulator fixes it
        /// so that a seed replays exactly.
        public var secretForNewStore: UInt64?
        /// Refuse new chunks once the data file would exceed this (0 = no limit but the disk's).
        public var dataBytesMax: UInt64 = 0
        /// Where the chunks' stored bytes live; nil = the store's data file. A store must be
        /// opened with the same kind of storage it was created with (its records' places mean
        /// sectors of the data file, or whatever the storage put there): RadosStore decides that
        /// from what the store's namespace records.
        public var chunkStorage: (any ChunkStorage)?
        /// The simulator's controlled scheduler: every lock operation becomes a point where it may
        /// switch threads (see InterleavingScheduler.swift). nil in production.
        public var interleaving: (any InterleavingScheduler)?
        /// Bytes kept in the `reserve` file so that a full disk still has room for the journal
        /// frames of deletes, gc and flushes (ZFS's slop space). Released on ENOSPC; while it is
        /// released no new block data is accepted, and it is refilled once space is free again.
        public var spaceReserveBytes = UInt64(2 * Limits.pendingJournalBytesMax)
        /// Open for reading only: a shared lock (refused while a writer has the store, shared
        /// with other readers), no change to any file, no checkpoint on close.
        public var readOnly = false
        /// Called when the journal holds valid frames after a corrupt one (see ``JournalDamage``).
        /// Returning true drops the corrupt frame and everything after it; nil or false refuses
        /// to open. Only an explicit repair (`vbdtool fsck --repair`) sets it.
        public var repairJournal: (@Sendable (JournalDamage) -> Bool)?

        public init() {}
    }

    let directory: any StorageDirectory
    let options: Options
    /// Whether this store's blocks repay LZ4's second pass (`BlockCompression.SecondPassRecord`;
    /// atomic counts, no lock).
    let compressionSecondPasses = BlockCompression.SecondPassRecord()
    let mutex: StoreMutex
    let flushMutex: StoreMutex
    let journalMutex: StoreMutex
    /// Held by a commit while it freezes its changed pages in steps (`checkpoint`); a change
    /// that finds the freeze under way waits for it here (`lockForChange`).
    let commitGate: StoreMutex
    /// Records are written to the journal before a write is acknowledged (Journal.swift): where
    /// unsynced writes outlive the process, and the store is writable.
    let journalsWrites: Bool
    /// The directory's epoch (see ``StorageDirectory/unsyncedWritesEpoch``), read once at open.
    let unsyncedWritesEpoch: String?
    /// Serialize read-modify-write of partial blocks (see Store+BlockIO.swift).
    let stripeLocks: [StoreMutex]

    // Guarded by `mutex`:
    var pager: MetadataPager
    var chunks = PagedChunkTable()
    var index = PagedDedupIndex()
    /// Sectors of the data file held by installed chunks, 1 bit per sector: changed only by the
    /// records (`apply`), so it is exactly what the committed chunk table holds. `space` (the
    /// allocator) reads it through the pager and keeps only what it does not hold (allocations
    /// in flight, frees not yet durable, punch reservations) in memory.
    var sectorMap = PagedArray<UInt64>()
    /// The sector map's counts, committed in the superblock with it, so that an open needs no
    /// pass over the map (see `SpaceSummary`).
    var spaceSummary = SpaceSummary()
    /// The encoded image table (images, their map roots, group names) as bytes in 8-byte words.
    var imageTable = PagedArray<UInt64>()
    var space = SpaceAllocator()
    /// Where the storage keeps its own places (`!chunksInDataFile`): chunks freed, or stored and
    /// never named by a record, waiting for the records freeing them to be durable, as `space`
    /// keeps the data file's sectors. Taken and given back with those (`takeDeferredFreesLocked`).
    var chunkFreesDeferred: [StoredChunkPlace] = []
    /// The encoded image table as last committed, and the pages holding it.
    var committedImageTable: [UInt8] = []
    var imageTablePages: [PageNumber] = []
    var images: [UInt64: Image] = [:]
    var groups: [String: SharingGroupID] = ["default": 0]
    var nextImageID: UInt64 = 1
    var pending = BinaryWriter()
    var pendingRecordCount = 0
    /// Bytes of records queued since the store opened: a writer's ticket, whose records are in
    /// the journal once `recordBytesJournaled` (guarded by `journalMutex`) reaches it.
    var recordBytesQueued: UInt64 = 0
    /// The current journal's end just after the last durable marker: frames below it are covered.
    var journalCoveredEnd: UInt64 = 0
    /// The generation whose journal is current (frames are appended to `journal-<generation>`).
    var generation: UInt64 = 0
    /// After a fallback: the generation of the superblock slot recovery started from. Its slot is
    /// the only complete way back until the next checkpoint is durable, so that checkpoint takes
    /// the other slot (see `writeCheckpointLocked`). Nil otherwise.
    var fallbackRoot: UInt64?
    var secret: UInt64 = 0
    var journalSequence: UInt64 = 0
    var journalEnd: UInt64 = 0
    var replaying = false
    // Guarded by `journalMutex`:
    var recordBytesJournaled: UInt64 = 0
    var closed = false
    /// Set when a sync failed (or a superblock write): what the disk holds is unknown, and a
    /// retried fsync may report success for pages Linux already dropped, so nothing that needs
    /// durability is acknowledged again until the store is reopened (and recovers from disk).
    var failure: String?
    /// References that writes in flight took in phase B (dedup) and have not yet put into a map
    /// (phase F), per chunk: fsck, which can run between the two, counts them as references.
    var writeReferences: [UInt64: UInt32] = [:]
    /// New contents (by hash) that writes in flight found unstored in phase B and have not yet
    /// published (phase F): one entry per content, so bounded by the blocks of requests in flight.
    var newContentInFlight: [ContentHash: NewContentClaim] = [:]
    /// Whether the write paths probe for uncached metadata pages before their locked steps
    /// (Store+PageMisses.swift): off once `pageProbeCleanRunMin` probes in a row found everything
    /// cached with nothing ever evicted, on again when a page is read in place or evicted.
    let pageProbeWanted = Atomic<Bool>(true)
    /// Probes in a row that found every page cached with nothing evicted (see `pageProbeCleanRunMin`).
    /// Guarded by `mutex` (the pager's callback runs under it too).
    var pageProbeCleanRun = 0
    /// Incomplete volumes (see `createIncompleteVolume`) whose filler is running in this process.
    var incompleteInUse: Set<String> = []
    /// Why writes are refused: an earlier failure, or a read-only open.
    var poisoned: String? {
        if let failure { return "\(failure); reopen the store to recover from what is on disk" }
        return options.readOnly ? "it was opened read-only" : nil
    }
    /// The reserve was given up to metadata on a full disk: new block data gets ENOSPC until
    /// it is refilled (see ``Options/spaceReserveBytes``). Changed with `spaceReserveMutex` held
    /// (together with the reserve file's size), read without it.
    let spaceReserveInUse = Atomic<Bool>(false)
    /// Guarded by `spaceReserveMutex`.
    var reserveFile: (any StorageFile)?
    /// The space reserve: taken by a journal append that got ENOSPC (`journalMutex` held, not
    /// `flushMutex`) and by a refill (`flushMutex` held), so neither of those guards it.
    let spaceReserveMutex: StoreMutex
    /// Writes refused since the reserve went out: paces refill attempts.
    let reserveRefusals = Atomic<Int>(0)
    /// What recovery had to do that an operator should know (a fallback to an older checkpoint).
    public internal(set) var recoveryWarnings: [String] = []

    var dataFile: any StorageFile
    /// Where chunk bytes are written and read (ChunkStorage.swift): the data file, or
    /// `Options.chunkStorage`.
    let chunkStorage: any ChunkStorage
    /// `chunkStorage.placesAreDataFileSectors`: the space allocator and the sector map are used.
    let chunksInDataFile: Bool
    var journalFile: any StorageFile
    var superblockFile: any StorageFile
    var metaFile: any StorageFile

    final class Image {
        var record: ImageRecord
        var root: MapRoot
        init(record: ImageRecord, root: MapRoot) {
            self.record = record
            self.root = root
        }
    }

    // MARK: Opening

    /// Creates a new, empty store at `path` and opens it.
    public static func initialize(path: String, options: Options = Options()) throws -> Store {
        let dir: PosixDirectory
        do { dir = try PosixDirectory(path: path, create: true) } catch { throw StoreError(error) }
        return try Store(directory: dir, options: options, create: true)
    }

    /// Opens an existing store at `path`, recovering from a crash if needed.
    public static func open(path: String, options: Options = Options()) throws -> Store {
        let dir: PosixDirectory
        do { dir = try PosixDirectory(path: path, create: false) } catch { throw StoreError.notInitialized(path: path) }
        return try Store(directory: dir, options: options, create: false)
    }

    public init(directory: any StorageDirectory, options: Options, create: Bool) throws {
        self.directory = directory
        self.options = options
        mutex = StoreMutex(scheduler: options.interleaving, traced: true)
        flushMutex = StoreMutex(scheduler: options.interleaving)
        journalMutex = StoreMutex(scheduler: options.interleaving)
        commitGate = StoreMutex(scheduler: options.interleaving)
        spaceReserveMutex = StoreMutex(scheduler: options.interleaving)
        unsyncedWritesEpoch = directory.unsyncedWritesEpoch
        chunksInDataFile = options.chunkStorage?.placesAreDataFileSectors ?? true
        journalsWrites = unsyncedWritesEpoch != nil && !options.readOnly
        stripeLocks = (0..<Store.stripeCount).map { _ in StoreMutex(scheduler: options.interleaving) }
        do {
            if options.readOnly { try directory.lockShared() } else { try directory.lockExclusive() }
        } catch { throw StoreError(error) }
        do {
            if create {
                if options.readOnly { throw StorageError.io("cannot create a store read-only") }
                if directory.fileExists("superblock") { throw StorageError.io("exists") }
                secret = options.secretForNewStore ?? Store.randomSeed()
                superblockFile = try directory.openFile("superblock", create: true)
                dataFile = try directory.openFile("data", create: true)
                chunkStorage = options.chunkStorage ?? DataFileChunkStorage(file: dataFile, writeBackBytes: options.dataWriteBackBytes)
                metaFile = try directory.openFile("meta", create: true)
                // Generation 0 exists only until the first checkpoint below replaces it.
                journalFile = try directory.openFile("journal-0", create: true)
                pager = MetadataPager.create(file: metaFile, budgetBytes: options.metadataCacheBytes, firstGeneration: 1)
            } else {
                guard directory.fileExists("superblock") else { throw StorageError.notFound("superblock") }
                superblockFile = try directory.openFile("superblock", create: false)
                dataFile = try directory.openFile("data", create: false)
                chunkStorage = options.chunkStorage ?? DataFileChunkStorage(file: dataFile, writeBackBytes: options.dataWriteBackBytes)
                // `recover` opens `meta` (after the superblock says which format this is) and picks
                // the generation; until then the journal and meta handles point at the superblock
                // file, which nothing writes through them, and the pager is empty.
                metaFile = superblockFile
                journalFile = superblockFile
                pager = MetadataPager.create(file: metaFile, budgetBytes: options.metadataCacheBytes, firstGeneration: 1)
            }
        } catch StorageError.io("exists") {
            directory.unlock()
            throw StoreError.alreadyInitialized(path: directory.path)
        } catch StorageError.notFound {
            directory.unlock()
            throw StoreError.notInitialized(path: directory.path)
        } catch let e as StorageError {
            directory.unlock()
            throw StoreError(e)
        }
        do {
            // Nothing else can see the store yet; holding `mutex` anyway keeps "functions that
            // need it assert it" true for recovery and the first checkpoint too.
            try mutex.withLock { () throws in
                if create {
                    try attachSpace()
                    try commitHoldingLock()
                    // Every page of a new store is in memory: nothing to probe for until one is evicted.
                    pageProbeWanted.store(false, ordering: .relaxed)
                } else {
                    try recover()
                }
                pager.onPageReadOrEvicted = { [weak self] in
                    self?.pageProbeWanted.store(true, ordering: .relaxed)
                    self?.pageProbeCleanRun = 0
                }
            }
            if !options.readOnly { refillSpaceReserve() }
        } catch {
            directory.unlock()
            throw error
        }
        // Holding the writer's lock, nothing else is filling an incomplete volume: any found was
        // left by an import that died, and would only hold space.
        if !options.readOnly {
            do {
                let discarded = try discardIncompleteVolumes()
                if !discarded.isEmpty {
                    recoveryWarnings.append("deleted \(discarded.count) incomplete volume(s) of interrupted imports: \(discarded.joined(separator: ", "))")
                }
            } catch {
                recoveryWarnings.append("could not delete the incomplete volumes of interrupted imports: \(error)")
            }
        }
    }

    /// The per-store secret: from the system's CSPRNG (getrandom), so hashes cannot be predicted
    /// by a tenant trying to engineer collisions.
    static func randomSeed() -> UInt64 {
        var g = SystemRandomNumberGenerator()
        return g.next() | 1
    }

    /// Flushes, writes a checkpoint (so the next open replays nothing) and releases the lock.
    /// A read-only store only releases its lock.
    public func close() throws {
        let alreadyClosed = mutex.withLock { closed }
        if alreadyClosed { return }
        defer {
            mutex.withLock { closed = true }
            dataFile.close(); journalFile.close(); superblockFile.close(); metaFile.close()
            spaceReserveMutex.withLock { reserveFile?.close() }
            directory.unlock()
        }
        if mutex.withLock({ poisoned }) == nil {
            do { try checkpoint() } catch StoreError.noSpace {
                // A full disk has no room for a new checkpoint; the journal holds everything,
                // so a flush is a clean close (the next open replays it).
                try flush()
            }
        } else if mutex.withLock({ failure }) != nil {
            // Writes may have been acknowledged only up to the failure; say so on the way out.
            throw StoreError.io("store closed without a checkpoint: \(poisoned!)")
        }
    }

    // MARK: Seeds and hashing

    /// The hash seed of a sharing group: identical blocks of two groups get unrelated hashes,
    /// so neither dedup nor the cache can connect them.
    func seed(group: SharingGroupID) -> UInt64 { Store.hashSeed(secret: secret, group: group.rawValue) }

    /// The hash seed of `group` in a store whose secret is `secret` (docs/FORMAT.md, "data"):
    /// stores that share chunks (docs/RADOS.md) have one secret and so derive the same seeds.
    public static func hashSeed(secret: UInt64, group: UInt16) -> UInt64 {
        var z = secret ^ (UInt64(group) &* 0x9E37_79B9_7F4A_7C15)
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Whether the store hashes with `candidate` as its secret (a store of a RADOS sharing domain
    /// must hash with the domain's, docs/RADOS.md); the secret itself is not handed out.
    public func hashesWithSecret(_ candidate: UInt64) -> Bool {
        mutex.withLock { secret == candidate }
    }

    func contentHash(_ bytes: UnsafeRawBufferPointer, group: SharingGroupID) -> ContentHash {
        options.hashFunction.hash(bytes, seed: seed(group: group))
    }
}

/// The free-space summary: the sector map's counts, committed in the superblock with the pages
/// (format 4), so that an open learns what the allocator needs from the superblock alone and the
/// map's pages are read on demand. Changed by the records only (`Store.setSectors`), so replay
/// keeps it exact; fsck recounts it.
struct SpaceSummary: Equatable {
    /// Sectors the sector map holds (its set bits).
    var usedSectors: UInt64 = 0
    /// One past the highest sector in the sector map (0 when empty).
    var endSector: UInt64 = 0
}

/// A block that reads as zeroes but is allocated (WRITE_ZEROES with NO_HOLE): reported as data,
/// not a hole, and holds no chunk.
let zeroAllocatedChunk: UInt64 = 1 << 63

extension Store: ChunkReferenceCounter {
    func retainChunk(_ chunk: UInt64) throws {
        guard chunk < zeroAllocatedChunk else { return }
        mutex.assertOwned("to retain a chunk")
        try chunks.update(chunk, pager: pager) { e in
            guard e.isInstalled else { throw StoreError.corrupted("retain of free chunk \(chunk)") }
            e.retainSaturating()
        }
    }

    func releaseChunk(_ chunk: UInt64) throws {
        guard chunk < zeroAllocatedChunk else { return }
        mutex.assertOwned("to release a chunk")
        var freed: ChunkEntry?
        try chunks.update(chunk, pager: pager) { e in
            guard e.refcount > 0 else { throw StoreError.corrupted("chunk \(chunk) released more often than retained") }
            if e.releaseSaturating() { freed = e }
        }
        guard let e = freed else { return }
        // Last reference gone: the chunk leaves the index, the sector map and the cache now (before
        // its number gets a new generation, so no entry of this generation survives); its sectors
        // are reusable once this is durable.
        try index.remove(chunk, hash: e.hash, pager: pager)
        if chunksInDataFile { try setSectors(e.sector, count: e.sectorCount, inUse: false) }
        options.cache?.remove(try cacheKey(chunk))
        if !chunksInDataFile {
            // Also at replay: the put of a free the crash interrupted runs again (idempotent).
            chunkFreesDeferred.append(e.storedPlace(number: chunk))
        } else if !replaying {
            space.deferFree(e.sector, count: e.sectorCount)
        }
        try chunks.releaseNumber(chunk, pager: pager)
    }

    /// Marks a chunk's sectors in the persistent sector map and its summary (records only: see
    /// `sectorMap`); live, an installed chunk's sectors leave the allocator's overlay. The only
    /// writer of the sector map: each word it changes is reported to the allocator.
    func setSectors(_ sector: UInt64, count: Int, inUse: Bool) throws {
        var s = sector
        let end = sector + UInt64(count)
        while s < end {
            let word = s >> 6
            let (leaf, i) = try sectorMap.writableLeaf(word, pager: pager)
            var bits = leaf.elements[i]
            while s < end && s >> 6 == word {
                let bit = UInt64(1) << (s & 63)
                guard (bits & bit != 0) != inUse else {
                    throw StoreError.corrupted("sector \(s) of the data file is \(inUse ? "already" : "not") in use")
                }
                if inUse { bits |= bit } else { bits &= ~bit }
                s += 1
            }
            leaf.elements[i] = bits
            // The allocator keeps the leaf it read last: it must see every change (SpaceAllocator.swift).
            space.sectorMapWordChanged(word, to: bits)
        }
        if inUse {
            spaceSummary.usedSectors += UInt64(count)
            spaceSummary.endSector = max(spaceSummary.endSector, end)
            if !replaying { space.noteInstalled(sector, count: count) }
        } else {
            spaceSummary.usedSectors -= UInt64(count)
            // The last chunk went: the end moves back to the next one below (pages read backwards
            // from here, the ones just changed first; each later scan starts lower).
            if end == spaceSummary.endSector { spaceSummary.endSector = try sectorMapEnd(below: sector) }
        }
    }

    /// One past the highest sector the sector map holds below `limit` (0 if none).
    func sectorMapEnd(below limit: UInt64) throws -> UInt64 {
        let perLeaf = SpaceAllocator.wordsPerLeaf
        var w = Int((limit + 63) >> 6) - 1
        while w >= 0 {
            let k = w / perLeaf
            let words = try sectorMap.leafElements(UInt64(k), pager: pager)
            var i = words.isEmpty ? -1 : w - k * perLeaf
            while i >= 0 {
                let bits = words[i] & (k * perLeaf + i == Int(limit >> 6) ? (UInt64(1) << (limit & 63)) &- 1 : ~0)
                if bits != 0 { return UInt64(k * perLeaf + i) * 64 + UInt64(64 - bits.leadingZeroBitCount) }
                i -= 1
            }
            w = k * perLeaf - 1
        }
        return 0
    }

    /// With `mutex` held: the cache key of `chunk` as it is now, (generation << 48 | number).
    /// Each reuse of a number has a new key, so a key copied out before a free never names the
    /// next chunk's bytes (see "Stale readers" in docs/ARCHITECTURE.md).
    func cacheKey(_ chunk: UInt64) throws -> UInt64 {
        mutex.assertOwned("cacheKey")
        return Self.staleReadDefenses ? UInt64(try chunks.record(chunk, pager: pager).generation) << 48 | chunk : chunk
    }

    /// False only in the mutation check of the concurrency simulator (docs/ARCHITECTURE.md,
    /// "Stale readers"): building with `-Xswiftc -DVBD_MUTATION_STALE_READS` keys the cache by
    /// bare chunk numbers and trusts cache hits and disk reads unchecked, as before issue 12.
    #if VBD_MUTATION_STALE_READS
    static let staleReadDefenses = false
    #else
    static let staleReadDefenses = true
    #endif
}

/// Writes in flight that are storing one new content (see `Store.newContentInFlight`).
struct NewContentClaim {
    private(set) var writers = 0
    /// Two claims were held at once since the entry was made: every holder re-checks dedup.
    private(set) var overlapped = false

    mutating func claim() {
        if writers > 0 { overlapped = true }
        writers += 1
    }

    /// Returns true when no claim is left (the entry goes).
    mutating func drop() -> Bool {
        writers -= 1
        return writers == 0
    }
}
