import Dispatch
import Synchronization
import VBDCore
import VBDStore
#if canImport(Glibc)
import Glibc
#endif

/// A store's chunks as shared, content-addressed RADOS objects: the RADOS side of the store's
/// ``ChunkStorage`` seam (docs/RADOS.md, "Chunks as shared objects inside the store", step 5).
///
/// Every family (a store in a namespace of its own) of one sharing DOMAIN keeps its chunks in the
/// pool's chunk namespace, its sharing group g as the RADOS group `DOMAIN-g`, so two families of a
/// DOMAIN that store the same bytes in the same group share one object (``RadosChunkObjects``:
/// created with its first reference in one compound write, or shared after the OSD compared
/// every byte, in one compound write too). Each family holds one `refcount` reference per chunk
/// number and reference serial, tagged `family:chunk:serial`.
///
/// A chunk's place (bits 0-47 of its record's location) is the object's collision index (bits
/// 44-47) and the reference serial (bits 0-43). `writeNew` takes a fresh serial from the family's
/// ``RadosChunkSerials`` for a place that has none (0) and fills in the collision index it found.
///
/// A `Store` uses it through `Store.Options.chunkStorage` (``RadosStore/open(_:options:create:sharingDomain:ownership:lockDurationSeconds:logger:onLockLost:whileWaiting:)``
/// does so for a store of a sharing domain): the store then keeps no sector map, `sync` has
/// nothing to wait for (the OSDs acknowledged every compound write durable), and the store calls
/// `release` once the records freeing chunks are durable.
///
/// Thread safety: any number of threads (the pool is thread-safe; the object sets are created
/// once per group under `objectSets`' mutex).
public final class RadosChunkStorage: ChunkStorage {
    /// The pool namespace that holds the chunk objects (and the sharing domains' secrets) of
    /// every family in the pool.
    public static let chunkNamespace = "vbd-chunks"
    public static let serialBits = 44
    public static let serialMax: UInt64 = (1 << 44) - 1

    public let pool: RadosPool
    public let domain: String
    /// The family's name in its references' tags: the namespace of its store (its directory), which
    /// is what ``sweep(owner:claimed:)`` and ``RadosChunkObjects/sweep(family:isClaimed:)`` judge by.
    public let family: String
    public let hashFunction: HashFunction
    /// The hash seed of a sharing group: every family of the DOMAIN must hash alike, or they never
    /// share (a wrong hash cannot make anyone share wrong bytes: the OSD compares them).
    let seedForGroup: @Sendable (UInt16) -> UInt64
    /// Compound writes one `writeNew` keeps in flight at most.
    public let parallelWritesMax: Int
    /// Reference releases (`refcount.put`) one `release` keeps in flight at most.
    public let releasesInFlightMax: Int
    /// The most puts the last `release` had in flight at once (tests).
    public var lastReleasePeakInFlight: Int { releasePeak.load(ordering: .relaxed) }
    private let releasePeak = Atomic<Int>(0)
    /// The object set of each sharing group used so far.
    private let objectSets = Mutex<[UInt16: RadosChunkObjects]>([:])
    /// Where fresh serials come from; nil: every place given to `writeNew` carries its serial.
    public let serials: RadosChunkSerials?
    /// The family's directory, holding its lock, when a `Store` uses this storage
    /// (``RadosStore``): what `gc`'s leak sweep judges and releases through. Nil: no sweep in `gc`.
    public let owner: RadosDirectory?

    public init(pool: RadosPool, domain: String, family: String, hashFunction: HashFunction = .xxh3,
                seedForGroup: @escaping @Sendable (UInt16) -> UInt64, parallelWritesMax: Int = 16,
                releasesInFlightMax: Int = 64, serials: RadosChunkSerials? = nil,
                owner: RadosDirectory? = nil) throws(RadosChunkError) {
        self.owner = owner
        // The group name `DOMAIN-65535` must still be an identifier of at most 64 bytes.
        guard domain.utf8.count <= 58, RadosChunkObjects.isValidIdentifier(domain) else { throw .invalidIdentifier(domain) }
        guard RadosChunkObjects.isValidIdentifier(family) else { throw .invalidIdentifier(family) }
        precondition(parallelWritesMax >= 1 && releasesInFlightMax >= 1)
        self.releasesInFlightMax = releasesInFlightMax
        self.pool = pool
        self.domain = domain
        self.family = family
        self.hashFunction = hashFunction
        self.seedForGroup = seedForGroup
        self.parallelWritesMax = parallelWritesMax
        self.serials = serials
    }

    // MARK: Places and names

    public static func place(serial: UInt64, collisionIndex: Int) -> UInt64 {
        precondition(serial <= serialMax && collisionIndex >= 0 && collisionIndex <= RadosChunkObjects.collisionNamesMax)
        return UInt64(collisionIndex) << UInt64(serialBits) | serial
    }

    public static func serial(of place: UInt64) -> UInt64 { place & serialMax }
    public static func collisionIndex(of place: UInt64) -> Int { Int((place >> UInt64(serialBits)) & 0xF) }

    /// The RADOS group of a store's sharing group.
    public func radosGroup(_ group: UInt16) -> String { "\(domain)-\(group)" }

    public func objects(group: UInt16) -> RadosChunkObjects {
        objectSets.withLock { sets in
            if let set = sets[group] { return set }
            // Cannot throw: the domain was checked in init and a group number is digits.
            let set = try! RadosChunkObjects(pool: pool, group: radosGroup(group), hashFunction: hashFunction,
                                             hashSeed: seedForGroup(group))
            sets[group] = set
            return set
        }
    }

    /// The object a chunk's record names.
    public func objectName(of chunk: StoredChunkPlace) -> ChunkObjectName {
        ChunkObjectName(group: radosGroup(chunk.group.rawValue), hash: chunk.hash,
                        collisionIndex: Self.collisionIndex(of: chunk.place))
    }

    /// This family's reference for a chunk: its number and its serial.
    public func reference(of chunk: StoredChunkPlace) -> ChunkReference {
        // Cannot throw: the family was checked in init.
        try! ChunkReference(family: family, chunk: chunk.number, generation: Self.serial(of: chunk.place))
    }

    // MARK: ChunkStorage

    public var placesAreDataFileSectors: Bool { false }

    /// Nothing to wait for: `writeNew` returns only once the OSDs acknowledged every chunk durable.
    public func sync() throws(StorageError) {}

    /// Stores every chunk under this family's reference (one compound write each, up to
    /// `parallelWritesMax` in flight) and records the collision index in its place. The OSDs
    /// acknowledge each write durable. On a failure the references taken are released again
    /// (what a release cannot undo is a leaked reference, for the sweep) and nothing is changed.
    public func writeNew(_ chunks: inout [NewStoredChunk]) throws(StorageError) {
        guard !chunks.isEmpty else { return }
        let unnamed = chunks.indices.filter { Self.serial(of: chunks[$0].place.place) == 0 }
        if !unnamed.isEmpty {
            guard let serials else { preconditionFailure("a chunk without a serial and no serial counter") }
            var serial = try serials.take(unnamed.count)
            for i in unnamed {
                chunks[i].place.place = Self.place(serial: serial, collisionIndex: 0)
                serial += 1
            }
        }
        let batch = WriteBatch(chunks)
        let workers = min(parallelWritesMax, chunks.count)
        if workers == 1 {
            storeAll(batch)
        } else {
            let group = DispatchGroup()
            let queue = DispatchQueue(label: "vbd.rados.chunk-writes", attributes: .concurrent)
            for _ in 0..<workers { queue.async(group: group) { self.storeAll(batch) } }
            group.wait()
        }
        let outcomes = batch.outcomes.withLock { $0 }
        if let failure = outcomes.lazy.compactMap({ (outcome) -> RadosChunkError? in
            if case .failure(let e) = outcome { return e } else { return nil } }).first {
            for (i, outcome) in outcomes.enumerated() {
                guard case .success(let stored)? = outcome else { continue }
                try? objects(group: chunks[i].place.group.rawValue).release(stored.name, reference: reference(of: chunks[i].place))
            }
            throw .io("storing \(chunks.count) chunk objects of family \(family): \(failure)")
        }
        for i in chunks.indices {
            guard case .success(let stored)? = outcomes[i] else { preconditionFailure("a chunk of the batch was not stored") }
            chunks[i].place.place = Self.place(serial: Self.serial(of: chunks[i].place.place), collisionIndex: stored.name.collisionIndex)
        }
    }

    /// One worker of `writeNew`: stores the batch's chunks by taking the next index until none is left.
    private func storeAll(_ batch: WriteBatch) {
        while let i = batch.next() {
            let chunk = batch.chunks[i]
            let outcome: Result<ChunkStoreOutcome, RadosChunkError>
            do throws(RadosChunkError) {
                outcome = .success(try objects(group: chunk.place.group.rawValue).store(
                    stored: chunk.stored, form: chunk.place.isCompressed ? .lz4 : .raw, rawLength: chunk.place.rawBytes,
                    contentHash: chunk.place.hash, reference: reference(of: chunk.place)))
            } catch {
                outcome = .failure(error)
            }
            batch.outcomes.withLock { $0[i] = outcome }
        }
    }

    public func readStored(_ chunk: StoredChunkPlace, into buffer: UnsafeMutableRawBufferPointer) throws(StorageError) {
        do throws(RadosChunkError) {
            try objects(group: chunk.group.rawValue).readStored(objectName(of: chunk), form: chunk.isCompressed ? .lz4 : .raw,
                                                                rawLength: chunk.rawBytes, into: buffer)
        } catch {
            throw .io("reading chunk \(chunk.number) of family \(family): \(error)")
        }
    }

    /// Drops this family's references of freed chunks (the last one removes the object in the
    /// OSD). Only after the record freeing each chunk is durable: before that a crash brings back
    /// metadata that still maps it. The puts (one `refcount.put` per chunk; a put of a reference
    /// not held, or on an object that is gone, does nothing) go out as asynchronous operations, up
    /// to `releasesInFlightMax` at a time, and all are answered before this returns: a flush frees
    /// as many chunks as its writes overwrote, and one round trip after the other kept it waiting
    /// for thousands of them (docs/RADOS.md, "Random writes"). Idempotent; on a failure the
    /// others are still sent and the first failure is thrown (the store hands the whole list
    /// back to the next flush; what a crash leaves is a leaked reference, for the sweep).
    public func release(_ chunks: [StoredChunkPlace]) throws(StorageError) {
        guard !chunks.isEmpty else { return }
        let puts = AsyncOperations(pool: pool, limit: releasesInFlightMax)
        for chunk in chunks {
            let tag = reference(of: chunk).tag
            puts.submit(objectName(of: chunk).objectName, missingOK: true) { op in
                op.call(RefcountClass.name, "put", input: RefcountClass.put(tag: tag))
            }
        }
        let failure = puts.waitAll()
        releasePeak.store(puts.peakInFlight, ordering: .relaxed)
        if let failure {
            throw .io("releasing \(chunks.count) chunks of family \(family): \(failure)")
        }
    }
}

extension RadosChunkStorage {
    /// What a family's committed metadata claims: this reference on this object.
    private struct Claim: Hashable {
        var object: ChunkObjectName
        var reference: ChunkReference
    }

    /// The leak sweep of this family, run by its owner (docs/RADOS.md, step 6): releases every
    /// reference of the family, on objects of any group of the DOMAIN, that `claimed` does not
    /// account for. `claimed` is every installed chunk of the family's committed metadata (after
    /// its journal replay), as places: a tag `family:chunk:serial` on object O is claimed only by a
    /// place with that number and serial whose record names O (group, hash, collision index).
    /// `owner` is the family's directory, which must hold its exclusive lock (its namespace is
    /// the family's name); releases go through its data client (``RadosChunkObjects/sweep(family:isClaimed:)``).
    /// Other families' tags are left to their owners. Lists the whole chunk namespace once per
    /// group: a maintenance pass.
    ///
    /// A sweep while the family's store serves writes (`gc`) must also spare what those writes
    /// still need: `hashesInFlight` (objects of contents whose write holds its claim, between its
    /// chunk stored and its record installed) and every serial from `serialsFrom` on (references
    /// taken after the claims were read). The takeover's sweep runs before the store serves
    /// anything and needs neither.
    @discardableResult
    public func sweep(owner: RadosDirectory, claimed: [StoredChunkPlace], hashesInFlight: Set<ContentHash> = [],
                      serialsFrom: UInt64 = .max,
                      onRemoved: (ChunkObjectName, UInt64) -> Void = { _, _ in }) throws -> [(ChunkObjectName, ChunkReference)] {
        guard owner.pool.namespace == family else {
            throw RadosChunkError.notOwner(family: family, detail: "the directory given is family \(owner.pool.namespace)'s")
        }
        let claims = Set(claimed.map { Claim(object: objectName(of: $0), reference: reference(of: $0)) })
        let prefix = domain + "-"
        var groups: Set<UInt16> = []
        do {
            for name in try pool.objectNames() {
                guard let chunk = ChunkObjectName(objectName: name), chunk.group.hasPrefix(prefix),
                      let group = UInt16(chunk.group.dropFirst(prefix.count)), radosGroup(group) == chunk.group else { continue }
                groups.insert(group)
            }
        } catch { throw RadosChunkError.rados(error) }
        var released: [(ChunkObjectName, ChunkReference)] = []
        for group in groups.sorted() {
            released += try objects(group: group).sweep(family: owner, onRemoved: onRemoved) { object, reference in
                reference.generation >= serialsFrom || hashesInFlight.contains(object.hash)
                    || claims.contains(Claim(object: object, reference: reference))
            }
        }
        return released
    }

    /// The leak sweep in `gc` (docs/RADOS.md, "The sweep in gc"), while the store serves writes:
    ///  1. read the serial counter: every reference taken later has a serial at or above it;
    ///  2. the store's claims (``Store/chunkClaimsForSweep()``, a window of the chunk table per
    ///     hold of its lock): the installed chunks, and the contents of writes in flight at any of
    ///     those holds (a write between its chunk stored and its record installed is one of them;
    ///     a write that reserves its chunk after the first hold takes its serial after step 1);
    ///  3. flush the store: every record written before step 2 is durable, so a chunk found
    ///     freed (not installed) in step 2 stays freed across a crash and its reference may go;
    ///  4. list and release what none of that claims, through the owner's client.
    /// A reference the store still needs is therefore never released; one leaked while this ran
    /// (or spared by steps 1-2) goes at the next sweep.
    public func releaseUnclaimed(claimedBy store: Store) throws -> UnclaimedChunkRelease {
        // A reader (shared lock) judges nothing: the family's owner may be between a chunk stored
        // and its record (the doc's rule). A lock lost during the sweep stops it before a release.
        guard let owner, let serials, owner.ownsExclusively else { return UnclaimedChunkRelease() }
        let serialsFrom = serials.nextUnused
        let claims = try store.chunkClaimsForSweep()
        try store.flush()
        var result = UnclaimedChunkRelease(swept: true)
        let released = try sweep(owner: owner, claimed: claims.installed, hashesInFlight: claims.hashesInFlight,
                                 serialsFrom: serialsFrom) { _, bytes in
            result.objectsRemoved += 1
            result.bytesRemoved += bytes
        }
        result.references = released.count
        return result
    }

    /// Releases every reference of a family that was deleted as a whole (docs/RADOS.md, "What a
    /// crash leaves"): no store in its namespace, so no record claims any of its tags, on the
    /// objects of any group and domain in `chunks` (the pool's chunk namespace). `family` is the
    /// deleted family's directory holding its exclusive lock (so no store can be created in it
    /// meanwhile); the puts go through its client. Refused while any file of a store is left there.
    public static func releaseDeletedFamily(_ family: RadosDirectory, chunks: RadosPool) throws -> UnclaimedChunkRelease {
        let name = family.pool.namespace
        guard family.ownsExclusively else {
            throw RadosChunkError.notOwner(family: name, detail: family.lockLostReason ?? "its directory does not hold its exclusive lock")
        }
        let files = try family.fileNames()
        guard files.isEmpty else {
            throw RadosChunkError.notOwner(family: name, detail: "its namespace still holds a store (\(files.sorted().joined(separator: ", ")))")
        }
        var groups: Set<String> = []
        do {
            for object in try chunks.objectNames() {
                if let chunk = ChunkObjectName(objectName: object) { groups.insert(chunk.group) }
            }
        } catch { throw RadosChunkError.rados(error) }
        var result = UnclaimedChunkRelease(swept: true)
        for group in groups.sorted() {
            // The seed only matters for hashing new chunks, which a sweep never does.
            let objects = try RadosChunkObjects(pool: chunks, group: group, hashSeed: 0)
            result.references += try objects.sweep(family: family, onRemoved: { _, bytes in
                result.objectsRemoved += 1
                result.bytesRemoved += bytes
            }) { _, _ in false }.count
        }
        return result
    }
}

/// The chunks of one `writeNew` and what became of each, shared by its workers.
private final class WriteBatch: @unchecked Sendable {
    // @unchecked: `chunks` (and the bytes its pointers name) is read-only while the workers run,
    // and `writeNew` waits for them before it returns; the rest is behind mutexes.
    let chunks: [NewStoredChunk]
    let outcomes: Mutex<[Result<ChunkStoreOutcome, RadosChunkError>?]>
    private let nextIndex = Atomic<Int>(0)

    init(_ chunks: [NewStoredChunk]) {
        self.chunks = chunks
        outcomes = Mutex(Array(repeating: nil, count: chunks.count))
    }

    func next() -> Int? {
        let i = nextIndex.wrappingAdd(1, ordering: .relaxed).oldValue
        return i < chunks.count ? i : nil
    }
}

/// The reference serials of one family (docs/RADOS.md, "References"): every serial is used at
/// most once, across crashes too, because `refcount` retires a tag once it is put and a later
/// `get` under it would count nothing. The object `chunk-serials` in the family's namespace holds
/// (8 bytes, little-endian) the first serial not yet reserved; serials below it may have been used.
/// A batch is reserved by writing the next bound (acknowledged durable) before its first serial
/// is handed out, so after a crash counting resumes above everything that was handed out.
/// Written through the family's own data client (its directory's pool), so a fenced owner cannot
/// reserve any more. Thread safety: one mutex; the reservation's round trip happens under it,
/// once per `batch` serials.
public final class RadosChunkSerials: Sendable {
    public static let object = "chunk-serials"
    public let pool: RadosPool
    public let batch: UInt64
    /// (next serial to hand out, first serial not reserved)
    private let state: Mutex<(next: UInt64, reservedBelow: UInt64)>

    /// Reads the family's reservation; a family without one starts at serial 1 (0 means "none").
    public init(pool: RadosPool, batch: UInt64 = 65_536) throws(RadosError) {
        precondition(batch >= 1)
        self.pool = pool
        self.batch = batch
        var bound: UInt64 = 1
        do throws(RadosError) {
            let bytes = try pool.readAll(Self.object)
            guard bytes.count == 8 else {
                throw RadosError("read \(pool.describe(Self.object)): \(bytes.count) bytes, not 8", code: EIO)
            }
            bound = bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        } catch where error.code == ENOENT {}
        state = Mutex((max(bound, 1), max(bound, 1)))
    }

    /// The first of `count` consecutive serials, each used by no earlier call (nor by an earlier
    /// process of the family).
    public func take(_ count: Int) throws(StorageError) -> UInt64 {
        try state.withLock { (s) throws(StorageError) -> UInt64 in
            let first = s.next
            let end = first + UInt64(count)
            guard end <= RadosChunkStorage.serialMax else { throw .io("the family's reference serials are used up") }
            if end > s.reservedBelow {
                let bound = min(end + batch, RadosChunkStorage.serialMax + 1)
                let bytes = (0..<8).map { UInt8(truncatingIfNeeded: bound >> (8 * UInt64($0))) }
                do throws(RadosError) { try pool.writeFull(Self.object, bytes) } catch {
                    throw .io("reserving reference serials: \(error)")
                }
                s.reservedBelow = bound
            }
            s.next = end
            return first
        }
    }

    /// The first serial not yet reserved (tests).
    public var reservedBelow: UInt64 { state.withLock { $0.reservedBelow } }

    /// The next serial `take` hands out: every serial taken later is at or above it.
    public var nextUnused: UInt64 { state.withLock { $0.next } }
}
