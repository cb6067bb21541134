import Foundation
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

/// A `Store` whose chunks are shared RADOS objects (`RadosStore.open(..., sharingDomain:)` gives
/// it a `RadosChunkStorage`): the chunk data goes to the pool's chunk namespace, the metadata
/// stays in the family's namespace, a freed chunk's reference goes only once the record freeing
/// it is durable, and two families of the domain on two hosts share one object per content.
@Suite(.serialized) struct RadosChunkStoreTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    func options() -> Store.Options { .onMicroCluster }

    func location(_ prefix: String) -> RadosStoreLocation { cluster.location(prefix) }

    func chunkObjects(_ domain: String, _ connection: RadosConnection) throws -> [String: [String]] {
        try cluster.chunkObjects(domain, connection)
    }

    func read(_ store: Store, _ volume: String, block: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: 4096)
        let device = try store.device(named: volume)
        try out.withUnsafeMutableBytes { try device.read(offset: UInt64(block) * 4096, into: $0) }
        return out
    }

    func write(_ store: Store, _ volume: String, block: Int, _ bytes: [UInt8]) throws {
        let device = try store.device(named: volume)
        try bytes.withUnsafeBytes { try device.write(offset: UInt64(block) * 4096, data: $0, fua: false) }
    }

    @Test func chunksAreObjectsReleasedOnceTheirFreeIsDurableAndSharedAcrossHosts() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let familyA = location("fa"), familyB = location("fb")
        let blocks = (0..<24).map { pattern(seed: 7000 + UInt64($0)) }

        // Host A writes 24 distinct blocks and one duplicate: 24 objects, each with one tag of A.
        do {
            let a = try RadosStore.open(familyA, options: options(), create: true, sharingDomain: domain).store
            try a.createVolume(name: "vm", size: 1 << 20, group: "pool")
            for (i, bytes) in blocks.enumerated() { try write(a, "vm", block: i, bytes) }
            try write(a, "vm", block: 40, blocks[3])
            try a.flush()
            var objects = try chunkObjects(domain, hostA)
            #expect(objects.count == 24)
            #expect(objects.values.allSatisfy { $0.count == 1 && $0[0].hasPrefix(familyA.namespace + ":") })
            // The family's namespace holds metadata only: its data file has no stripe.
            let family = try hostA.openPool("vbd", namespace: familyA.namespace)
            let names = try family.objectNames()
            family.close()
            #expect(!names.contains { $0.hasPrefix("stripe.data.") })
            #expect(names.contains("file.superblock") && names.contains(RadosChunkSerials.object))

            // Overwriting block 0 frees its chunk: the object stays until the free is durable.
            try write(a, "vm", block: 0, pattern(seed: 1))
            objects = try chunkObjects(domain, hostA)
            #expect(objects.count == 25)
            try a.flush()
            objects = try chunkObjects(domain, hostA)
            #expect(objects.count == 24, "the flush released the freed chunk's object")
            #expect(a.fsck().isClean)
            try a.close()
        }

        // Host B reopens A's family: every block reads back (verified against its hash).
        do {
            let a = try RadosStore.open(familyA, options: options(), create: false).store
            #expect(try read(a, "vm", block: 0) == pattern(seed: 1))
            for i in 1..<24 { #expect(try read(a, "vm", block: i) == blocks[i]) }
            #expect(try read(a, "vm", block: 40) == blocks[3])
            #expect(a.fsck().isClean)
            try a.close()
        }

        // Family B of the same domain on host B writes the same blocks: no new object, each of
        // A's objects gets B's tag too. Then B deletes its volume: only B's tags go.
        do {
            let b = try RadosStore.open(familyB, options: options(), create: true, sharingDomain: domain).store
            try b.createVolume(name: "other", size: 1 << 20, group: "pool")
            for i in 1..<24 { try write(b, "other", block: i, blocks[i]) }
            try b.flush()
            var objects = try chunkObjects(domain, hostB)
            #expect(objects.count == 24)
            let shared = objects.values.filter { tags in
                tags.count == 2 && tags.contains { $0.hasPrefix(familyA.namespace + ":") } && tags.contains { $0.hasPrefix(familyB.namespace + ":") }
            }
            #expect(shared.count == 23)
            #expect(try read(b, "other", block: 5) == blocks[5])
            try b.delete("other")
            try b.flush()
            objects = try chunkObjects(domain, hostB)
            #expect(objects.count == 24)
            #expect(objects.values.allSatisfy { $0.count == 1 && $0[0].hasPrefix(familyA.namespace + ":") })
            try b.close()
        }
        hostA.close()
        hostB.close()
    }

    /// Where chunks are objects, storing a new one is a round trip to the cluster: the store
    /// refuses to take a small write on the caller's thread (an NBD event loop would then serve
    /// its connection one write at a time) and the write goes the ordinary way; a store whose
    /// chunks are in its data file still takes it at once.
    @Test func smallWritesAreNotTakenOnTheCallersThreadWhenChunksAreObjects() throws {
        for form in RadosChunkForm.allCases {
            let family = RadosTestFamily(cluster, form: form, prefix: "nonblocking")
            let store = try family.open(options(), create: true).store
            try store.createVolume(name: "vm", size: 1 << 20, group: "pool")
            let device = try store.device(named: "vm")
            let bytes = pattern(seed: 4242)
            let taken = try bytes.withUnsafeBytes { try device.writeWithoutBlocking(offset: 8192, data: $0) }
            #expect(taken == (form == .dataFile), "\(form)")
            if !taken { try write(store, "vm", block: 2, bytes) }
            #expect(try read(store, "vm", block: 2) == bytes)
            try store.flush()
            #expect(store.fsck().isClean)
            try store.close()
        }
    }

    /// Host A dies with writes it never flushed: their chunk objects exist (stored in phase E)
    /// but no durable record claims them. Host B takes the family over (fencing A) and its open
    /// sweeps the family's unclaimed references: those objects go, the flushed ones stay and read.
    @Test func aTakeoverReleasesTheReferencesOfWritesTheDeadOwnerNeverFlushed() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let hostB = try cluster.connect()
        let family = location("fk")
        let flushed = (0..<8).map { pattern(seed: 8000 + UInt64($0)) }
        let a = try RadosStore.open(family, options: options(), create: true, sharingDomain: domain).store
        try a.createVolume(name: "vm", size: 1 << 20, group: "pool")
        for (i, bytes) in flushed.enumerated() { try write(a, "vm", block: i, bytes) }
        try a.flush()
        for i in 0..<5 { try write(a, "vm", block: 20 + i, pattern(seed: 8100 + UInt64(i))) }
        #expect(try chunkObjects(domain, hostB).count == 13)

        let (b, fenced) = try RadosStore.open(family, options: options(), create: false,
                                              ownership: .takeOver(waitingUpTo: 0, force: true))
        #expect(!fenced.isEmpty)
        let objects = try chunkObjects(domain, hostB)
        #expect(objects.count == 8, "the unflushed writes' objects were released")
        for (i, bytes) in flushed.enumerated() { #expect(try read(b, "vm", block: i) == bytes) }
        #expect(try read(b, "vm", block: 20) == [UInt8](repeating: 0, count: 4096))
        #expect(b.fsck().isClean)
        try b.close()
        a.abandonWithoutFlush()
        hostB.close()
    }

    /// A crash after an overwrite that was never flushed brings back the old block: its object
    /// must still be there, because a freed chunk's reference goes only after the free is durable.
    @Test func aCrashBeforeTheFreeIsDurableKeepsTheOldChunkReadable() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let family = location("fc")
        let old = pattern(seed: 8400), new = pattern(seed: 8401)
        let a = try RadosStore.open(family, options: options(), create: true, sharingDomain: domain).store
        try a.createVolume(name: "vm", size: 1 << 20, group: "pool")
        try write(a, "vm", block: 0, old)
        try a.flush()
        try write(a, "vm", block: 0, new)
        #expect(try chunkObjects(domain, host).count == 2)
        a.abandonWithoutFlush()   // the overwrite and the free it made were never durable

        let reopened = try RadosStore.open(family, options: options(), create: false).store
        #expect(try read(reopened, "vm", block: 0) == old)
        #expect(reopened.fsck().isClean)
        try reopened.close()
        host.close()
    }

    /// A read through the store verifies the object's bytes against the record's hash: one flipped
    /// byte in an object is an I/O error naming the chunk, never data.
    @Test func aDamagedObjectIsAReadErrorNotData() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let family = location("fd")
        let bytes = pattern(seed: 8300)
        do {
            let store = try RadosStore.open(family, options: options(), create: true, sharingDomain: domain).store
            try store.createVolume(name: "vm", size: 1 << 20, group: "pool")
            try write(store, "vm", block: 2, bytes)
            try store.close()
        }
        let names = Array(try chunkObjects(domain, host).keys)
        #expect(names.count == 1)
        let chunks = try host.openPool("vbd", namespace: RadosChunkStorage.chunkNamespace)
        var damaged = try chunks.readAll(names[0])
        damaged[damaged.count - 1] ^= 0x01   // the last payload byte; the header stays right
        try chunks.writeFull(names[0], damaged)
        chunks.close()
        let store = try RadosStore.open(family, options: options(), create: false).store
        #expect(throws: (any Error).self) { _ = try read(store, "vm", block: 2) }
        #expect(!store.fsck().isClean)
        try store.close()
        host.close()
    }

    /// Serials are never handed out twice, also after a crash: a new process starts above the
    /// reservation the last one recorded.
    @Test func serialsResumeAboveTheReservationAfterACrash() throws {
        let host = try cluster.connect()
        let family = try cluster.freshPool(host, prefix: "serials")
        let first = try RadosChunkSerials(pool: family, batch: 4)
        #expect(try first.take(3) == 1)
        #expect(try first.take(3) == 4)   // 1..<8 reserved by the first take
        #expect(first.reservedBelow == 8)
        #expect(try first.take(2) == 7)   // crosses the bound: 9..<13 reserved
        #expect(first.reservedBelow == 13)
        // A "crash": the next process reads the reservation and starts above it.
        let second = try RadosChunkSerials(pool: family, batch: 4)
        #expect(try second.take(1) == 13)
        family.close()
        host.close()
    }
}
