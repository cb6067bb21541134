import Synchronization
import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Item 4 of issue 12: sectors freed by a flush are hole-punched after the store lock is
/// released; a writer must not be able to take them before the punch is done.
@Suite struct PunchRaceTests {
    @Test func sectorsBeingPunchedAreNotAllocatedUntilThePunchIsDone() throws {
        var duringPunch: (() -> Void)?
        let directory = HookedDirectory(SimulatedDisk(seed: 2).directory()) { file, operation in
            guard file == "data", operation == .punchHole, let action = duringPunch else { return }
            duringPunch = nil
            action()
        }
        var options = Store.Options()
        options.holePunchRunBytesMin = 4096   // the 16 freed pages below are punched
        options.unpunchedFreeBytesMax = 0
        let store = try Store(directory: directory, options: options, create: true)
        _ = try store.createVolume(name: "a", size: 1 << 20)
        _ = try store.createVolume(name: "b", size: 1 << 20)
        let a = try store.device(named: "a"), b = try store.device(named: "b")
        for k in 0..<16 { try a.write(block(seed: UInt64(k)), at: UInt64(k) * 4096) }
        try store.flush()
        try a.trim(offset: 0, length: 16 * 4096, fua: false)
        let written = block(seed: 99)
        // A write acknowledged while the flush below punches the freed pages.
        duringPunch = { try! b.write(written, at: 0) }
        try store.flush()
        #expect(duringPunch == nil, "the flush punched nothing")
        let readWrittenBlock = try b.read(4096, at: 0) == written
        #expect(readWrittenBlock)
        #expect(store.fsck().isClean)
    }

    /// Issue 14: overwriting a volume frees long runs at every flush; they stay in the data file
    /// for the writes that follow instead of being punched and refaulted. With the budget at 0
    /// (the policy before) the same overwrite punches them.
    @Test(arguments: [Limits.unpunchedFreeBytesMax, 0])
    func anOverwriteKeepsItsFreedRunsForReuse(budget: UInt64) throws {
        let punched = Mutex<UInt64>(0)
        let directory = HookedDirectory(SimulatedDisk(seed: 3).directory()) { file, operation in
            if file == "data" && operation == .punchHole { punched.withLock { $0 += 1 } }
        }
        var options = Store.Options()
        options.unpunchedFreeBytesMax = budget
        let store = try Store(directory: directory, options: options, create: true)
        _ = try store.createVolume(name: "a", size: 4 << 20)
        let a = try store.device(named: "a")
        // 2 MiB of incompressible contents, written as one request (adjacent chunks of 8 sectors:
        // long runs when freed).
        func contents(_ seed: UInt64) -> [UInt8] {
            var g = SplitMix64(seed: seed)
            return [UInt8](unsafeUninitializedCapacity: 2 << 20) { bytes, count in
                let raw = UnsafeMutableRawBufferPointer(bytes)
                for k in 0..<(2 << 20) / 8 { raw.storeBytes(of: g.next(), toByteOffset: 8 * k, as: UInt64.self) }
                count = 2 << 20
            }
        }
        try a.write(contents(0), at: 0)
        try store.flush()
        let fileEnd = store.space.endSector
        for round in 1...3 {
            try a.write(contents(UInt64(round)), at: 0)
            try store.flush()
        }
        if budget > 0 {
            #expect(punched.withLock { $0 } == 0, "an overwrite's frees were punched")
            // Without reuse each round would append: 4 x fileEnd by now.
            #expect(store.space.endSector < 3 * fileEnd, "the freed runs were reused")
        } else {
            #expect(punched.withLock { $0 } > 0)
        }
        // A delete still gives its space back at once.
        try store.delete("a", force: true)
        try store.flush()
        #expect(store.space.punchedFreeSectors > 0)
        #expect(store.fsck().isClean)
    }
}
