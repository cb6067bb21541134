import Foundation
import Synchronization
import Testing
import VBDCore
import VBDStore
@testable import VBDRados

/// Where a test crashes a store: counts the steps that change something in RADOS (each file
/// write, sync, truncate, punch, removal of the store's directory; each chunk stored or released
/// through its chunk storage) and, from step `crashAt` on, fails that step and every later
/// operation as a dead process would never send them. A crashed store also never unlocks: its
/// lock stays with its client until another one takes it over by force.
final class CrashSwitch: Sendable {
    private struct State {
        var armed = false
        var crashAt: Int?
        var steps: [String] = []
        var crashed = false
    }
    private let state = Mutex(State())

    /// Counts steps from now on, and crashes at the `crashAt`-th (1 is the next one; nil: never).
    func arm(crashAt: Int?) { state.withLock { $0 = State(armed: true, crashAt: crashAt) } }

    func step(_ what: @autoclosure () -> String) throws(StorageError) {
        let crash = state.withLock { s -> Bool in
            if s.crashed { return true }
            guard s.armed else { return false }
            s.steps.append(what())
            if s.steps.count == s.crashAt { s.crashed = true }
            return s.crashed
        }
        if crash { throw .crashed }
    }

    func check() throws(StorageError) {
        if state.withLock({ $0.crashed }) { throw .crashed }
    }

    func crashNow() { state.withLock { $0.crashed = true } }
    var crashed: Bool { state.withLock { $0.crashed } }
    var steps: [String] { state.withLock { $0.steps } }
}

/// A store's directory that a ``CrashSwitch`` can stop.
final class CrashingDirectory: StorageDirectory {
    let base: RadosDirectory
    let crash: CrashSwitch
    init(_ base: RadosDirectory, _ crash: CrashSwitch) {
        self.base = base
        self.crash = crash
    }
    func openFile(_ name: String, create: Bool) throws(StorageError) -> any StorageFile {
        try crash.check()
        return CrashingFile(try base.openFile(name, create: create), name: name, crash: crash)
    }
    func fileExists(_ name: String) -> Bool { base.fileExists(name) }
    func removeFile(_ name: String) throws(StorageError) { try crash.step("remove \(name)"); try base.removeFile(name) }
    func fileNames() throws(StorageError) -> [String] { try crash.check(); return try base.fileNames() }
    func syncDirectory() throws(StorageError) { try crash.step("sync directory"); try base.syncDirectory() }
    func lockExclusive() throws(StorageError) { try base.lockExclusive() }
    func lockShared() throws(StorageError) { try base.lockShared() }
    /// A crashed process releases nothing: its lock is taken from it by force.
    func unlock() { if !crash.crashed { base.unlock() } }
    var path: String { base.path }
    var unsyncedWritesEpoch: String? { base.unsyncedWritesEpoch }
}

final class CrashingFile: StorageFile {
    let base: any StorageFile
    let name: String
    let crash: CrashSwitch
    init(_ base: any StorageFile, name: String, crash: CrashSwitch) {
        self.base = base
        self.name = name
        self.crash = crash
    }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        try crash.check()
        return try base.read(into: buffer, at: offset)
    }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try crash.step("write \(name) at \(offset)")
        try base.write(bytes, at: offset)
    }
    func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError) {
        try crash.step("write \(name) at \(offset)")
        try base.write(gathering: parts, at: offset)
    }
    func sync() throws(StorageError) { try crash.step("sync \(name)"); try base.sync() }
    func size() throws(StorageError) -> UInt64 { try crash.check(); return try base.size() }
    func truncate(to size: UInt64) throws(StorageError) { try crash.step("truncate \(name)"); try base.truncate(to: size) }
    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) {
        try crash.step("punch \(name)")
        try base.punchHole(offset: offset, length: length)
    }
    func close() { base.close() }
}

/// The family's chunk objects, one RADOS operation per step: a batch of new chunks is stored
/// one chunk after the other (each its one compound write: create-exclusive + write + refcount,
/// or the verified share cmpext + refcount.get), and releases one `refcount.put` at a time, so
/// that a crash falls between any two of them.
final class CrashingChunkStorage: ChunkStorage {
    let base: RadosChunkStorage
    let crash: CrashSwitch
    init(_ base: RadosChunkStorage, _ crash: CrashSwitch) {
        self.base = base
        self.crash = crash
    }
    var placesAreDataFileSectors: Bool { false }
    func writeNew(_ chunks: inout [NewStoredChunk]) throws(StorageError) {
        for i in chunks.indices {
            try crash.step("store chunk \(chunks[i].place.number)")
            var one = [chunks[i]]
            try base.writeNew(&one)
            chunks[i] = one[0]
        }
    }
    func readStored(_ chunk: StoredChunkPlace, into buffer: UnsafeMutableRawBufferPointer) throws(StorageError) {
        try crash.check()
        try base.readStored(chunk, into: buffer)
    }
    func sync() throws(StorageError) { try crash.check(); try base.sync() }
    func release(_ chunks: [StoredChunkPlace]) throws(StorageError) {
        for chunk in chunks {
            try crash.step("release chunk \(chunk.number)")
            try base.release([chunk])
        }
    }
}

/// A store on RADOS, in both forms (chunks in its data file; chunks as objects of a sharing
/// domain, each stored or released as a step of its own), crashed after each step of a
/// write / overwrite / duplicate / trim / flush / checkpoint sequence in turn. After each crash
/// another client takes the family over by force (fencing the dead owner; its open replays the
/// journal and runs the leak sweep) and must find: every block that was flushed and not written
/// since reads back, every other block reads its flushed content or one written after that
/// flush, fsck is clean, and the family's references on chunk objects are exactly those its
/// metadata claims (nothing leaked, nothing missing), also after the new owner's next flush.
@Suite(.serialized) struct RadosCrashStepTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    func options() -> Store.Options { .onMicroCluster }

    static let blocks = 8

    /// What each block may hold after a crash: its content at the last flush that returned, or
    /// any content written to it since that flush began.
    struct Model {
        var durable = [UInt64](repeating: 0, count: RadosCrashStepTests.blocks)
        var since = [Set<UInt64>](repeating: [], count: RadosCrashStepTests.blocks)
        var current = [UInt64](repeating: 0, count: RadosCrashStepTests.blocks)

        mutating func willWrite(_ at: Int, _ ids: [UInt64]) {
            for (k, id) in ids.enumerated() { since[at + k].insert(id) }
        }
        mutating func wrote(_ at: Int, _ ids: [UInt64]) { current.replaceSubrange(at..<at + ids.count, with: ids) }
        mutating func flushed() {
            durable = current
            since = [Set<UInt64>](repeating: [], count: RadosCrashStepTests.blocks)
        }
    }

    /// Creates the family (through the crash switch, not yet armed), writes and flushes blocks
    /// 0-3, then arms the switch and runs the sequence until it ends or the store crashes.
    func runSequence(_ family: RadosTestFamily, crashAt: Int?) throws -> (store: Store, crash: CrashSwitch, model: Model) {
        let (directory, _) = try RadosStore.openDirectory(family.location, ownership: .acquire, readOnly: false)
        var options = options()
        let crash = CrashSwitch()
        if family.form == .chunkObjects {
            // As RadosStore.open(create: true, sharingDomain:) wires it, with the crash switch between.
            let secret = try RadosStore.domainSecret(family.domain, beside: directory.pool)
            options.secretForNewStore = secret
            let chunks = try RadosStore.chunkStorage(domain: family.domain, secret: secret, family: directory)
            options.chunkStorage = CrashingChunkStorage(chunks, crash)
        }
        let store = try Store(directory: CrashingDirectory(directory, crash), options: options, create: true)
        if family.form == .chunkObjects {
            try directory.pool.writeFull(RadosStore.sharingDomainObject, Array(family.domain.utf8))
        }
        var model = Model()
        try store.createVolume(name: "vm", size: UInt64(Self.blocks) * 4096, group: "pool")
        let first: [UInt64] = [2000, 2001, 2002, 2003]
        try store.writeBlocks("vm", at: 0, first)
        model.wrote(0, first)
        try store.flush()
        model.flushed()
        crash.arm(crashAt: crashAt)

        func write(_ at: Int, _ ids: [UInt64]) throws {
            model.willWrite(at, ids)
            try store.writeBlocks("vm", at: at, ids)
            model.wrote(at, ids)
        }
        func trim(_ at: Int, _ count: Int) throws {
            model.willWrite(at, [UInt64](repeating: 0, count: count))
            try store.trimBlocks("vm", at: at, count: count)
            model.wrote(at, [UInt64](repeating: 0, count: count))
        }
        func flush() throws {
            try store.flush()
            model.flushed()
        }
        do {
            try write(0, [2010])            // overwrite: a new object, block 0's old chunk freed
            try write(1, [2002])            // block 2's content again: dedup in the family
            try write(4, [2011, 2012])      // two new chunks in one write
            try trim(3, 1)                  // a free without a new chunk
            try flush()                     // durable marker, then the frees' releases
            try write(5, [2013])
            try write(4, [2014])            // overwrite of a chunk stored since the last flush
            try write(6, [7])               // a shared content, twice: one chunk, two slots
            try write(7, [7])
            try flush()
            try write(2, [2015])            // block 1 still holds 2002: its chunk stays
            try store.checkpoint()          // superblock and metadata pages, then the frees
            model.flushed()
            try trim(0, 2)
            try write(6, [2016])
            try flush()
            try write(3, [2017])            // never flushed
        } catch let error as StorageError where error == .crashed {
        } catch {
            // The store reports the crash of a step in its own words (an I/O error naming it).
            guard crash.crashed else { throw error }
        }
        return (store, crash, model)
    }

    /// Takes the family over by force from another client and checks it (see the suite).
    func takeOverAndCheck(_ family: RadosTestFamily, _ model: Model, _ host: RadosConnection, _ what: String) throws {
        let (store, fenced) = try family.open(options(), create: false, ownership: .takeOver(waitingUpTo: 0, force: true))
        defer { try? store.close() }
        #expect(!fenced.isEmpty, "\(what): the dead owner was not fenced")
        for b in 0..<Self.blocks {
            let got = try store.readBlock("vm", b)
            let allowed = model.since[b].union([model.durable[b]])
            if !allowed.contains(where: { modelBlock($0) == got }) {
                Issue.record("\(what): block \(b) holds none of contents \(allowed.sorted()) (flushed: \(model.durable[b]))")
            }
        }
        let report = store.fsck()
        #expect(report.isClean, "\(what): fsck \(report)")
        if family.form == .chunkObjects {
            let held = try family.referencesHeld(host), claimed = try family.referencesClaimed(store)
            #expect(held == claimed, "\(what): references held but not claimed \(held.subtracting(claimed).sorted()), claimed but not held \(claimed.subtracting(held).sorted())")
        }
        // The new owner goes on: a write and a flush work and release what they free.
        try store.writeBlocks("vm", at: 0, [2100])
        try store.flush()
        #expect(try store.readBlock("vm", 0) == modelBlock(2100), "\(what): the new owner's write")
        if family.form == .chunkObjects {
            // Its flush released what the overwrite freed (no sweep this time).
            let held = try family.referencesHeld(host), claimed = try family.referencesClaimed(store)
            #expect(held == claimed, "\(what): after the new owner's flush, references held but not claimed \(held.subtracting(claimed).sorted())")
        } else {
            #expect(store.fsck().isClean, "\(what): fsck after the new owner's flush")
        }
    }

    @Test(arguments: RadosChunkForm.allCases)
    func aCrashAtEveryStepLeavesFlushedBlocksAndNoUnclaimedReference(_ form: RadosChunkForm) throws {
        let host = try cluster.connect()
        defer { host.close() }
        // First the whole sequence, crashed only after its end: it counts the steps.
        let whole = RadosTestFamily(cluster, form: form, prefix: "crash")
        let (store, crash, model) = try runSequence(whole, crashAt: nil)
        let steps = crash.steps
        crash.crashNow()
        try takeOverAndCheck(whole, model, host, "crash after the last step")
        store.abandonWithoutFlush()
        #expect(steps.count > 20)
        if form == .chunkObjects {
            #expect(steps.contains { $0.hasPrefix("store chunk") } && steps.contains { $0.hasPrefix("release chunk") })
        } else {
            #expect(steps.contains { $0.hasPrefix("write data") })
        }

        var crashes = 0
        for k in 1...steps.count {
            let family = RadosTestFamily(cluster, form: form, prefix: "crash\(k)")
            let (store, crash, model) = try runSequence(family, crashAt: k)
            #expect(crash.crashed, "step \(k) (\(steps[k - 1])) was never reached: the sequence is not deterministic")
            try takeOverAndCheck(family, model, host, "crash at step \(k) of \(steps.count) (\(steps[k - 1]))")
            store.abandonWithoutFlush()
            crashes += 1
        }
        print("RadosCrashStepTests \(form.rawValue): \(crashes) crashes after \(steps.count) steps: \(steps.joined(separator: "; "))")
    }

    /// The takeover itself crashes: a store that crashed at step `k` of the sequence is taken
    /// over by force as `RadosStore.open` does it (journal replay, then the leak sweep), but with
    /// the crash switch between, and that owner writes block 0 and flushes; it crashes at each
    /// step of that in turn (the sweep counts as one step, before it runs). A third client then
    /// takes over and checks as above. First crashes: right after the first and the last marker
    /// of a flush (its releases not yet run) and after the whole sequence (an unflushed write).
    @Test(arguments: RadosChunkForm.allCases)
    func aCrashDuringTheTakeoverIsTakenOverAgain(_ form: RadosChunkForm) throws {
        let host = try cluster.connect()
        defer { host.close() }
        let counting = RadosTestFamily(cluster, form: form, prefix: "recount")
        let (first, firstCrash, _) = try runSequence(counting, crashAt: nil)
        let steps = firstCrash.steps
        firstCrash.crashNow()
        first.abandonWithoutFlush()
        // Right after the first and the last sync of the journal (a flush's marker: its frees'
        // releases still to run), and after the whole sequence (an unflushed write to replay).
        let afterMarkers = steps.indices.filter { steps[$0].hasPrefix("sync journal") }.map { $0 + 2 }.filter { $0 <= steps.count }
        let firstCrashes = [afterMarkers.first!, afterMarkers.last!, steps.count + 1]
        var runs = 0, recoverySteps: [String] = []
        for k in firstCrashes {
            var j = 1
            while true {
                let family = RadosTestFamily(cluster, form: form, prefix: "recrash\(k)-\(j)")
                let (store, crash, model) = try runSequence(family, crashAt: k <= steps.count ? k : nil)
                crash.crashNow()
                // The second owner, crashing at its step j.
                let second = CrashSwitch()
                let (directory, fenced) = try RadosStore.openDirectory(family.location, ownership: .takeOver(waitingUpTo: 0, force: true), readOnly: false)
                #expect(!fenced.isEmpty)
                store.abandonWithoutFlush()
                second.arm(crashAt: j)
                var options = options()
                var chunks: RadosChunkStorage?
                if form == .chunkObjects {
                    let domain = try #require(try RadosStore.recordedSharingDomain(directory.pool))
                    chunks = try RadosStore.chunkStorage(domain: domain, secret: try RadosStore.domainSecret(domain, beside: directory.pool),
                                                         family: directory)
                    options.chunkStorage = CrashingChunkStorage(chunks!, second)
                }
                var model2 = model
                var recovered: Store?
                do {
                    let store2 = try Store(directory: CrashingDirectory(directory, second), options: options, create: false)
                    recovered = store2
                    // What the replay brought back is this owner's starting point: each block one
                    // of its allowed contents, and durable (the first owner's unflushed writes
                    // that did not come back are gone for good).
                    for b in 0..<Self.blocks {
                        let got = try store2.readBlock("vm", b)
                        let allowed = model.since[b].union([model.durable[b]])
                        guard let id = allowed.first(where: { modelBlock($0) == got }) else {
                            Issue.record("first crash at step \(k), second owner: block \(b) holds none of contents \(allowed.sorted())")
                            continue
                        }
                        model2.current[b] = id
                    }
                    model2.flushed()
                    if let chunks {
                        try second.step("sweep")
                        try chunks.sweep(owner: directory, claimed: store2.installedChunkPlaces())
                    }
                    model2.willWrite(0, [2200])
                    try store2.writeBlocks("vm", at: 0, [2200])
                    model2.wrote(0, [2200])
                    try store2.flush()
                    model2.flushed()
                } catch {
                    guard second.crashed else { throw error }
                }
                let finished = !second.crashed
                if finished { recoverySteps = second.steps }
                second.crashNow()
                try takeOverAndCheck(family, model2, host, "first crash at step \(k) of \(steps.count), second at step \(j) of the takeover")
                recovered?.abandonWithoutFlush()
                withExtendedLifetime(directory) {}
                runs += 1
                if finished { break }
                j += 1
            }
        }
        #expect(recoverySteps.count >= 3)
        print("RadosCrashStepTests \(form.rawValue): \(runs) takeovers crashed; first crashes at \(firstCrashes), takeover steps: \(recoverySteps.joined(separator: "; "))")
    }
}
