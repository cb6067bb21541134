import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// fsck on a served store runs beside writes. A deduplicating write takes its reference to the
/// stored chunk in one hold of the store lock and puts it into the map in a later one; fsck in
/// between must count that reference (the concurrency checker's live fsck reported "refcount N
/// but N-1 references" on a healthy store).
@Suite struct LiveFsckTests {
    @Test func fsckBetweenDedupAndMappingCountsTheWritesReference() throws {
        var duringDataWrite: (() -> Void)?
        let directory = HookedDirectory(SimulatedDisk(seed: 3).directory()) { file, operation in
            guard file == "data", operation == .write, let action = duringDataWrite else { return }
            duringDataWrite = nil
            action()
        }
        let store = try Store(directory: directory, options: Store.Options(), create: true)
        _ = try store.createVolume(name: "a", size: 1 << 20)
        let a = try store.device(named: "a")
        let shared = block(seed: 1)
        try a.write(shared, at: 0)
        // One request: a block whose bytes are stored already (deduplicated in phase B) and a new
        // one, whose data-file write (phase E) runs between the dedup and the mapping.
        var report: FsckReport?
        duringDataWrite = { report = store.fsck() }
        try a.write(shared + block(seed: 2), at: 8192)
        let live = try #require(report, "the write stored no new data")
        #expect(live.isClean, "\(live.problems)")
        #expect(store.fsck().isClean)
    }
}
