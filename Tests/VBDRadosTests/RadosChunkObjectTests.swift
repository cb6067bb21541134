import Foundation
import Synchronization
import Testing
import VBDCore
@testable import VBDRados

/// Bytes unique per `seed`.
func pattern(seed: UInt64, count: Int = 4096) -> [UInt8] {
    var g = SplitMix64(seed: seed)
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: g.next()) }
}

@Suite(.serialized) struct RadosChunkObjectTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    func chunks(_ pool: RadosPool, group: String = "g1", hash: HashFunction = .xxh3) throws -> RadosChunkObjects {
        try RadosChunkObjects(pool: pool, group: group, hashFunction: hash, hashSeed: 42)
    }

    /// Two clients ("hosts") storing the same bytes end up with one object holding both references;
    /// another sharing group never shares it.
    @Test func sameBytesFromTwoHostsShareOneObject() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "dedup")
        let poolB = try hostB.openPool("vbd", namespace: poolA.namespace)
        let a = try chunks(poolA), b = try chunks(poolB)
        let bytes = pattern(seed: 1)
        let refA = try ChunkReference(family: "volA", chunk: 7, generation: 1)
        let refB = try ChunkReference(family: "volB", chunk: 9, generation: 1)

        let first = try a.store(bytes, reference: refA)
        let second = try b.store(bytes, reference: refB)
        #expect(first.created && !second.created)
        #expect(first.name == second.name && second.collisionsPassed == 0)
        #expect(Set(try a.referenceTags(first.name)) == [refA.tag, refB.tag])
        #expect(try b.read(first.name) == bytes)
        #expect(try a.objectNames() == [first.name])

        let otherGroup = try chunks(poolB, group: "g2")
        let third = try otherGroup.store(bytes, reference: refB)
        #expect(third.created && third.name != first.name)
        #expect(try a.referenceTags(first.name).count == 2)
    }

    /// An object under the right name with other bytes (planted, or a real hash collision) is never
    /// shared: the store goes to the next collision name and says so.
    @Test func collidingObjectIsNeverShared() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "collide")
        let chunks = try chunks(pool)
        let bytes = pattern(seed: 2)
        let hash = bytes.withUnsafeBytes { chunks.hash($0) }
        let plain = ChunkObjectName(group: "g1", hash: hash, collisionIndex: 0)

        // Same header, length and length attribute, one byte different: only the byte comparison catches it.
        var impostor = bytes
        impostor[4000] ^= 0x01
        let impostorObject = impostor.withUnsafeBytes { RadosChunkObjects.objectBytes(form: .raw, rawLength: 4096, stored: $0) }
        try pool.writeFull(plain.objectName, impostorObject)
        try pool.setAttribute(plain.objectName, RadosChunkObjects.lengthAttribute, Array(String(impostorObject.count).utf8))
        // And under the first collision name, the right object followed by more: only the length catches it.
        let longer = ChunkObjectName(group: "g1", hash: hash, collisionIndex: 1)
        let longerObject = bytes.withUnsafeBytes { RadosChunkObjects.objectBytes(form: .raw, rawLength: 4096, stored: $0) } + [0]
        try pool.writeFull(longer.objectName, longerObject)
        try pool.setAttribute(longer.objectName, RadosChunkObjects.lengthAttribute, Array(String(longerObject.count).utf8))

        let outcome = try chunks.store(bytes, reference: ChunkReference(family: "v", chunk: 1, generation: 1))
        #expect(outcome.created)
        #expect(outcome.collisionsPassed == 2)
        #expect(outcome.name == ChunkObjectName(group: "g1", hash: hash, collisionIndex: 2))
        #expect(try chunks.read(outcome.name) == bytes)
        #expect(try pool.readAll(plain.objectName) == impostorObject)
        #expect(try pool.readAll(longer.objectName) == longerObject)

        // A second store of the same bytes shares the verified object, not the impostors.
        let again = try chunks.store(bytes, reference: ChunkReference(family: "v", chunk: 2, generation: 1))
        #expect(!again.created && again.name == outcome.name)
    }

    /// With a 1-bit hash almost every store collides: each content still gets its own object and
    /// reads back exactly.
    @Test func realCollisionsKeepContentsApart() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "weak")
        let chunks = try chunks(pool, hash: .weak(bits: 1))
        var stored: [(ChunkObjectName, [UInt8])] = []
        for seed in 0..<6 as Range<UInt64> {
            let bytes = pattern(seed: 100 + seed, count: 512)
            let outcome = try chunks.store(bytes, reference: ChunkReference(family: "v", chunk: seed, generation: 1))
            #expect(outcome.created)
            stored.append((outcome.name, bytes))
        }
        #expect(Set(stored.map(\.0)).count == 6)
        #expect(stored.contains { $0.0.collisionIndex > 0 })
        for (name, bytes) in stored { #expect(try chunks.read(name) == bytes) }
        // Storing one of them again shares its own object.
        let again = try chunks.store(stored[4].1, reference: ChunkReference(family: "w", chunk: 0, generation: 1))
        #expect(!again.created && again.name == stored[4].0)
    }

    /// The last release removes the object in the OSD; releasing twice, or a reference never held,
    /// changes nothing; a leaked reference is found by its tag and released.
    @Test func lastReleaseRemovesTheObject() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "release")
        let chunks = try chunks(pool)
        let bytes = pattern(seed: 3)
        let holder = try ChunkReference(family: "vol", chunk: 1, generation: 1)
        let crashed = try ChunkReference(family: "gone", chunk: 5, generation: 3)
        let name = try chunks.store(bytes, reference: holder).name
        _ = try chunks.store(bytes, reference: crashed)

        try chunks.release(name, reference: holder)
        try chunks.release(name, reference: holder)
        try chunks.release(name, reference: ChunkReference(family: "never", chunk: 0, generation: 0))
        #expect(try pool.exists(name.objectName))

        // After a crash: the tags say who holds references; "gone" no longer claims its chunk 5.
        let tags = try chunks.referenceTags(name)
        #expect(tags.compactMap(ChunkReference.init(tag:)) == [crashed])
        try chunks.release(name, reference: crashed)
        #expect(try !pool.exists(name.objectName))
        #expect(try chunks.objectNames().isEmpty)

        // A store after that creates the object anew.
        #expect(try chunks.store(bytes, reference: ChunkReference(family: "vol", chunk: 1, generation: 2)).created)
    }

    /// Bytes changed in the OSD after the store are caught by the next read.
    @Test func corruptedObjectIsCaughtOnRead() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "corrupt")
        let chunks = try chunks(pool)
        let name = try chunks.store(pattern(seed: 4), reference: ChunkReference(family: "v", chunk: 0, generation: 1)).name
        var bytes = try pool.readAll(name.objectName)
        bytes[RadosChunkObjects.headerBytes + 17] ^= 0x80
        try pool.writeFull(name.objectName, bytes)
        let caught = #expect(throws: RadosChunkError.self) { _ = try chunks.read(name) }
        if case .corrupt(let object, _) = caught { #expect(object.hasSuffix(name.objectName)) } else { Issue.record("not .corrupt: \(String(describing: caught))") }
        // Truncated counts as corrupt too, and a missing object is an error, not zeroes.
        try pool.writeFull(name.objectName, Array(bytes.prefix(100)))
        #expect(throws: RadosChunkError.self) { try chunks.read(name) }
        try pool.remove(name.objectName)
        #expect(throws: RadosChunkError.self) { try chunks.read(name) }
    }

    /// A chunk kept LZ4-compressed is named by the hash of its raw bytes, shared by a second family
    /// storing the same compressed form, and read back raw after its decoding was verified; the same
    /// chunk stored raw by a third family gets an object of its own (not shared, still right).
    /// Damage to the compressed bytes or to the header's raw length is caught on read.
    @Test func compressedChunksAreNamedByTheirRawContent() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "lz4")
        let chunks = try chunks(pool)
        let raw = (0..<4096).map { UInt8(truncatingIfNeeded: ($0 / 64) &* 7) }  // compresses well
        var compressed = [UInt8](repeating: 0, count: BlockCompression.bound(raw.count))
        let storedCount = try #require(raw.withUnsafeBytes { source in
            compressed.withUnsafeMutableBytes { BlockCompression.compress(source, into: $0) }
        })
        compressed.removeLast(compressed.count - storedCount)
        #expect(storedCount < raw.count / 4)
        let hash = raw.withUnsafeBytes { chunks.hash($0) }

        let first = try compressed.withUnsafeBytes {
            try chunks.store(stored: $0, form: .lz4, rawLength: raw.count, contentHash: hash,
                             reference: ChunkReference(family: "a", chunk: 1, generation: 1))
        }
        #expect(first.created && first.name.hash == hash && first.name.collisionIndex == 0)
        #expect(try pool.size(of: first.name.objectName) == UInt64(RadosChunkObjects.headerBytes + storedCount))
        #expect(try chunks.read(first.name) == raw)
        let second = try compressed.withUnsafeBytes {
            try chunks.store(stored: $0, form: .lz4, rawLength: raw.count, contentHash: hash,
                             reference: ChunkReference(family: "b", chunk: 5, generation: 1))
        }
        #expect(!second.created && second.name == first.name)
        let rawForm = try chunks.store(raw, reference: ChunkReference(family: "c", chunk: 2, generation: 1))
        #expect(rawForm.created && rawForm.name.hash == hash && rawForm.name.collisionIndex == 1)
        #expect(try chunks.read(rawForm.name) == raw)

        let good = try pool.readAll(first.name.objectName)
        var damaged = good
        damaged[damaged.count - 3] ^= 0x5A
        try pool.writeFull(first.name.objectName, damaged)
        #expect(throws: RadosChunkError.self) { try chunks.read(first.name) }
        var longerRaw = good
        longerRaw[4] &+= 1  // the raw length, one more than the bytes decode to
        try pool.writeFull(first.name.objectName, longerRaw)
        let caught = #expect(throws: RadosChunkError.self) { try chunks.read(first.name) }
        if case .corrupt = caught {} else { Issue.record("not .corrupt: \(String(describing: caught))") }
        try pool.writeFull(first.name.objectName, good)
        #expect(try chunks.read(first.name) == raw)
    }

    /// The sweep judges only the family it owns, through that family's own client: another
    /// family's leaked tags are left to its owner, a directory without its lock cannot sweep, and
    /// once the family is taken over by force (its owner fenced) the old owner's late sweep is
    /// refused by the OSD before it releases anything.
    @Test func sweepJudgesOnlyTheOwnedFamily() throws {
        let hostA = try cluster.connect(timeoutSeconds: 10), hostB = try cluster.connect()
        let familyA = RadosDirectory(pool: try cluster.freshPool(hostA, prefix: "fam"))
        let familyB = RadosDirectory(pool: try cluster.freshPool(hostB, prefix: "fam"))
        try familyA.lockExclusive()
        try familyB.lockExclusive()
        let chunkNamespace = try cluster.freshPool(hostA, prefix: "chunks").namespace
        // Host A's client for the chunk namespace is not its family's data client: the sweep must
        // still release through the latter, which a takeover of the family fences.
        let chunksA = try chunks(try cluster.connect(timeoutSeconds: 10).openPool("vbd", namespace: chunkNamespace))
        let chunksB = try chunks(try hostB.openPool("vbd", namespace: chunkNamespace))
        let a = familyA.pool.namespace, b = familyB.pool.namespace
        let kept = try ChunkReference(family: a, chunk: 1, generation: 1)
        let leakedA = try ChunkReference(family: a, chunk: 2, generation: 1)
        let leakedB = try ChunkReference(family: b, chunk: 3, generation: 1)
        let shared = pattern(seed: 70), other = pattern(seed: 71)
        let sharedName = try chunksA.store(shared, reference: kept).name
        _ = try chunksA.store(shared, reference: leakedA)
        let otherName = try chunksB.store(other, reference: leakedB).name

        // Without the family's lock there is no sweep.
        let familyAWithoutLock = RadosDirectory(pool: try hostB.openPool("vbd", namespace: a))
        let refusal = #expect(throws: RadosChunkError.self) { try chunksB.sweep(family: familyAWithoutLock) { _, _ in false } }
        if case .notOwner = refusal {} else { Issue.record("not .notOwner: \(String(describing: refusal))") }

        // A's owner releases A's unclaimed tag and nothing of B's (B's owner may be mid-write).
        let released = try chunksA.sweep(family: familyA) { _, reference in reference == kept }
        #expect(released.map(\.1) == [leakedA])
        #expect(try chunksA.referenceTags(sharedName) == [kept.tag])
        #expect(try chunksA.referenceTags(otherName) == [leakedB.tag])
        // B's owner sweeps B: the last reference goes, and the object with it.
        #expect(try chunksB.sweep(family: familyB) { _, _ in false }.map(\.1) == [leakedB])
        #expect(try !chunksB.pool.exists(otherName.objectName))

        // Family A is taken over by force while its old owner has not noticed yet.
        let leakedAgain = try ChunkReference(family: a, chunk: 4, generation: 1)
        _ = try chunksB.store(shared, reference: leakedAgain)
        let taker = RadosDirectory(pool: try hostB.openPool("vbd", namespace: a))
        #expect(try taker.takeOver(waitingUpTo: 5, force: true).count == 2)
        #expect(familyA.ownsExclusively)
        // B's read brings the map with the blocklist entry to the object's placement group.
        #expect(Set(try chunksB.referenceTags(sharedName)) == [kept.tag, leakedAgain.tag])
        let fenced = #expect(throws: RadosChunkError.self) { try chunksA.sweep(family: familyA) { _, reference in reference == kept } }
        if case .rados(let failure) = fenced { #expect(failure.code == RadosError.blocklisted, "\(failure)") } else {
            Issue.record("the fenced owner's sweep: \(String(describing: fenced))")
        }
        #expect(Set(try chunksB.referenceTags(sharedName)) == [kept.tag, leakedAgain.tag])
        // The new owner sweeps A.
        #expect(try chunksB.sweep(family: taker) { _, reference in reference == kept }.map(\.1) == [leakedAgain])
        taker.unlock()
        familyB.unlock()
    }

    /// Two hosts with four threads each store and release the same chunks at once: every create,
    /// share and last release races with the others. Each thread checks what it reads back, and in
    /// the end no reference is lost or left over: every object is gone.
    @Test func racingStoresAndReleasesFromTwoHosts() throws {
        let hosts = [try cluster.connect(), try cluster.connect()]
        let namespace = try cluster.freshPool(hosts[0], prefix: "race").namespace
        let stores = try hosts.map { try chunks(try $0.openPool("vbd", namespace: namespace)) }
        let contents = (0..<24).map { pattern(seed: 500 + UInt64($0), count: 1024) }
        let failures = Mutex<[String]>([])
        let group = DispatchGroup()
        for worker in 0..<8 {
            group.enter()
            let chunks = stores[worker % 2]
            Thread.detachNewThread {
                defer { group.leave() }
                do {
                    for round in 0..<3 {
                        for (i, bytes) in contents.enumerated() {
                            let reference = try ChunkReference(family: "w\(worker)", chunk: UInt64(i), generation: UInt64(round))
                            let outcome = try chunks.store(bytes, reference: reference)
                            if try chunks.read(outcome.name) != bytes { throw MicroClusterError(message: "chunk \(i) read back wrong") }
                            try chunks.release(outcome.name, reference: reference)
                        }
                    }
                } catch {
                    failures.withLock { $0.append("worker \(worker): \(error)") }
                }
            }
        }
        group.wait()
        #expect(failures.withLock { $0 } == [])
        #expect(try stores[0].objectNames() == [])
    }

    /// A host crashed after taking references it never recorded: the sweep finds them by their
    /// tags and releases them, keeping every reference a holder still claims.
    @Test func unclaimedReferencesAreFoundAndReleased() throws {
        let connection = try cluster.connect()
        let chunks = try chunks(try cluster.freshPool(connection, prefix: "sweep"))
        let shared = pattern(seed: 60), onlyCrashed = pattern(seed: 61)
        let kept = try ChunkReference(family: "live", chunk: 1, generation: 4)
        let leaked = try ChunkReference(family: "crashed", chunk: 2, generation: 9)
        let leakedToo = try ChunkReference(family: "crashed", chunk: 3, generation: 9)
        let sharedName = try chunks.store(shared, reference: kept).name
        _ = try chunks.store(shared, reference: leaked)
        let orphanName = try chunks.store(onlyCrashed, reference: leakedToo).name
        // A foreign tag (not a ChunkReference) is never touched.
        try chunks.pool.operate(sharedName.objectName) { $0.call("refcount", "get", input: RefcountClass.get(tag: "someone-else")) }

        // The committed metadata of "crashed" says it holds nothing; "live" holds chunk 1 at generation 4.
        let released = try chunks.releaseUnclaimed { _, reference in reference == kept }
        #expect(Set(released.map(\.1)) == [leaked, leakedToo])
        #expect(Set(try chunks.referenceTags(sharedName)) == [kept.tag, "someone-else"])
        #expect(try !chunks.pool.exists(orphanName.objectName))
        #expect(try chunks.read(sharedName) == shared)
        #expect(try chunks.releaseUnclaimed { _, reference in reference == kept }.isEmpty)
    }
}

/// Parsing needs no cluster.
@Suite struct RadosNameTests {
    @Test func namesAndTagsRoundTrip() throws {
        let name = ChunkObjectName(group: "grp-1", hash: ContentHash(high: 0xabc, low: 0x123), collisionIndex: 3)
        #expect(ChunkObjectName(objectName: name.objectName) == name)
        #expect(ChunkObjectName(objectName: "file.journal") == nil)
        let reference = try ChunkReference(family: "fam_2", chunk: 0xdead, generation: 0xbeef)
        #expect(ChunkReference(tag: reference.tag) == reference)
        #expect(throws: RadosChunkError.invalidIdentifier("a.b")) { try ChunkReference(family: "a.b", chunk: 0, generation: 0) }
    }
}
