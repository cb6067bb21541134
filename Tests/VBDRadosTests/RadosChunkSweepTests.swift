import Dispatch
import Foundation
import Synchronization
import Testing
import VBDCore
@testable import VBDStore
@testable import VBDRados

/// The leak sweep outside a takeover (docs/RADOS.md, "The sweep in gc"): `gc` of a store whose
/// chunks are shared objects releases the references no record of its family claims, while its
/// writes go on, and `releaseDeletedFamily` those of a family deleted as a whole.
@Suite(.serialized) struct RadosChunkSweepTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    func location(_ prefix: String) -> RadosStoreLocation { cluster.location(prefix) }

    func chunkObjects(_ domain: String, _ connection: RadosConnection) throws -> [String: [String]] {
        try cluster.chunkObjects(domain, connection, skippingVanished: true)
    }

    func write(_ store: Store, _ volume: String, block: Int, _ bytes: [UInt8]) throws {
        let device = try store.device(named: volume)
        try bytes.withUnsafeBytes { try device.write(offset: UInt64(block) * 4096, data: $0, fua: false) }
    }

    /// Every installed chunk's object exists and holds the family's reference for it.
    func expectEveryChunkReferenced(_ store: Store, family: String, domain: String, _ connection: RadosConnection) throws {
        let objects = try chunkObjects(domain, connection)
        for place in try store.installedChunkPlaces() {
            let name = ChunkObjectName(group: "\(domain)-\(place.group.rawValue)", hash: place.hash,
                                       collisionIndex: RadosChunkStorage.collisionIndex(of: place.place)).objectName
            let tag = try ChunkReference(family: family, chunk: place.number, generation: RadosChunkStorage.serial(of: place.place)).tag
            #expect(objects[name]?.contains(tag) == true, "chunk \(place.number): \(name) lacks \(tag)")
        }
    }

    /// A crash (the store abandoned without a flush, then opened again by the same host: no
    /// takeover, so no sweep at the open) leaves the references of writes never flushed; `gc`
    /// releases them, reports them, and keeps every chunk the records name.
    @Test func gcReleasesTheReferencesOfWritesACrashLeftUnrecorded() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let family = location("gl")
        let flushed = (0..<8).map { pattern(seed: 9000 + UInt64($0)) }
        let a = try RadosStore.open(family, options: .onMicroCluster, create: true, sharingDomain: domain).store
        try a.createVolume(name: "vm", size: 1 << 20, group: "pool")
        for (i, bytes) in flushed.enumerated() { try write(a, "vm", block: i, bytes) }
        try a.flush()
        for i in 0..<5 { try write(a, "vm", block: 20 + i, pattern(seed: 9100 + UInt64(i))) }
        a.abandonWithoutFlush()

        let (b, fenced) = try RadosStore.open(family, options: .onMicroCluster, create: false)
        #expect(fenced.isEmpty, "the lock was released: no takeover, so the open swept nothing")
        #expect(try chunkObjects(domain, host).count == 13)
        let collected = try b.collectGarbage()
        #expect(collected.unclaimedChunks.swept)
        #expect(collected.unclaimedChunks.references == 5)
        #expect(collected.unclaimedChunks.objectsRemoved == 5)
        #expect(collected.unclaimedChunks.bytesRemoved >= 5 * 4096)
        #expect(try chunkObjects(domain, host).count == 8)
        for (i, bytes) in flushed.enumerated() { #expect(try b.readBlock("vm", i) == bytes) }
        #expect(b.fsck().isClean)
        try expectEveryChunkReferenced(b, family: family.namespace, domain: domain, host)
        // A second gc finds nothing more.
        #expect(try b.collectGarbage().unclaimedChunks.references == 0)
        try b.close()
        host.close()
    }

    /// A write stopped between its chunk stored (phase E) and its record installed (phase F) while
    /// `gc` sweeps: its reference is claimed by nothing durable yet, and must survive the sweep.
    @Test func gcSparesTheChunkOfAWriteBetweenStoringAndRecording() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let family = location("gp")
        let (directory, _) = try RadosStore.openDirectory(family, ownership: .acquire, readOnly: false)
        let secret = try RadosStore.domainSecret(domain, beside: directory.pool)
        var options = Store.Options.onMicroCluster
        options.secretForNewStore = secret
        let chunks = try RadosStore.chunkStorage(domain: domain, secret: secret, family: directory)
        let pausing = PausingChunkStorage(chunks)
        options.chunkStorage = pausing
        let store = try Store(directory: directory, options: options, create: true)
        // As RadosStore.open(create: true, sharingDomain:) records it, so that a later open finds the domain.
        try directory.pool.writeFull(RadosStore.sharingDomainObject, Array(domain.utf8))
        try store.createVolume(name: "vm", size: 1 << 20, group: "pool")
        try write(store, "vm", block: 0, pattern(seed: 9200))
        try store.flush()

        let bytes = pattern(seed: 9201)
        pausing.pauseNextWrite()
        let writer = DispatchGroup()
        let failure = Shared<(any Error)?>(nil)
        DispatchQueue.global().async(group: writer) {
            do { try write(store, "vm", block: 1, bytes) } catch { failure.withLock { $0 = error } }
        }
        pausing.waitUntilPaused()
        #expect(try chunkObjects(domain, host).count == 2, "the paused write stored its chunk")
        let collected = try store.collectGarbage()
        pausing.resume()
        writer.wait()
        #expect(failure.withLock { $0 } == nil)
        #expect(collected.unclaimedChunks.references == 0)
        #expect(try chunkObjects(domain, host).count == 2)
        try store.flush()
        try expectEveryChunkReferenced(store, family: family.namespace, domain: domain, host)
        #expect(store.fsck().isClean)
        try store.close()

        let reopened = try RadosStore.open(family, options: .onMicroCluster, create: false).store
        #expect(try reopened.readBlock("vm", 1) == bytes)
        #expect(reopened.fsck().isClean)
        try reopened.close()
        host.close()
    }

    /// A reference taken after the sweep read its claims (a write that reserved its chunk later)
    /// is spared by its serial: the steps of `releaseUnclaimed` run one by one, a whole write
    /// between the claims and the listing.
    @Test func theSweepSparesReferencesTakenAfterItReadItsClaims() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let family = location("gs")
        let store = try RadosStore.open(family, options: .onMicroCluster, create: true, sharingDomain: domain).store
        try store.createVolume(name: "vm", size: 1 << 20, group: "pool")
        try write(store, "vm", block: 0, pattern(seed: 9300))
        try store.flush()
        let chunks = try #require(store.chunkStorage as? RadosChunkStorage)
        let owner = try #require(chunks.owner)

        let serialsFrom = try #require(chunks.serials).nextUnused
        let claims = try store.chunkClaimsForSweep()
        let later = pattern(seed: 9301)
        try write(store, "vm", block: 1, later)
        try store.flush()
        let released = try chunks.sweep(owner: owner, claimed: claims.installed, hashesInFlight: claims.hashesInFlight,
                                        serialsFrom: serialsFrom)
        #expect(released.isEmpty)
        try expectEveryChunkReferenced(store, family: family.namespace, domain: domain, host)
        try store.close()
        let reopened = try RadosStore.open(family, options: .onMicroCluster, create: false).store
        #expect(try reopened.readBlock("vm", 1) == later)
        #expect(reopened.fsck().isClean)
        try reopened.close()
        host.close()
    }

    /// A chunk freed by an overwrite not yet flushed is not installed, but a crash brings it back:
    /// the sweep (gc's last step, run here alone, without gc's own flush before it) makes the
    /// frees it judges durable before it releases anything, so after a crash right after it the
    /// overwrite is durable and every block reads.
    @Test func theSweepMakesTheFreesItJudgesDurableFirst() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let family = location("gf")
        let store = try RadosStore.open(family, options: .onMicroCluster, create: true, sharingDomain: domain).store
        try store.createVolume(name: "vm", size: 1 << 20, group: "pool")
        let old = pattern(seed: 9350), new = pattern(seed: 9351)
        try write(store, "vm", block: 0, old)
        try store.flush()
        try write(store, "vm", block: 0, new)
        let chunks = try #require(store.chunkStorage as? RadosChunkStorage)
        // The flush inside puts the freed chunk's reference itself; a sweep judging the free
        // before it is durable would release it, and the crash below bring the chunk back.
        #expect(try chunks.releaseUnclaimed(claimedBy: store).swept)
        store.abandonWithoutFlush()
        let reopened = try RadosStore.open(family, options: .onMicroCluster, create: false).store
        #expect(try reopened.readBlock("vm", 0) == new)
        #expect(reopened.fsck().isClean)
        try expectEveryChunkReferenced(reopened, family: family.namespace, domain: domain, host)
        try reopened.close()
        host.close()
    }

    /// Writers overwrite blocks with new, repeated and shared contents while `gc` runs again and
    /// again, after a crash left leaked references: the leaks go, no reference a block needs does
    /// (every block reads back its last write, also after a reopen; fsck verifies every object).
    @Test func gcDuringWritesNeverReleasesAChunkStillNeeded() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let family = location("gw")
        let blocks = 64, writers = 3, writesEach = 150
        do {
            let a = try RadosStore.open(family, options: .onMicroCluster, create: true, sharingDomain: domain).store
            try a.createVolume(name: "vm", size: UInt64(blocks) * 4096, group: "pool")
            for i in 0..<blocks { try write(a, "vm", block: i, pattern(seed: 9400 + UInt64(i))) }
            try a.flush()
            for i in 0..<4 { try write(a, "vm", block: i, pattern(seed: 9500 + UInt64(i))) }
            a.abandonWithoutFlush()
        }
        let store = try RadosStore.open(family, options: .onMicroCluster, create: false).store
        // Block i belongs to writer i % writers; its last content is recorded after each write.
        let last = Shared<[UInt64]>((0..<blocks).map { 9400 + UInt64($0) })
        let running = Shared<Int>(writers)
        let failures = Shared<[String]>([])
        let group = DispatchGroup()
        for w in 0..<writers {
            DispatchQueue.global().async(group: group) {
                defer { running.withLock { $0 -= 1 } }
                var rng = SplitMix64(seed: 77 + UInt64(w))
                for n in 0..<writesEach {
                    let block = w + writers * Int(rng.next() % UInt64(blocks / writers))
                    // New contents mostly; some repeat a small set (dedup inside the family).
                    let seed = rng.next() % 4 == 0 ? 9600 + rng.next() % 8 : 100_000 + UInt64(w) * 10_000 + UInt64(n)
                    do {
                        try write(store, "vm", block: block, pattern(seed: seed))
                        last.withLock { $0[block] = seed }
                        if n % 25 == 24 { try store.flush() }
                    } catch {
                        failures.withLock { $0.append("writer \(w): \(error)") }
                        return
                    }
                }
            }
        }
        var collections = 0, released = 0
        repeat {
            let collected = try store.collectGarbage()
            collections += 1
            released += collected.unclaimedChunks.references
        } while running.withLock({ $0 }) > 0
        group.wait()
        #expect(failures.withLock { $0 }.isEmpty)
        #expect(collections >= 2)
        #expect(released >= 4, "the crash's leaked references went")
        try store.flush()
        let expected = last.withLock { $0 }
        for i in 0..<blocks { #expect(try store.readBlock("vm", i) == pattern(seed: expected[i]), "block \(i)") }
        try expectEveryChunkReferenced(store, family: family.namespace, domain: domain, host)
        #expect(store.fsck().isClean)
        try store.close()
        let reopened = try RadosStore.open(family, options: .onMicroCluster, create: false).store
        for i in 0..<blocks { #expect(try reopened.readBlock("vm", i) == pattern(seed: expected[i]), "block \(i) after reopen") }
        #expect(reopened.fsck().isClean)
        try reopened.close()
        host.close()
    }

    /// A family deleted as a whole (every object of its namespace removed) leaves its references
    /// on the shared objects; nobody's gc judges them. `releaseDeletedFamily` releases them all,
    /// keeping the other family's, and refuses while a store is still in the namespace.
    @Test func aDeletedFamilysReferencesAreReleased() throws {
        let domain = "d" + UUID().uuidString.prefix(8).lowercased()
        let host = try cluster.connect()
        let gone = location("gd"), kept = location("gk")
        let shared = pattern(seed: 9700), own = (0..<3).map { pattern(seed: 9710 + UInt64($0)) }, keptOwn = pattern(seed: 9720)
        let a = try RadosStore.open(gone, options: .onMicroCluster, create: true, sharingDomain: domain).store
        let b = try RadosStore.open(kept, options: .onMicroCluster, create: true, sharingDomain: domain).store
        try a.createVolume(name: "vm", size: 1 << 20, group: "pool")
        try b.createVolume(name: "vm", size: 1 << 20, group: "pool")
        try write(a, "vm", block: 0, shared)
        for (i, bytes) in own.enumerated() { try write(a, "vm", block: 1 + i, bytes) }
        try write(b, "vm", block: 0, shared)
        try write(b, "vm", block: 1, keptOwn)
        try a.close()
        try b.flush()
        #expect(try chunkObjects(domain, host).count == 5)

        // Refused while the store is there.
        do {
            let (directory, _) = try RadosStore.openDirectory(gone, ownership: .acquire, readOnly: false)
            let chunks = try host.openPool("vbd", namespace: RadosChunkStorage.chunkNamespace)
            #expect(throws: RadosChunkError.self) { try RadosChunkStorage.releaseDeletedFamily(directory, chunks: chunks) }
            chunks.close()
            directory.unlock()
        }
        // Delete the family as a whole: every object of its namespace.
        let namespace = try host.openPool("vbd", namespace: gone.namespace)
        for object in try namespace.objectNames() { try namespace.remove(object) }
        namespace.close()
        // The other family's gc leaves the deleted family's tags alone.
        #expect(try b.collectGarbage().unclaimedChunks.references == 0)
        #expect(try chunkObjects(domain, host).count == 5)

        let (directory, _) = try RadosStore.openDirectory(gone, ownership: .acquire, readOnly: false)
        let chunks = try host.openPool("vbd", namespace: RadosChunkStorage.chunkNamespace)
        let released = try RadosChunkStorage.releaseDeletedFamily(directory, chunks: chunks)
        chunks.close()
        directory.unlock()
        #expect(released.references == 4)
        #expect(released.objectsRemoved == 3)
        let left = try chunkObjects(domain, host)
        #expect(left.count == 2)
        #expect(left.values.allSatisfy { tags in tags.allSatisfy { $0.hasPrefix(kept.namespace + ":") } })
        #expect(try b.readBlock("vm", 0) == shared)
        #expect(try b.readBlock("vm", 1) == keptOwn)
        try expectEveryChunkReferenced(b, family: kept.namespace, domain: domain, host)
        #expect(b.fsck().isClean)
        try b.close()
        host.close()
    }
}

/// The store's RADOS chunk storage, able to hold one write after its chunks are stored (phase E
/// done) and before the store installs their records (phase F).
final class PausingChunkStorage: ChunkStorage, Sendable {
    let base: RadosChunkStorage
    private let armed = Atomic<Bool>(false)
    private let paused = DispatchSemaphore(value: 0)
    private let resumed = DispatchSemaphore(value: 0)

    init(_ base: RadosChunkStorage) { self.base = base }

    func pauseNextWrite() { armed.store(true, ordering: .sequentiallyConsistent) }
    func waitUntilPaused() { paused.wait() }
    func resume() { resumed.signal() }

    var placesAreDataFileSectors: Bool { false }
    func writeNew(_ chunks: inout [NewStoredChunk]) throws(StorageError) {
        try base.writeNew(&chunks)
        if armed.exchange(false, ordering: .sequentiallyConsistent) {
            paused.signal()
            resumed.wait()
        }
    }
    func readStored(_ chunk: StoredChunkPlace, into buffer: UnsafeMutableRawBufferPointer) throws(StorageError) {
        try base.readStored(chunk, into: buffer)
    }
    func sync() throws(StorageError) { try base.sync() }
    func release(_ chunks: [StoredChunkPlace]) throws(StorageError) { try base.release(chunks) }
    func releaseUnclaimed(claimedBy store: Store) throws -> UnclaimedChunkRelease {
        try base.releaseUnclaimed(claimedBy: store)
    }
}

/// A value behind a mutex, shared with escaping closures (a class: a `Mutex` cannot be captured).
final class Shared<Value: Sendable>: Sendable {
    private let value: Mutex<Value>
    init(_ value: Value) { self.value = Mutex(value) }
    func withLock<R>(_ body: (inout Value) -> R) -> R { value.withLock { body(&$0) } }
}
