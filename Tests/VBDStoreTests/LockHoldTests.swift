import Foundation
import Synchronization
import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Counts how often the store's locks are taken (a scheduler hook that never switches threads).
final class LockHoldCounter: InterleavingScheduler, @unchecked Sendable {
    private(set) var holds = 0
    func reset() { holds = 0 }
    func acquire(_ lock: ObjectIdentifier) { holds += 1 }
    func tryAcquire(_ lock: ObjectIdentifier) -> Bool? { nil }
    func release(_ lock: ObjectIdentifier) {}
    func yield() {}
}

/// Item 4 of issue 12: TRIM, WRITE_ZEROES and BLOCK_STATUS may span 4 GiB; they must not do all
/// their work in one hold of the store lock. Counted in lock holds, not wall time.
@Suite struct LockHoldTests {
    static let blocks: UInt64 = 65_536   // 512-byte blocks: 32 MiB, 64 batches
    static let minimumHolds = Int(blocks / Store.blocksPerLockHold)

    func makeStore() throws -> (Store, VolumeDevice, LockHoldCounter) {
        let counter = LockHoldCounter()
        var options = Store.Options()
        options.interleaving = counter
        options.pendingJournalBytesMax = 64 << 20   // no implicit flush in the middle
        let store = try Store(directory: SimulatedDisk(seed: 4).directory(), options: options, create: true)
        _ = try store.createVolume(name: "v", size: Self.blocks * 512, blockSize: 512)
        let v = try store.device(named: "v")
        for b: UInt64 in [0, 1, 30_000, 65_535] { try v.write(block(seed: b, size: 512), at: b * 512) }
        counter.reset()
        return (store, v, counter)
    }

    @Test func hugeTrimTakesTheLockManyTimes() throws {
        let (store, v, counter) = try makeStore()
        try v.trim(offset: 0, length: Self.blocks * 512, fua: false)
        #expect(counter.holds >= Self.minimumHolds)
        #expect(try v.extents(offset: 0, length: Self.blocks * 512, maxExtents: 10).map(\.flags) == [[.hole, .zero]])
        #expect(store.uniqueChunkCount == 0)
    }

    @Test func hugeWriteZeroesTakesTheLockManyTimes() throws {
        let (store, v, counter) = try makeStore()
        try v.writeZeroes(offset: 0, length: Self.blocks * 512, mayTrim: false, fastOnly: false, fua: false)
        #expect(counter.holds >= Self.minimumHolds)
        #expect(try v.extents(offset: 0, length: Self.blocks * 512, maxExtents: 10).map(\.flags) == [[.zero]])
        #expect(store.uniqueChunkCount == 0)
    }

    @Test func hugeBlockStatusTakesTheLockManyTimesAndMergesAcrossBatches() throws {
        let (_, v, counter) = try makeStore()
        let extents = try v.extents(offset: 0, length: Self.blocks * 512, maxExtents: 100)
        #expect(counter.holds >= Self.minimumHolds)
        let expected = [
            Extent(length: 2 * 512, flags: []), Extent(length: (30_000 - 2) * 512, flags: [.hole, .zero]),
            Extent(length: 512, flags: []), Extent(length: (65_535 - 30_001) * 512, flags: [.hole, .zero]),
            Extent(length: 512, flags: []),
        ]
        #expect(extents == expected)
    }

    /// Issue 15: a commit freezes its changed pages `commitFreezeStepPages` at a time and lets go
    /// of the store lock between the steps, so a reader waits for one step, not the whole commit.
    @Test func aCommitFreezesItsChangedPagesInManyHoldsOfTheLock() throws {
        let counter = LockHoldCounter()
        var options = Store.Options()
        options.interleaving = counter
        options.pendingJournalBytesMax = 64 << 20
        options.commitDirtyPagesMax = 1 << 20   // no commit before the one measured
        options.commitFreezeStepPages = 4
        let store = try Store(directory: SimulatedDisk(seed: 5).directory(), options: options, create: true)
        _ = try store.createVolume(name: "v", size: 64 << 20, blockSize: 4096)
        let v = try store.device(named: "v")
        var g = SplitMix64(seed: 5)
        for k: UInt64 in 0..<3000 { try v.write(block(seed: k), at: g.next() % 16_384 * 4096) }
        let dirty = store.mutex.withLock { store.pager.dirtyFrames }
        #expect(dirty >= 64)
        counter.reset()
        try store.checkpoint()
        #expect(counter.holds >= dirty / 4, "\(counter.holds) lock holds for \(dirty) changed pages")
        #expect(store.mutex.withLock { store.pager.dirtyFrames } == 0)
    }

    /// A holder that takes the lock again at once, in steps, lets a thread that was blocked in
    /// `lock` in first (pthread mutexes do not hand over: the woken waiter would find the lock
    /// taken again): a reader behind a commit's freeze waits for one step, not for all of them.
    @Test func aThreadBlockedOnTheLockGetsItBetweenTheHoldersSteps() throws {
        let mutex = StoreMutex()
        let stepWhenTaken = Atomic<Int>(-1)
        let step = Atomic<Int>(0)
        mutex.lock()
        let waiter = Thread {
            mutex.lock()
            stepWhenTaken.store(step.load(ordering: .relaxed), ordering: .relaxed)
            mutex.unlock()
        }
        waiter.start()
        let deadline = ContinuousClock.now + .seconds(10)
        while mutex.waitingCount == 0 && ContinuousClock.now < deadline { sched_yield() }
        #expect(mutex.waitingCount == 1)
        for k in 1...50 {
            step.store(k, ordering: .relaxed)
            mutex.unlock()
            mutex.yieldToWaiters(for: .seconds(5))
            mutex.lock()
        }
        mutex.unlock()
        while stepWhenTaken.load(ordering: .relaxed) < 0 && ContinuousClock.now < deadline { sched_yield() }
        #expect(stepWhenTaken.load(ordering: .relaxed) == 1)
    }
}
