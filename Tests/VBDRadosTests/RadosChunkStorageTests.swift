import Foundation
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

/// The store's chunk-storage seam on RADOS (`RadosChunkStorage`), driven through the protocol the
/// store calls, against the micro cluster.
@Suite(.serialized) struct RadosChunkStorageTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    static let seed: @Sendable (UInt16) -> UInt64 = { group in 0x5EED_0000 | UInt64(group) }

    /// A chunk as the store would hand it over: hashed raw bytes, stored raw or LZ4-compressed.
    struct Chunk {
        var raw: [UInt8]
        var stored: [UInt8]
        var compressed: Bool
        var group: UInt16
        var hash: ContentHash

        init(raw: [UInt8], compress: Bool, group: UInt16) throws {
            self.raw = raw
            self.group = group
            hash = raw.withUnsafeBytes { HashFunction.xxh3.hash($0, seed: RadosChunkStorageTests.seed(group)) }
            compressed = compress
            if compress {
                var out = [UInt8](repeating: 0, count: BlockCompression.bound(raw.count))
                let n = try #require(raw.withUnsafeBytes { r in out.withUnsafeMutableBytes { BlockCompression.compress(r, into: $0) } })
                out.removeLast(out.count - n)
                stored = out
            } else {
                stored = raw
            }
        }

        func place(number: UInt64, serial: UInt64) -> StoredChunkPlace {
            StoredChunkPlace(number: number, place: RadosChunkStorage.place(serial: serial, collisionIndex: 0),
                             group: .init(group), hash: hash, storedBytes: stored.count,
                             isCompressed: compressed, rawBytes: raw.count)
        }
    }

    /// Writes `chunks` through the seam as chunk numbers `firstNumber...` with serials
    /// `firstSerial...`; returns the places the storage gave back.
    func write(_ storage: any ChunkStorage, _ chunks: [Chunk], firstNumber: UInt64, firstSerial: UInt64) throws -> [StoredChunkPlace] {
        var places: [StoredChunkPlace] = []
        try withStoredBytes(chunks) { buffers in
            var new = chunks.indices.map { i in
                NewStoredChunk(place: chunks[i].place(number: firstNumber + UInt64(i), serial: firstSerial + UInt64(i)),
                               stored: buffers[i])
            }
            try storage.writeNew(&new)
            places = new.map(\.place)
        }
        return places
    }

    func withStoredBytes(_ chunks: [Chunk], _ body: ([UnsafeRawBufferPointer]) throws -> Void) throws {
        let buffers = chunks.map { c -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: c.stored.count, alignment: 16)
            b.copyMemory(from: c.stored.withUnsafeBytes { $0 })
            return b
        }
        defer { buffers.forEach { $0.deallocate() } }
        try body(buffers.map { UnsafeRawBufferPointer($0) })
    }

    func readStored(_ storage: any ChunkStorage, _ place: StoredChunkPlace) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: place.storedBytes)
        try bytes.withUnsafeMutableBytes { try storage.readStored(place, into: $0) }
        return bytes
    }

    /// Two families of one DOMAIN, written from two hosts, keep each shared content in one object
    /// holding one reference of each family; B reads what A stored; another DOMAIN never shares;
    /// the last family's release removes the objects.
    @Test func twoFamiliesOnTwoHostsShareChunkObjects() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "seam")
        let poolB = try hostB.openPool("vbd", namespace: poolA.namespace)
        let familyA = try RadosChunkStorage(pool: poolA, domain: "d1", family: "famA", seedForGroup: Self.seed)
        let familyB = try RadosChunkStorage(pool: poolB, domain: "d1", family: "famB", seedForGroup: Self.seed)
        let compressible = (0..<4096).map { UInt8(truncatingIfNeeded: ($0 / 64) &* 7) }
        // Enough chunks that the writes run in parallel (16 in flight) and share and create race.
        var chunks = [try Chunk(raw: compressible, compress: true, group: 1), try Chunk(raw: pattern(seed: 11), compress: false, group: 2)]
        for s in 0..<30 { chunks.append(try Chunk(raw: pattern(seed: 100 + UInt64(s)), compress: false, group: 1)) }

        let placesA = try write(familyA, chunks, firstNumber: 1, firstSerial: 1)
        let placesB = try write(familyB, chunks, firstNumber: 40, firstSerial: 900)
        for (i, (a, b)) in zip(placesA, placesB).enumerated() {
            #expect(RadosChunkStorage.collisionIndex(of: a.place) == 0 && RadosChunkStorage.serial(of: a.place) == 1 + UInt64(i))
            #expect(RadosChunkStorage.serial(of: b.place) == 900 + UInt64(i))
            let name = familyA.objectName(of: a)
            #expect(name == familyB.objectName(of: b))
            #expect(Set(try familyA.objects(group: a.group.rawValue).referenceTags(name))
                    == [familyA.reference(of: a).tag, familyB.reference(of: b).tag])
            // Host B reads A's chunk through its own record's place: the stored bytes, as A stored them.
            #expect(try readStored(familyB, b) == chunks[i].stored)
        }
        #expect(try poolA.objectNames().count == chunks.count)
        var raw = [UInt8](repeating: 0, count: 4096)
        let stored = try readStored(familyB, placesB[0])
        #expect(raw.withUnsafeMutableBytes { out in stored.withUnsafeBytes { BlockCompression.decompress($0, into: out) } })
        #expect(raw == compressible)

        // Another DOMAIN with the same seeds and bytes: its own objects.
        let otherDomain = try RadosChunkStorage(pool: poolB, domain: "d2", family: "famB", seedForGroup: Self.seed)
        let placesOther = try write(otherDomain, [chunks[1]], firstNumber: 1, firstSerial: 1)
        #expect(otherDomain.objectName(of: placesOther[0]) != familyB.objectName(of: placesB[1]))
        #expect(try poolA.objectNames().count == chunks.count + 1)

        // A drops its references: every object stays for B; B's drop removes them.
        try familyA.release(placesA)
        for (i, b) in placesB.enumerated() { #expect(try readStored(familyB, b) == chunks[i].stored) }
        try familyA.release(placesA)  // idempotent
        #expect(try poolA.objectNames().count == chunks.count + 1)
        try familyB.release(placesB)
        #expect(try poolA.objectNames().map(\.self) == [otherDomain.objectName(of: placesOther[0]).objectName])
        #expect(throws: StorageError.self) { try readStored(familyB, placesB[1]) }
    }

    /// A release of many chunks (a flush frees one per overwritten block) sends its puts
    /// concurrently, never more than `releasesInFlightMax` at once, and drops every reference:
    /// objects only this family held are gone, objects another family shares keep exactly that
    /// family's reference, and releasing again (a crash repeats releases) changes nothing.
    @Test func releaseSendsItsPutsConcurrentlyAndDropsEveryReference() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "release")
        let poolB = try hostB.openPool("vbd", namespace: poolA.namespace)
        let familyA = try RadosChunkStorage(pool: poolA, domain: "d1", family: "famA", seedForGroup: Self.seed, releasesInFlightMax: 8)
        let familyB = try RadosChunkStorage(pool: poolB, domain: "d1", family: "famB", seedForGroup: Self.seed)
        let chunks = try (0..<200).map { try Chunk(raw: pattern(seed: 30_000 + UInt64($0)), compress: false, group: 1) }
        let placesA = try write(familyA, chunks, firstNumber: 1, firstSerial: 1)
        let placesB = try write(familyB, Array(chunks[0..<50]), firstNumber: 1, firstSerial: 1)
        #expect(try poolA.objectNames().count == 200)

        try familyA.release(placesA + placesA[0..<10])
        #expect(familyA.lastReleasePeakInFlight > 1, "the puts went one after the other")
        #expect(familyA.lastReleasePeakInFlight <= 8)
        let left = try poolA.objectNames()
        #expect(Set(left) == Set(placesB.map { familyB.objectName(of: $0).objectName }))
        for b in placesB {
            #expect(try familyB.objects(group: 1).referenceTags(familyB.objectName(of: b)) == [familyB.reference(of: b).tag])
        }
        try familyA.release(placesA)
        #expect(try poolA.objectNames().count == 50)
        try familyB.release(placesB)
        #expect(try poolA.objectNames().isEmpty)
    }

    /// A chunk whose plain name holds other bytes goes under the next collision name, and the place
    /// given back names it, so a read through the place gets the right object. A batch in which
    /// one chunk cannot be stored fails whole and leaves none of its references behind.
    @Test func collisionIndexComesBackAndAFailedBatchLeavesNoReference() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "seamfail")
        let storage = try RadosChunkStorage(pool: pool, domain: "d1", family: "fam", seedForGroup: Self.seed)
        let plain = try Chunk(raw: pattern(seed: 21), compress: false, group: 3)
        let collided = try Chunk(raw: pattern(seed: 22), compress: false, group: 3)
        let doomed = try Chunk(raw: pattern(seed: 23), compress: false, group: 3)
        let objects = storage.objects(group: 3)
        func plant(_ chunk: Chunk, at index: Int) throws {
            var other = chunk.raw
            other[17] ^= 0x40
            let bytes = other.withUnsafeBytes { RadosChunkObjects.objectBytes(form: .raw, rawLength: other.count, stored: $0) }
            let name = ChunkObjectName(group: storage.radosGroup(3), hash: chunk.hash, collisionIndex: index).objectName
            try pool.writeFull(name, bytes)
            try pool.setAttribute(name, RadosChunkObjects.lengthAttribute, Array(String(bytes.count).utf8))
        }
        try plant(collided, at: 0)
        // Every name `doomed` could take holds other bytes: it cannot be stored.
        for index in 0...RadosChunkObjects.collisionNamesMax { try plant(doomed, at: index) }
        let planted = Set(try pool.objectNames())

        #expect(throws: StorageError.self) { _ = try write(storage, [plain, collided, doomed], firstNumber: 1, firstSerial: 1) }
        // The two chunks that were stored had their references dropped again: their objects are gone.
        #expect(Set(try pool.objectNames()) == planted)

        let places = try write(storage, [plain, collided], firstNumber: 1, firstSerial: 10)
        #expect(RadosChunkStorage.collisionIndex(of: places[0].place) == 0)
        #expect(RadosChunkStorage.collisionIndex(of: places[1].place) == 1)
        #expect(RadosChunkStorage.serial(of: places[1].place) == 11)
        #expect(try readStored(storage, places[1]) == collided.raw)
        #expect(try objects.referenceTags(storage.objectName(of: places[1])) == [storage.reference(of: places[1]).tag])
    }

    /// A read names the object by the record and checks the object's header against the record:
    /// another form, raw length or stored length, or a missing object, is an error, never bytes.
    @Test func readStoredRefusesWhatTheRecordDoesNotName() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "seamread")
        let storage = try RadosChunkStorage(pool: pool, domain: "d1", family: "fam", seedForGroup: Self.seed)
        let compressible = (0..<4096).map { UInt8(truncatingIfNeeded: ($0 / 64) &* 3) }
        let chunk = try Chunk(raw: compressible, compress: true, group: 1)
        let place = try write(storage, [chunk], firstNumber: 1, firstSerial: 1)[0]
        #expect(try readStored(storage, place) == chunk.stored)

        var rawForm = place
        rawForm.isCompressed = false
        var otherRawLength = place
        otherRawLength.rawBytes = 8192
        var shorter = place
        shorter.storedBytes -= 1
        var longer = place
        longer.storedBytes += 1
        var otherObject = place
        otherObject.place = RadosChunkStorage.place(serial: 1, collisionIndex: 1)
        for wrong in [rawForm, otherRawLength, shorter, longer, otherObject] {
            #expect(throws: StorageError.self) { _ = try readStored(storage, wrong) }
        }
        // A damaged header byte.
        let name = storage.objectName(of: place).objectName
        var object = try pool.readAll(name)
        object[1] ^= 0xFF
        try pool.writeFull(name, object)
        #expect(throws: StorageError.self) { _ = try readStored(storage, place) }
    }

    /// The owner's sweep keeps exactly the references its records claim (number, serial and
    /// object), releases the rest in every group of the domain, and leaves another family's alone.
    @Test func sweepKeepsWhatTheFamilysRecordsClaim() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let directoryA = RadosDirectory(pool: try cluster.freshPool(hostA, prefix: "famA"))
        try directoryA.lockExclusive()
        defer { directoryA.unlock() }
        let chunkNamespace = try cluster.freshPool(hostA, prefix: "chunks").namespace
        let familyA = try RadosChunkStorage(pool: try hostA.openPool("vbd", namespace: chunkNamespace), domain: "d1",
                                            family: directoryA.pool.namespace, seedForGroup: Self.seed)
        let familyB = try RadosChunkStorage(pool: try hostB.openPool("vbd", namespace: chunkNamespace), domain: "d1",
                                            family: "famB", seedForGroup: Self.seed)
        let chunks = try (0..<5).map { try Chunk(raw: pattern(seed: 300 + UInt64($0)), compress: false, group: $0 == 3 ? 2 : 1) }
        let placesA = try write(familyA, chunks, firstNumber: 1, firstSerial: 1)
        let placeB = try write(familyB, [chunks[1]], firstNumber: 7, firstSerial: 50)[0]

        // A's records: chunks 0 and 2 as written; chunk 3's number with another serial (its tag is
        // an older use of the number); chunk 4 under another collision index (another object);
        // chunk 1 not at all (its record never became durable).
        var reused = placesA[3]
        reused.place = RadosChunkStorage.place(serial: 99, collisionIndex: 0)
        var otherObject = placesA[4]
        otherObject.place = RadosChunkStorage.place(serial: RadosChunkStorage.serial(of: otherObject.place), collisionIndex: 1)
        let released = try familyA.sweep(owner: directoryA, claimed: [placesA[0], placesA[2], reused, otherObject])
        #expect(Set(released.map(\.1)) == Set([1, 3, 4].map { familyA.reference(of: placesA[$0]) }))
        for i in [0, 2] {
            #expect(try familyA.objects(group: 1).referenceTags(familyA.objectName(of: placesA[i])) == [familyA.reference(of: placesA[i]).tag])
        }
        // Chunk 1's object stays for B; the objects of chunks 3 (group 2) and 4 went with A's last reference.
        #expect(try familyB.objects(group: 1).referenceTags(familyB.objectName(of: placeB)) == [familyB.reference(of: placeB).tag])
        let left = Set(try familyA.pool.objectNames())
        #expect(left == Set([placesA[0], placesA[1], placesA[2]].map { familyA.objectName(of: $0).objectName }))
        // A second sweep finds nothing; another family's directory is refused.
        #expect(try familyA.sweep(owner: directoryA, claimed: [placesA[0], placesA[2]]).isEmpty)
        #expect(throws: RadosChunkError.self) { try familyB.sweep(owner: directoryA, claimed: []) }
    }
}
