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
}
