import VBDCore
#if canImport(Glibc)
import Glibc
#endif

/// Who holds a reference to a chunk object: a chunk number of a volume family, at a generation.
///
/// The reference's `refcount` tag is this triple, so after a crash every tag on an object names a
/// holder that can be asked whether it still claims the chunk; a tag no holder claims is a leaked
/// reference and is released with ``RadosChunkObjects/release(_:reference:)``. The generation makes
/// tags unique: `refcount` retires a tag once it is put, so a holder that takes the same chunk again
/// must use a new generation.
public struct ChunkReference: Hashable, Sendable, CustomStringConvertible {
    public var family: String
    public var chunk: UInt64
    public var generation: UInt64

    public init(family: String, chunk: UInt64, generation: UInt64) throws(RadosChunkError) {
        guard RadosChunkObjects.isValidIdentifier(family) else { throw .invalidIdentifier(family) }
        self.family = family
        self.chunk = chunk
        self.generation = generation
    }

    /// Parses a tag read back from an object (`family:chunk:generation`, numbers in hexadecimal).
    public init?(tag: String) {
        let parts = tag.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 3, RadosChunkObjects.isValidIdentifier(String(parts[0])),
              let chunk = UInt64(parts[1], radix: 16), let generation = UInt64(parts[2], radix: 16) else { return nil }
        self.family = String(parts[0])
        self.chunk = chunk
        self.generation = generation
    }

    public var tag: String { "\(family):\(String(chunk, radix: 16)):\(String(generation, radix: 16))" }
    public var description: String { tag }
}

/// The name of one chunk object: `chunk.<group>.<hash>`, or `chunk.<group>.<hash>.<n>` for the n-th
/// different content that hashed the same (a collision) within the sharing group.
public struct ChunkObjectName: Hashable, Sendable, CustomStringConvertible {
    public var group: String
    public var hash: ContentHash
    /// 0 for the first content with this hash; 1, 2, ... for colliding contents.
    public var collisionIndex: Int

    public var objectName: String {
        "chunk.\(group).\(hash)" + (collisionIndex > 0 ? ".\(collisionIndex)" : "")
    }

    public var description: String { objectName }

    public init(group: String, hash: ContentHash, collisionIndex: Int) {
        self.group = group
        self.hash = hash
        self.collisionIndex = collisionIndex
    }

    /// Parses an object name; nil for an object that is not a chunk.
    public init?(objectName: String) {
        let parts = objectName.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3 || parts.count == 4, parts[0] == "chunk", parts[2].count == 32,
              let high = UInt64(parts[2].prefix(16), radix: 16), let low = UInt64(parts[2].suffix(16), radix: 16)
        else { return nil }
        var index = 0
        if parts.count == 4 {
            guard let n = Int(parts[3]), n > 0 else { return nil }
            index = n
        }
        self.init(group: String(parts[1]), hash: ContentHash(high: high, low: low), collisionIndex: index)
    }
}

public enum RadosChunkError: Error, Equatable, CustomStringConvertible {
    case rados(RadosError)
    /// An object's bytes do not hash to the hash in its name: it was damaged after it was written.
    case corrupt(object: String, detail: String)
    /// More different contents with one hash than the collision names allow (a broken hash, or
    /// objects planted by someone else).
    case tooManyCollisions(ContentHash)
    /// The object kept changing under the store (deleted and re-created by others) for every attempt.
    case contended(object: String)
    case invalidIdentifier(String)
    /// A sweep of a family whose exclusive lock this client does not hold (or no longer holds).
    case notOwner(family: String, detail: String)

    public var description: String {
        switch self {
        case .rados(let e): return e.description
        case .corrupt(let object, let detail): return "chunk object \(object) is corrupt: \(detail)"
        case .tooManyCollisions(let hash): return "more than \(RadosChunkObjects.collisionNamesMax) different chunks have hash \(hash)"
        case .contended(let object): return "chunk object \(object) changed under every attempt to reference it"
        case .invalidIdentifier(let s): return "'\(s)' is not a valid sharing group or family name (use 1-64 of A-Z a-z 0-9 _ -)"
        case .notOwner(let family, let detail): return "cannot sweep the references of family \(family): \(detail)"
        }
    }
}

/// How a chunk's bytes are kept in its object (the store keeps a chunk compressed when that saves
/// space, raw otherwise).
public enum ChunkForm: UInt8, Sendable, Equatable {
    case raw = 0
    /// LZ4 block compression (``BlockCompression``).
    case lz4 = 1
}

/// What ``RadosChunkObjects/store(_:reference:)`` did.
public struct ChunkStoreOutcome: Sendable, Equatable {
    /// The object now holding the caller's reference.
    public var name: ChunkObjectName
    /// True when the object was created; false when an object with the same bytes was shared.
    public var created: Bool
    /// How many objects with the same hash but other bytes were passed over (0 without a collision).
    public var collisionsPassed: Int
}

/// Content-addressed chunk objects shared by the volumes of one sharing group, reference-counted
/// in the OSDs by Ceph's `refcount` object class.
///
/// - Creating a chunk is one compound operation: create-exclusive + write_full + length attribute +
///   `refcount.set [tag]`. Either the object appears whole with its first reference or not at all.
/// - Sharing an existing object is one compound operation too: compare the length attribute and
///   every byte (`cmpext`), then `refcount.get tag`. The OSD runs the steps atomically, so the bytes
///   compared are the bytes referenced: verify-before-share holds even while another host deletes
///   and re-creates the object between two of our operations.
/// - A hash collision (same name, other bytes) never shares: the next collision name is tried.
/// - Every read decodes the bytes and compares the hash of the raw chunk with the name.
///
/// An object is an 8-byte header (`vc`, the ``ChunkForm``, a zero byte, the raw length as a
/// little-endian UInt32) followed by the stored bytes; its name's hash is the hash of the raw
/// chunk, whatever its form. The header is part of the bytes compared before sharing, so a share
/// takes the same form and raw length as well as the same bytes. Two holders that store the same
/// raw chunk in different forms get two objects (the second under a collision name): correct,
/// only not shared.
///
/// Thread safety: as safe as its ``RadosPool`` (any number of threads).
public final class RadosChunkObjects: Sendable {
    public let pool: RadosPool
    public let group: String
    public let hashFunction: HashFunction
    public let hashSeed: UInt64
    /// Reads fetch up to this many bytes in one round trip; larger objects take a second one.
    public let readSizeHint: Int

    /// Collision names per hash: 0 (the plain name) up to this.
    public static let collisionNamesMax = 8
    /// Attempts per name when the object disappears between our create and our share.
    static let raceAttemptsMax = 16
    static let lengthAttribute = "vbd.length"
    static let headerBytes = 8
    static let magic: [UInt8] = Array("vc".utf8)

    /// The object's bytes for a chunk: the header, then the stored bytes.
    static func objectBytes(form: ChunkForm, rawLength: Int, stored: UnsafeRawBufferPointer) -> [UInt8] {
        var object = [UInt8]()
        object.reserveCapacity(headerBytes + stored.count)
        object += magic
        object.append(form.rawValue)
        object.append(0)
        withUnsafeBytes(of: UInt32(rawLength).littleEndian) { object += $0 }
        object += stored
        return object
    }

    public init(pool: RadosPool, group: String, hashFunction: HashFunction = .xxh3, hashSeed: UInt64,
                readSizeHint: Int = 64 << 10) throws(RadosChunkError) {
        guard Self.isValidIdentifier(group) else { throw .invalidIdentifier(group) }
        self.pool = pool
        self.group = group
        self.hashFunction = hashFunction
        self.hashSeed = hashSeed
        self.readSizeHint = readSizeHint
    }

    static func isValidIdentifier(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.count <= 64 && s.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A) || c == 0x5F || c == 0x2D
        }
    }

    public func hash(_ bytes: UnsafeRawBufferPointer) -> ContentHash {
        hashFunction.hash(bytes, seed: hashSeed)
    }

    /// Stores `bytes` under `reference`: creates the chunk object or, when one with the same bytes
    /// exists, adds the reference to it.
    public func store(_ bytes: [UInt8], reference: ChunkReference) throws(RadosChunkError) -> ChunkStoreOutcome {
        var outcome: Result<ChunkStoreOutcome, RadosChunkError>!
        bytes.withUnsafeBytes { b in
            do throws(RadosChunkError) { outcome = .success(try store(b, reference: reference)) } catch { outcome = .failure(error) }
        }
        return try outcome.get()
    }

    /// Stores a raw chunk (the ``ChunkForm/raw`` form) under `reference`.
    public func store(_ bytes: UnsafeRawBufferPointer, reference: ChunkReference) throws(RadosChunkError) -> ChunkStoreOutcome {
        try store(stored: bytes, form: .raw, rawLength: bytes.count, contentHash: hash(bytes), reference: reference)
    }

    /// Stores a chunk in its stored form: `stored` is the raw chunk of `rawLength` bytes in `form`,
    /// and `contentHash` the hash of the raw chunk with this object set's function and seed (the
    /// caller has it from its dedup lookup). A wrong hash cannot make anyone share wrong bytes (a
    /// share compares the bytes), and the next read of the object reports it as corrupt.
    public func store(stored: UnsafeRawBufferPointer, form: ChunkForm, rawLength: Int, contentHash hash: ContentHash,
                      reference: ChunkReference) throws(RadosChunkError) -> ChunkStoreOutcome {
        precondition(rawLength >= 0 && rawLength <= Int(UInt32.max) && (form != .raw || stored.count == rawLength),
                     "a raw chunk's stored bytes are its raw bytes")
        let object = Self.objectBytes(form: form, rawLength: rawLength, stored: stored)
        var outcome: Result<ChunkStoreOutcome, RadosChunkError>!
        object.withUnsafeBytes { bytes in
            do throws(RadosChunkError) {
                outcome = .success(try storeObject(bytes, hash: hash, reference: reference))
            } catch { outcome = .failure(error) }
        }
        return try outcome.get()
    }

    /// Creates or shares the object whose bytes (header included) are `bytes`.
    private func storeObject(_ bytes: UnsafeRawBufferPointer, hash: ContentHash, reference: ChunkReference) throws(RadosChunkError) -> ChunkStoreOutcome {
        let length = Array(String(bytes.count).utf8)
        let tag = reference.tag
        for index in 0...Self.collisionNamesMax {
            let name = ChunkObjectName(group: group, hash: hash, collisionIndex: index)
            let object = name.objectName
            var collided = false
            for _ in 0..<Self.raceAttemptsMax {
                do {
                    try pool.operate(object) { op in
                        op.createExclusive()
                        op.writeFull(bytes)
                        op.setAttribute(Self.lengthAttribute, length)
                        op.call(RefcountClass.name, "set", input: RefcountClass.set(tags: [tag]))
                    }
                    return ChunkStoreOutcome(name: name, created: true, collisionsPassed: index)
                } catch where error.code == EEXIST {
                    // Someone stored this hash first: share it if, and only if, the bytes are ours.
                } catch {
                    throw .rados(error)
                }
                do {
                    try pool.operate(object) { op in
                        op.assertAttribute(Self.lengthAttribute, equals: length)
                        op.assertBytes(bytes, at: 0)
                        op.call(RefcountClass.name, "get", input: RefcountClass.get(tag: tag))
                    }
                    return ChunkStoreOutcome(name: name, created: false, collisionsPassed: index)
                } catch where error.code == ENOENT {
                    continue  // its last reference went meanwhile: create it again
                } catch where error.code == ECANCELED || error.isExtentMismatch {
                    collided = true
                    break
                } catch {
                    throw .rados(error)
                }
            }
            if !collided { throw .contended(object: pool.describe(object)) }
        }
        throw .tooManyCollisions(hash)
    }

    /// Adds a reference to an object already known to hold the right bytes (e.g. a clone of a
    /// chunk map): no comparison needed. Throws ENOENT when the object is gone.
    public func retain(_ name: ChunkObjectName, reference: ChunkReference) throws(RadosChunkError) {
        do {
            try pool.operate(name.objectName) { op in
                op.call(RefcountClass.name, "get", input: RefcountClass.get(tag: reference.tag))
            }
        } catch { throw .rados(error) }
    }

    /// Drops `reference`; the OSD removes the object with its last reference. Idempotent: releasing
    /// a reference that is not held (or an object that is gone) does nothing.
    public func release(_ name: ChunkObjectName, reference: ChunkReference) throws(RadosChunkError) {
        do {
            try pool.operate(name.objectName) { op in
                op.call(RefcountClass.name, "put", input: RefcountClass.put(tag: reference.tag))
            }
        } catch where error.code == ENOENT {
            return
        } catch { throw .rados(error) }
    }

    /// The references an object holds, as tags (for finding references no holder claims).
    /// Tags that are not ``ChunkReference``s (written by something else) are returned as well.
    public func referenceTags(_ name: ChunkObjectName) throws(RadosChunkError) -> [String] {
        let reply: [UInt8]
        do {
            reply = try pool.callReading(name.objectName, objectClass: RefcountClass.name, method: "read", input: RefcountClass.read())
        } catch { throw .rados(error) }
        guard let tags = RefcountClass.decodeReadReply(reply) else {
            throw .corrupt(object: pool.describe(name.objectName), detail: "undecodable refcount.read reply of \(reply.count) bytes")
        }
        return tags
    }

    /// The raw chunk, decoded from its object and verified against the hash in its name.
    public func read(_ name: ChunkObjectName) throws(RadosChunkError) -> [UInt8] {
        let object = name.objectName
        var bytes = [UInt8](repeating: 0, count: readSizeHint)
        var failure: RadosError?
        let n = bytes.withUnsafeMutableBytes { b -> Int in
            do throws(RadosError) { return try pool.read(object, into: b, at: 0) } catch { failure = error; return 0 }
        }
        if let failure { throw .rados(failure) }
        if n == bytes.count {
            // Possibly longer than the hint: fetch the whole object.
            do { bytes = try pool.readAll(object) } catch { throw .rados(error) }
        } else {
            bytes.removeLast(bytes.count - n)
        }
        let raw = try decode(bytes, object: object)
        let actual = raw.withUnsafeBytes { hash($0) }
        guard actual == name.hash else {
            throw .corrupt(object: pool.describe(object), detail: "its \(raw.count) raw bytes hash to \(actual), not to the \(name.hash) its name says")
        }
        return raw
    }

    /// The stored bytes of a chunk that its holder's record says are in `form` and decode to
    /// `rawLength` bytes: the object's header must say the same and the object must hold exactly
    /// `buffer.count` stored bytes. Not verified against the name's hash: the caller (the store)
    /// decodes and rehashes every chunk it reads (one object read, whatever the form).
    public func readStored(_ name: ChunkObjectName, form: ChunkForm, rawLength: Int,
                           into buffer: UnsafeMutableRawBufferPointer) throws(RadosChunkError) {
        let object = name.objectName
        let expected = Self.headerBytes + buffer.count
        // One byte more than expected, so that a longer object is seen in the same round trip.
        var bytes = [UInt8](repeating: 0, count: expected + 1)
        var failure: RadosError?
        let n = bytes.withUnsafeMutableBytes { b -> Int in
            do throws(RadosError) { return try pool.read(object, into: b, at: 0) } catch { failure = error; return 0 }
        }
        if let failure { throw .rados(failure) }
        func corrupt(_ detail: String) -> RadosChunkError { .corrupt(object: pool.describe(object), detail: detail) }
        guard n == expected else { throw corrupt("it holds \(n - min(n, Self.headerBytes)) stored bytes\(n > expected ? " or more" : ""), its holder's record \(buffer.count)") }
        guard Array(bytes[0..<2]) == Self.magic, bytes[3] == 0 else { throw corrupt("its bytes do not start with a chunk header") }
        let storedRawLength = bytes.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self))) }
        guard bytes[2] == form.rawValue, storedRawLength == rawLength else {
            throw corrupt("its header says form \(bytes[2]) of \(storedRawLength) raw bytes, its holder's record form \(form.rawValue) of \(rawLength)")
        }
        bytes.withUnsafeBytes { b in buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: b[Self.headerBytes..<expected])) }
    }

    /// The raw chunk an object's bytes hold; `.corrupt` when the header or the stored bytes are damaged.
    private func decode(_ bytes: [UInt8], object: String) throws(RadosChunkError) -> [UInt8] {
        func corrupt(_ detail: String) -> RadosChunkError { .corrupt(object: pool.describe(object), detail: detail) }
        guard bytes.count >= Self.headerBytes, Array(bytes[0..<2]) == Self.magic, bytes[3] == 0 else {
            throw corrupt("its \(bytes.count) bytes do not start with a chunk header")
        }
        guard let form = ChunkForm(rawValue: bytes[2]) else { throw corrupt("unknown chunk form \(bytes[2])") }
        let rawLength = bytes.withUnsafeBytes { Int(UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self))) }
        let stored = bytes[Self.headerBytes...]
        switch form {
        case .raw:
            guard stored.count == rawLength else { throw corrupt("\(stored.count) stored bytes for a raw chunk of \(rawLength)") }
            return Array(stored)
        case .lz4:
            var raw = [UInt8](repeating: 0, count: rawLength)
            let decoded = raw.withUnsafeMutableBytes { out in
                stored.withUnsafeBytes { BlockCompression.decompress($0, into: out) }
            }
            guard decoded else { throw corrupt("its \(stored.count) LZ4 bytes do not decode to \(rawLength) bytes") }
            return raw
        }
    }

    /// Releases every reference that its holder no longer claims: after a crash, references taken
    /// by a family whose metadata never recorded them (or recorded their release). Tags that are not
    /// ``ChunkReference``s are left alone. Objects whose last reference goes are removed by the OSD.
    /// Returns what was released. A full listing of the group: a maintenance pass, not the I/O path;
    /// `isClaimed` must answer from the holders' committed metadata.
    @discardableResult
    public func releaseUnclaimed(isClaimed: (ChunkObjectName, ChunkReference) throws -> Bool) throws -> [(ChunkObjectName, ChunkReference)] {
        var released: [(ChunkObjectName, ChunkReference)] = []
        for name in try objectNames() {
            let tags: [String]
            do { tags = try referenceTags(name) } catch {
                // Gone since the listing (its last reference was released meanwhile): nothing to sweep.
                if case .rados(let failure) = error, failure.code == ENOENT { continue }
                throw error
            }
            for reference in tags.compactMap(ChunkReference.init(tag:)) where try !isClaimed(name, reference) {
                try release(name, reference: reference)
                released.append((name, reference))
            }
        }
        return released
    }

    /// The leak sweep for one family, run by its owner: releases the references of `family` (its
    /// directory's namespace names it) that `isClaimed` (answering from the family's committed
    /// metadata) does not claim, and leaves every other family's tags alone, since their owners may
    /// be between a `store` and the durable record that claims it.
    ///
    /// `family` must hold its exclusive lock, checked before each release; the releases go through
    /// the family's own data client, so that a takeover which fences the family's owner also stops
    /// its sweep (the OSDs refuse the late puts), exactly as it stops the owner's writes.
    ///
    /// `onRemoved` is told of each object whose last reference this sweep released, with its size.
    @discardableResult
    public func sweep(family: RadosDirectory, onRemoved: (ChunkObjectName, UInt64) -> Void = { _, _ in },
                      isClaimed: (ChunkObjectName, ChunkReference) throws -> Bool) throws -> [(ChunkObjectName, ChunkReference)] {
        let name = family.pool.namespace
        guard Self.isValidIdentifier(name) else { throw RadosChunkError.invalidIdentifier(name) }
        func checkOwned() throws(RadosChunkError) {
            guard family.ownsExclusively else {
                throw .notOwner(family: name, detail: family.lockLostReason ?? "its directory \(family.path) does not hold its exclusive lock")
            }
        }
        try checkOwned()
        let releaser: RadosChunkObjects
        do {
            releaser = try RadosChunkObjects(pool: family.pool.connection.openPool(pool.pool, namespace: pool.namespace), group: group,
                                             hashFunction: hashFunction, hashSeed: hashSeed, readSizeHint: readSizeHint)
        } catch let error as RadosError { throw RadosChunkError.rados(error) }
        defer { releaser.pool.close() }
        var released: [(ChunkObjectName, ChunkReference)] = []
        for object in try releaser.objectNames() {
            let tags: [String]
            do { tags = try releaser.referenceTags(object) } catch {
                if case .rados(let failure) = error, failure.code == ENOENT { continue }
                throw error
            }
            var bytes: UInt64?
            for reference in tags.compactMap(ChunkReference.init(tag:)) where reference.family == name {
                guard try !isClaimed(object, reference) else { continue }
                try checkOwned()
                if bytes == nil {
                    // Only for the report: a size that cannot be read counts as 0, and the put decides.
                    do { bytes = try releaser.pool.size(of: object.objectName) } catch { bytes = 0 }
                }
                try releaser.release(object, reference: reference)
                released.append((object, reference))
            }
            if let bytes {
                do {
                    if try !releaser.pool.exists(object.objectName) { onRemoved(object, bytes) }
                } catch { throw RadosChunkError.rados(error) }
            }
        }
        return released
    }

    /// Every chunk object of this group in the pool's namespace (a full listing: for checks and
    /// leak searches, not for the I/O path).
    public func objectNames() throws(RadosChunkError) -> [ChunkObjectName] {
        do {
            return try pool.objectNames().compactMap(ChunkObjectName.init(objectName:)).filter { $0.group == group }
        } catch { throw .rados(error) }
    }
}
