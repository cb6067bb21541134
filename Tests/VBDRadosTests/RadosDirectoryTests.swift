import Foundation
import Logging
import Synchronization
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

extension StorageFile {
    func write(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try write(b, at: offset) }
    }

    func read(_ count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: count)
        let n = try out.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws -> Int in try read(into: b, at: offset) }
        return Array(out.prefix(n))
    }
}

@Suite(.serialized) struct RadosDirectoryTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    /// Random writes (plain and gathered), truncates and punches over small stripes, checked after every step against
    /// the same steps on an array; then synced, and the file reopened from another client.
    @Test func fileFollowsTheStorageContract() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "contract")
        let stripe: UInt64 = 8192
        let directory = RadosDirectory(pool: pool, stripeBytes: stripe)
        let file = try directory.openFile("data", create: true)
        var model: [UInt8] = []
        var rng = SplitMix64(seed: 11)
        for step in 0..<160 {
            let choice = rng.next() % 10
            if choice < 6 {
                let offset = rng.next() % (6 * stripe)
                let bytes = pattern(seed: rng.next(), count: Int(rng.next() % (2 * stripe)) + 1)
                if choice < 3 {
                    try file.write(bytes, at: offset)
                } else {
                    // A gathered write of random parts (some empty) equals one write of their concatenation.
                    var cuts = (0..<Int(rng.next() % 6)).map { _ in Int(rng.next() % UInt64(bytes.count + 1)) }
                    cuts = ([0] + cuts + [bytes.count]).sorted()
                    try bytes.withUnsafeBytes { all in
                        let parts = zip(cuts, cuts.dropFirst()).map { UnsafeRawBufferPointer(rebasing: all[$0..<$1]) }
                        try file.write(gathering: parts, at: offset)
                    }
                }
                let end = Int(offset) + bytes.count
                if model.count < end { model += [UInt8](repeating: 0, count: end - model.count) }
                model.replaceSubrange(Int(offset)..<end, with: bytes)
            } else if choice < 8 {
                let size = Int(rng.next() % (7 * stripe))
                try file.truncate(to: UInt64(size))
                if size < model.count { model.removeLast(model.count - size) } else { model += [UInt8](repeating: 0, count: size - model.count) }
            } else {
                let offset = Int(rng.next() % (6 * stripe)), length = Int(rng.next() % (3 * stripe)) + 1
                try file.punchHole(offset: UInt64(offset), length: UInt64(length))
                let end = min(offset + length, model.count)
                if offset < end { model.replaceSubrange(offset..<end, with: [UInt8](repeating: 0, count: end - offset)) }
            }
            if step % 7 == 0 { try file.sync() }
            #expect(try file.size() == UInt64(model.count), "step \(step)")
            let at = Int(rng.next() % UInt64(max(model.count, 1)))
            let want = Array(model[min(at, model.count)...].prefix(3 * Int(stripe)))
            #expect(try file.read(3 * Int(stripe), at: UInt64(at)) == want, "step \(step)")
        }
        #expect(try file.read(model.count + 100, at: 0) == model)
        #expect(try file.read(10, at: UInt64(model.count)).isEmpty)
        try file.sync()

        // Another host sees exactly the synced file.
        let other = try cluster.connect()
        let otherDirectory = RadosDirectory(pool: try other.openPool("vbd", namespace: pool.namespace), stripeBytes: stripe)
        let reopened = try otherDirectory.openFile("data", create: false)
        #expect(try reopened.size() == UInt64(model.count))
        #expect(try reopened.read(model.count, at: 0) == model)
        reopened.close()
        file.close()
    }

    @Test func directoryListsCreatesAndRemovesFiles() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "dir")
        let directory = RadosDirectory(pool: pool, stripeBytes: 4096)
        #expect(throws: StorageError.self) { try directory.openFile("journal.1", create: false) }
        let journal = try directory.openFile("journal.1", create: true)
        try journal.write(pattern(seed: 5, count: 10_000), at: 0)
        try journal.sync()
        journal.close()
        _ = try directory.openFile("superblock", create: true)
        try directory.syncDirectory()
        #expect(Set(try directory.fileNames()) == ["journal.1", "superblock"])
        #expect(directory.fileExists("journal.1"))

        try directory.removeFile("journal.1")
        #expect(!directory.fileExists("journal.1"))
        #expect(try directory.fileNames() == ["superblock"])
        // Its stripes went with it: only the other file's head object is left.
        #expect(try pool.objectNames() == ["file.superblock"])
        // A new file of the same name starts empty.
        let fresh = try directory.openFile("journal.1", create: true)
        #expect(try fresh.size() == 0)
        try fresh.truncate(to: 10_000)
        #expect(try fresh.read(10_000, at: 0) == [UInt8](repeating: 0, count: 10_000))
    }

    /// Small writes scattered over a file (a commit's metadata pages: one 4 KiB slot each, all
    /// over the file) go out as one compound operation per stripe object, not one each; reads
    /// see them before they are sent; a larger write, a truncate and the sync send what waits
    /// first, so every object gets its changes in the order they were made; another client sees
    /// exactly the synced file.
    @Test func smallWritesGoOutCombinedPerStripeObject() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "combine")
        let stripe: UInt64 = 64 << 10
        let directory = RadosDirectory(pool: pool, stripeBytes: stripe)
        let file = try #require(try directory.openFile("meta", create: true) as? RadosFile)
        var model = [UInt8](repeating: 0, count: Int(4 * stripe))
        try file.truncate(to: 4 * stripe)
        try file.sync()
        let sentBefore = file.writeOperationsSent
        var rng = SplitMix64(seed: 21)
        // 120 page writes over the 4 stripes, slots written more than once among them.
        for k in 0..<120 {
            let slot = Int(rng.next() % 64)
            let bytes = pattern(seed: 5000 + UInt64(k))
            try file.write(bytes, at: UInt64(slot * 4096))
            model.replaceSubrange(slot * 4096..<(slot + 1) * 4096, with: bytes)
        }
        #expect(file.writeOperationsSent == sentBefore, "nothing sent before something needs it")
        #expect(file.unsentWrites.stripes == 4)
        // A read of one stripe sends that stripe's writes and sees them.
        #expect(try file.read(Int(stripe), at: stripe) == Array(model[Int(stripe)..<Int(2 * stripe)]))
        #expect(file.writeOperationsSent == sentBefore + 1 && file.unsentWrites.stripes == 3)
        // A write of 64 KiB or more goes out at once, after what waits for its stripe.
        let big = pattern(seed: 77, count: Int(stripe))
        try file.write(big, at: 2 * stripe)
        model.replaceSubrange(Int(2 * stripe)..<Int(3 * stripe), with: big)
        #expect(file.writeOperationsSent == sentBefore + 3 && file.unsentWrites.stripes == 2)
        for k in 0..<8 {
            let bytes = pattern(seed: 6000 + UInt64(k))
            try file.write(bytes, at: UInt64(k * 8192 + 100))
            model.replaceSubrange(k * 8192 + 100..<k * 8192 + 4196, with: bytes)
        }
        try file.sync()
        #expect(file.unsentWrites.bytes == 0)
        #expect(file.writeOperationsSent <= sentBefore + 5, "one operation per stripe object, not \(file.writeOperationsSent - sentBefore)")
        #expect(try file.read(model.count, at: 0) == model)
        // A truncate sends the writes waiting first: the stripe ends where the truncate says.
        let tail = pattern(seed: 88)
        try file.write(tail, at: 3 * stripe + 8192)
        try file.truncate(to: 3 * stripe + 10_000)
        model.replaceSubrange(Int(3 * stripe) + 8192..<Int(3 * stripe) + 12288, with: tail)
        model.removeLast(model.count - Int(3 * stripe + 10_000))
        try file.sync()

        let other = try cluster.connect()
        let reopened = try RadosDirectory(pool: try other.openPool("vbd", namespace: pool.namespace), stripeBytes: stripe)
            .openFile("meta", create: false)
        #expect(try reopened.size() == UInt64(model.count))
        #expect(try reopened.read(model.count + 10, at: 0) == model)
        reopened.close()
        file.close()
    }

    /// While the directory holds its exclusive lock the file names come from what it created
    /// and removed, not from a listing (which scans every object of the pool, chunk objects
    /// included, at the OSDs): one listing, then none. Without the lock every call lists, and a
    /// new tenure of the lock lists once again.
    @Test func fileNamesAreKnownWithoutListingWhileTheExclusiveLockIsHeld() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "names")
        let directory = RadosDirectory(pool: pool, stripeBytes: 4096)
        _ = try directory.openFile("superblock", create: true)
        #expect(try directory.fileNames() == ["superblock"])
        #expect(try directory.fileNames() == ["superblock"])
        #expect(directory.listings == 2, "no lock: every call lists")

        try directory.lockExclusive()
        #expect(Set(try directory.fileNames()) == ["superblock"])
        #expect(directory.listings == 3)
        for g in 1...5 { try directory.openFile("journal-\(g)", create: true).close() }
        try directory.removeFile("journal-2")
        try directory.removeFile("journal-4")
        try directory.removeFile("never-was")
        _ = try directory.openFile("superblock", create: true)  // exists already
        let expected: Set<String> = ["superblock", "journal-1", "journal-3", "journal-5"]
        for _ in 0..<4 { #expect(Set(try directory.fileNames()) == expected) }
        #expect(directory.listings == 3, "the names came from the directory's own changes")
        // What the pool holds agrees.
        #expect(Set(try pool.objectNames().filter { $0.hasPrefix("file.") }.map { String($0.dropFirst(5)) }) == expected)

        // Between two tenures of the lock another holder changes the files: the names kept
        // under the first tenure are not trusted under the second (it lists once again).
        directory.unlock()
        let other = RadosDirectory(pool: try cluster.connect().openPool("vbd", namespace: pool.namespace), stripeBytes: 4096)
        try other.lockExclusive()
        try other.removeFile("journal-1")
        other.unlock()
        let left: Set<String> = ["superblock", "journal-3", "journal-5"]
        #expect(Set(try directory.fileNames()) == left)
        #expect(directory.listings == 4)
        try directory.lockExclusive()
        #expect(Set(try directory.fileNames()) == left)
        #expect(directory.listings == 5)
        try directory.openFile("journal-6", create: true).close()
        #expect(Set(try directory.fileNames()) == left.union(["journal-6"]))
        #expect(directory.listings == 5)
        directory.unlock()
    }

    /// Writes that were never synced may land in the stripes while the durable size stays short;
    /// when the file is reopened and grows again, the range they covered reads as zeroes.
    @Test func unsyncedBytesPastTheDurableSizeDoNotReappear() throws {
        let connection = try cluster.connect()
        let pool = try cluster.freshPool(connection, prefix: "stale")
        let directory = RadosDirectory(pool: pool, stripeBytes: 4096)
        let file = try directory.openFile("journal", create: true)
        try file.write(pattern(seed: 6, count: 1000), at: 0)
        try file.sync()
        try file.write(pattern(seed: 7, count: 20_000), at: 1000)  // never synced
        file.close()  // the writes complete; the size stays 1000 (a crash before the sync)

        let reopened = try directory.openFile("journal", create: false)
        #expect(try reopened.size() == 1000)
        try reopened.write([1, 2, 3], at: 30_000)
        var want = pattern(seed: 6, count: 1000) + [UInt8](repeating: 0, count: 29_000)
        want += [1, 2, 3]
        #expect(try reopened.read(30_003, at: 0) == want)
    }

    /// One writer at a time: a second client is refused, readers too, until the writer unlocks.
    @Test func exclusiveLockRefusesOthers() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "lock")
        let a = RadosDirectory(pool: poolA)
        let b = RadosDirectory(pool: try hostB.openPool("vbd", namespace: poolA.namespace))
        try a.lockExclusive()
        let refusal = #expect(throws: StorageError.self) { try b.lockExclusive() }
        guard case .locked(let message) = refusal else { Issue.record("not .locked: \(String(describing: refusal))"); return }
        // The holder is the lock's own client instance, not the one writing A's data.
        let lockClient = try #require(a.lockKeeper).lock.pool.connection
        #expect(message.contains("client.\(try lockClient.instanceID())"), "\(message)")
        #expect(try lockClient.instanceID() != hostA.instanceID())
        #expect(throws: StorageError.self) { try b.lockShared() }
        a.unlock()
        try b.lockShared()
        #expect(throws: StorageError.self) { try a.lockExclusive() }
        b.unlock()
        try a.lockExclusive()
        a.unlock()
    }

    /// An orderly handover (A commits and unlocks, B takes over) fences nobody: A's client goes on
    /// working, e.g. for the other volumes it serves.
    @Test func cleanHandoverFencesNobody() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "handover")
        let a = RadosDirectory(pool: poolA, stripeBytes: 4096, lockDurationSeconds: 3)
        let b = RadosDirectory(pool: try hostB.openPool("vbd", namespace: poolA.namespace), stripeBytes: 4096, lockDurationSeconds: 3)
        try a.lockExclusive()
        let file = try a.openFile("journal", create: true)
        try file.write([1, 2, 3], at: 0)
        try file.sync()
        file.close()
        a.unlock()
        #expect(try b.takeOver(waitingUpTo: 5) == [])
        try poolA.writeFull("a-still-works", [4])
        #expect(try b.openFile("journal", create: false).read(3, at: 0) == [1, 2, 3])
        b.unlock()
    }

    /// The handover `vbdtool serve --take-over` does: B starts waiting while A still owns the
    /// store, then A unlocks cleanly. B must not fence A, although it saw A holding the lock.
    @Test func handoverWhileTheTakerWaitsFencesNobody() throws {
        let hostA = try cluster.connect(), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "waiting")
        // Long enough that only A's release, never its expiry, can let B in.
        let a = RadosDirectory(pool: poolA, stripeBytes: 4096, lockDurationSeconds: 60)
        let b = RadosDirectory(pool: try hostB.openPool("vbd", namespace: poolA.namespace), stripeBytes: 4096, lockDurationSeconds: 60)
        try a.lockExclusive()
        let seenHolders = Mutex<[RadosLockHolder]>([])
        let waiting = DispatchSemaphore(value: 0), done = DispatchSemaphore(value: 0)
        let outcome = Mutex<Result<[String], StorageError>?>(nil)
        DispatchQueue.global().async {
            let result = Result { () throws(StorageError) in
                try b.takeOver(waitingUpTo: 30) { holders in
                    seenHolders.withLock { $0 = holders }
                    waiting.signal()
                }
            }
            outcome.withLock { $0 = result }
            done.signal()
        }
        try #require(waiting.wait(timeout: .now() + 30) == .success, "B never found the lock taken")
        #expect(seenHolders.withLock { $0.count } == 1)
        a.unlock()
        try #require(done.wait(timeout: .now() + 40) == .success, "B's takeover did not return")
        #expect(try outcome.withLock { $0 }!.get() == [])
        try poolA.writeFull("a-still-works", [4])   // A's client was not blocklisted
        b.unlock()
    }

    /// A server that stops renewing (hung, cut off) loses its volume: after the lock expires the
    /// other server takes it over and blocklists the old one, whose writes then fail in the OSD;
    /// the old server's own directory refuses to commit.
    @Test func takeoverAfterExpiryFencesTheOldOwner() throws {
        let hostA = try cluster.connect(timeoutSeconds: 10), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "fence")
        let poolB = try hostB.openPool("vbd", namespace: poolA.namespace)
        let a = RadosDirectory(pool: poolA, stripeBytes: 4096, lockDurationSeconds: 3)
        let b = RadosDirectory(pool: poolB, stripeBytes: 4096, lockDurationSeconds: 3)
        try a.lockExclusive()
        let fileA = try a.openFile("journal", create: true)
        try fileA.write(pattern(seed: 8, count: 100), at: 0)
        try fileA.sync()
        try poolA.writeFull("probe", [1])  // the old owner can write before the takeover

        // A live owner keeps its volume: B gives up after waiting longer than the lock lasts
        // without renewal, so A's background renewals are what kept it.
        #expect(throws: StorageError.self) { try b.takeOver(waitingUpTo: 4) }
        #expect(a.lockLostReason == nil)

        // The holder record names both of A's client instances: the data's and the lock's own.
        let lockA = a.lockKeeper!.lock
        let recorded = RadosLock.addresses(inRecord: try poolB.attribute(RadosDirectory.lockObject, RadosLock.holderAttribute) ?? [])
        #expect(recorded.count == 2)
        #expect(recorded.contains { RadosLock.sameClient($0, (try? hostA.clientAddress()) ?? "") })
        #expect(recorded.contains { RadosLock.sameClient($0, (try? lockA.pool.connection.clientAddress()) ?? "") })

        a.lockKeeper!.stop()  // A hangs: no more renewals
        let fenced = try b.takeOver(waitingUpTo: 15)
        #expect(fenced.count == 2)
        #expect(fenced.contains { RadosLock.sameClient($0, (try? hostA.clientAddress()) ?? "") })
        #expect(fenced.contains { RadosLock.sameClient($0, (try? lockA.pool.connection.clientAddress()) ?? "") })
        // A's lock client is fenced too: its renewal is refused by the OSD, which already has the
        // blocklist entry (B's takeover took the lock on that object with the new map).
        let renewalRefused = #expect(throws: RadosError.self) { try lockA.renew() }
        #expect(renewalRefused?.code == RadosError.blocklisted)

        // The OSD refuses A's writes (EBLOCKLISTED = ESHUTDOWN), not only A's own bookkeeping. B's
        // operation on the object first carries the new map's epoch to its placement group.
        #expect(try poolB.readAll("probe") == [1])
        let refused = #expect(throws: RadosError.self) { try poolA.writeFull("probe", [2]) }
        #expect(refused?.code == RadosError.blocklisted)
        #expect(try poolB.readAll("probe") == [1])
        #expect(throws: StorageError.self) { try fileA.write([9], at: 0) }
        #expect(a.lockLostReason != nil)

        // B owns the volume and sees A's synced bytes.
        let fileB = try b.openFile("journal", create: false)
        #expect(try fileB.read(100, at: 0) == pattern(seed: 8, count: 100))
        try fileB.write([7], at: 100)
        try fileB.sync()
        b.unlock()
    }

    /// An owner whose lock was broken learns it at its next renewal and stops committing.
    @Test func brokenLockIsReportedAndStopsCommits() throws {
        let hostA = try cluster.connect(timeoutSeconds: 10), hostB = try cluster.connect()
        let poolA = try cluster.freshPool(hostA, prefix: "broken")
        let a = RadosDirectory(pool: poolA, stripeBytes: 4096, lockDurationSeconds: 30)
        let b = RadosDirectory(pool: try hostB.openPool("vbd", namespace: poolA.namespace), stripeBytes: 4096, lockDurationSeconds: 30)
        try a.lockExclusive()
        let fileA = try a.openFile("meta", create: true)
        try fileA.write([1, 2, 3], at: 0)
        try fileA.sync()

        // The operator declares A dead: B breaks the lock at once (fencing A first: both its clients).
        let lockClientA = try #require(a.lockKeeper).lock.pool.connection
        let fenced = try b.takeOver(waitingUpTo: 5, force: true)
        #expect(fenced.count == 2)
        #expect(fenced.contains { RadosLock.sameClient($0, (try? hostA.clientAddress()) ?? "") })
        #expect(fenced.contains { RadosLock.sameClient($0, (try? lockClientA.clientAddress()) ?? "") })
        #expect(a.lockLostReason == nil)  // A has not noticed yet
        a.lockKeeper!.renewNow()
        #expect(a.lockLostReason != nil)
        let refusal = #expect(throws: StorageError.self) { try fileA.sync() }
        if case .locked = refusal {} else { Issue.record("sync after losing the lock: \(String(describing: refusal))") }
        #expect(throws: StorageError.self) { try a.openFile("other", create: true) }
        b.unlock()
    }

    /// A busy owner keeps its lock. On a cluster whose OSD gets a fortieth of the CPU (a machine
    /// loaded by other work, where the benchmark's server lost its store), four writers keep the
    /// owner's files full of 4 MiB writes from the owner's own client for three lock durations of
    /// 6 s. When the lock was renewed through that client, each renewal queued behind its writes
    /// (librados' in-flight throttle, then its OSD session and its share of the OSD's queue) and
    /// none succeeded for 6 s. Now renewals use the lock's own client instance, each file keeps at
    /// most its byte budget in flight, and every renewal's round trip is traced.
    @Test func busyOwnerKeepsItsLock() throws {
        let starved = try MicroCluster.startPrivate()
        defer { starved.stop() }
        let host = try starved.connect()
        let pool = try starved.freshPool(host, prefix: "busy")
        let events = DispatchSemaphore(value: 0)
        let recorder = LogRecorder { message, metadata in
            if metadata["round-trip"] != nil { events.signal() }  // a renewal succeeded
        }
        let lost = Mutex<String?>(nil)
        let directory = RadosDirectory(pool: pool, lockDurationSeconds: 6, logger: recorder.logger, onLockLost: { reason in
            lost.withLock { $0 = reason }
            events.signal()
        })
        try directory.lockExclusive()
        let stripe = Int(directory.stripeBytes)

        let stopWriting = Atomic<Bool>(false)
        let writes = Atomic<Int>(0)
        let mostInFlight = Atomic<Int>(0)
        let writeFailure = Mutex<String?>(nil)
        let writers = DispatchGroup()
        for writer in 0..<4 {
            DispatchQueue.global().async(group: writers) {
                do {
                    let file = try directory.openFile("data.\(writer)", create: true)
                    defer { file.close() }
                    let budget = (file as! RadosFile).budget
                    let bytes = pattern(seed: UInt64(writer), count: stripe)
                    var index: UInt64 = 0
                    while !stopWriting.load(ordering: .relaxed) {
                        // Over 8 stripes again and again: the memstore OSD keeps the bytes in RAM.
                        try file.write(bytes, at: (index % 8) * UInt64(stripe))
                        index += 1
                        writes.add(1, ordering: .relaxed)
                        mostInFlight.max(budget.inFlight)
                    }
                } catch {
                    writeFailure.withLock { $0 = "\(error)" }
                }
            }
        }
        let starving = try starved.starveOSD(runMilliseconds: 5)
        let writesBefore = writes.load(ordering: .relaxed)
        // Nine renewals (one every 2 s) are three durations. The bound only turns a missing event
        // into a failure: without a renewal for a whole duration the lock is lost, which also wakes us.
        var renewals = 0
        while renewals < 9 && lost.withLock({ $0 }) == nil && events.wait(timeout: .now() + 12) == .success {
            if lost.withLock({ $0 }) == nil { renewals += 1 }
        }
        let writesWhileStarved = writes.load(ordering: .relaxed) - writesBefore
        starving()
        stopWriting.store(true, ordering: .relaxed)
        writers.wait()

        #expect(lost.withLock { $0 } == nil, "the busy owner lost its lock")
        #expect(directory.lockLostReason == nil)
        #expect(renewals == 9)
        #expect(writeFailure.withLock { $0 } == nil)
        #expect(writesWhileStarved > 0, "the writers made no progress: the data path was not loaded")
        #expect(mostInFlight.load(ordering: .relaxed) <= directory.inFlightBytesMax)
        let traced = recorder.records.filter { $0.metadata["round-trip"] != nil }
        #expect(traced.count >= 9, "every renewal's round trip is logged")
        let statistics = try #require(directory.lockKeeper).renewalStatistics
        print("busy owner: \(statistics.count) renewals, longest round trip \(statistics.longestRoundTrip) s; \(writesWhileStarved) writes of \(stripe >> 20) MiB while the OSD was starved, at most \(mostInFlight.load(ordering: .relaxed) >> 20) MiB in flight per file")
        directory.unlock()
    }

    /// The cluster stops answering while a server owns a volume: the loss is reported when the
    /// lock's time runs out (not when the blocked renewal times out, much later), and from then on
    /// the directory refuses to commit. On a cluster of its own, whose OSD the test kills.
    @Test func unreachableClusterIsReportedWhenTheLockRunsOut() throws {
        let doomed = try MicroCluster.startPrivate()
        defer { doomed.stop() }
        // Operations time out only after twice the lock's duration: the report must come first.
        let connection = try doomed.connect(timeoutSeconds: 4)
        let pool = try doomed.freshPool(connection, prefix: "unreachable")
        let lost = DispatchSemaphore(value: 0)
        let reason = Mutex<String?>(nil)
        let directory = RadosDirectory(pool: pool, stripeBytes: 4096, lockDurationSeconds: 2, onLockLost: { why in
            reason.withLock { $0 = why }
            lost.signal()
        })
        try directory.lockExclusive()
        let file = try directory.openFile("journal", create: true)
        try file.write([1], at: 0)
        try file.sync()

        try doomed.killOSD()
        // The bound only turns a missing report into a failure; the report itself is the event.
        #expect(lost.wait(timeout: .now() + 30) == .success)
        #expect(reason.withLock { $0 }?.contains("no renewal") == true)
        let refusal = #expect(throws: StorageError.self) { try file.write([2], at: 1) }
        if case .locked = refusal {} else { Issue.record("write after the loss: \(String(describing: refusal))") }
        directory.unlock()
    }
}

/// A logger whose records are kept (and shown to `observe` as they come), for tests of what is logged.
final class LogRecorder: Sendable {
    struct Record: Sendable {
        var level: Logger.Level
        var message: String
        var metadata: Logger.Metadata
    }
    private let stored = Mutex<[Record]>([])
    private let observe: @Sendable (String, Logger.Metadata) -> Void

    init(observe: @escaping @Sendable (String, Logger.Metadata) -> Void = { _, _ in }) {
        self.observe = observe
    }

    var records: [Record] { stored.withLock { $0 } }

    var logger: Logger {
        Logger(label: "vbd.test") { _ in Handler(recorder: self) }
    }

    fileprivate func add(_ record: Record) {
        stored.withLock { $0.append(record) }
        observe(record.message, record.metadata)
    }

    private struct Handler: LogHandler {
        let recorder: LogRecorder
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .trace

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(level: Logger.Level, message: Logger.Message, metadata: Logger.Metadata?, source: String,
                 file: String, function: String, line: UInt) {
            recorder.add(Record(level: level, message: "\(message)", metadata: self.metadata.merging(metadata ?? [:]) { $1 }))
        }
    }
}

extension Atomic where Value == Int {
    /// Raises the value to `candidate` if it is larger.
    func max(_ candidate: Int) {
        var current = load(ordering: .relaxed)
        while candidate > current {
            let (exchanged, original) = compareExchange(expected: current, desired: candidate, ordering: .relaxed)
            if exchanged { return }
            current = original
        }
    }
}
