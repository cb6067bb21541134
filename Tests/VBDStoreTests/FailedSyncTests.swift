import Foundation
import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// What a failed sync leaves for the reopen the store asks for (docs/INVARIANTS.md 1, "A kill of
/// the process"), on the simulated disk, whose failing sync drops the file's unsynced writes as
/// Linux may: a control operation or a commit whose data sync fails leaves no frame a reopen in
/// the same boot trusts; a write is never acknowledged after a failed sync poisoned the store, and
/// no frame is written after the poison; a journal append that takes the space reserve while a
/// flush refills it leaves the reserve taken. Each test makes its interleaving happen exactly
/// (hooks on file operations and on lock acquisitions), so each failure it finds replays.
@Suite struct FailedSyncTests {
    static let volumeBytes = UInt64(1 << 20)

    func options(_ interleaving: (any InterleavingScheduler)? = nil) -> Store.Options {
        var options = Store.Options()
        options.secretForNewStore = 7
        options.spaceReserveBytes = 64 << 10
        options.interleaving = interleaving
        return options
    }

    /// A block after the reopen: what was written, or (not trusted) as it was before, zeroes.
    func readsWrittenOrNothing(_ store: Store, block number: UInt64, written: [UInt8]) -> Bool {
        let got = try? store.device(named: "v").read(4096, at: number * 4096)
        return got == written || got == [UInt8](repeating: 0, count: 4096)
    }

    /// A control operation flushes, takes the journal's lock, and syncs the data again if writes
    /// were journaled in between; that sync fails here, dropping such a write's data. The reopen
    /// in the same boot must not trust the write's frame: its block would name bytes that are gone.
    @Test func aControlOperationWhoseDataSyncFailsLeavesNoFrameTheReopenTrusts() throws {
        let disk = SimulatedDisk(seed: 24)
        var duringJournalSync: (() -> Void)?
        let directory = HookedDirectory(disk.directory()) { file, operation in
            guard file.hasPrefix("journal-"), operation == .sync, let action = duringJournalSync else { return }
            duringJournalSync = nil
            action()
        }
        let store = try Store(directory: directory, options: options(), create: true)
        try store.createVolume(name: "v", size: Self.volumeBytes)
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 1300), at: 0)
        try dev.flush()
        // Something for the control operation's flush to cover, so that it syncs the journal.
        try dev.write(block(seed: 1301), at: 4096)
        // Acknowledged after that flush's marker, before the operation takes the journal's lock.
        duringJournalSync = {
            try! dev.write(block(seed: 1302), at: 2 * 4096)
            disk.inject(.io("injected EIO"), on: .sync, filePrefix: "data", dropsUnsyncedWrites: true)
        }
        #expect(throws: (any Error).self) { try store.createVolume(name: "w", size: Self.volumeBytes) }
        #expect(duringJournalSync == nil, "the control operation's flush synced no journal")
        #expect(disk.faultsFired == 1, "the control operation did not sync the data again")
        _ = try? store.close()   // poisoned: closes without a checkpoint
        let reopened = try simulatedStore(disk)
        #expect(try reopened.device(named: "v").read(8192, at: 0) == block(seed: 1300) + block(seed: 1301))
        #expect(readsWrittenOrNothing(reopened, block: 2, written: block(seed: 1302)),
                "a block maps to a chunk whose bytes the control operation's failed sync dropped")
        #expect(reopened.fsck().isClean)
        #expect((try? reopened.device(named: "w")) == nil, "the failed control operation took effect")
        try? reopened.close()
    }

    /// A commit syncs the data file before it takes the lock (1) and again after sealing the
    /// journal (2); either failing drops the data of writes no marker covers. The reopen in the
    /// same boot must not trust their frames (nor, for 2, the seal and the journal after it).
    @Test(arguments: [1, 2])
    func aCommitWhoseDataSyncFailsLeavesNoFrameTheReopenTrusts(failingSync: Int) throws {
        let disk = SimulatedDisk(seed: 25 + UInt64(failingSync))
        var duringDirectorySync: (() -> Void)?
        let directory = HookedDirectory(disk.directory()) { _, operation in
            guard operation == .syncDirectory, let action = duringDirectorySync else { return }
            duringDirectorySync = nil
            action()
        }
        let store = try Store(directory: directory, options: options(), create: true)
        try store.createVolume(name: "v", size: Self.volumeBytes)
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 1400), at: 0)
        try dev.flush()
        try dev.write(block(seed: 1401), at: 4096)
        if failingSync == 1 {
            disk.inject(.io("injected EIO"), on: .sync, filePrefix: "data", dropsUnsyncedWrites: true)
        } else {
            // The commit's next journal is made durable in the directory between its two data
            // syncs: a write acknowledged there is sealed into the old journal, its data unsynced.
            duringDirectorySync = {
                try! dev.write(block(seed: 1402), at: 2 * 4096)
                disk.inject(.io("injected EIO"), on: .sync, filePrefix: "data", dropsUnsyncedWrites: true)
            }
        }
        #expect(throws: (any Error).self) { try store.checkpoint() }
        #expect(duringDirectorySync == nil)
        #expect(disk.faultsFired == 1)
        _ = try? store.close()
        let reopened = try simulatedStore(disk)
        #expect(try reopened.device(named: "v").read(4096, at: 0) == block(seed: 1400))
        #expect(readsWrittenOrNothing(reopened, block: 1, written: block(seed: 1401)))
        #expect(readsWrittenOrNothing(reopened, block: 2, written: block(seed: 1402)),
                "a block maps to a chunk whose bytes the commit's failed sync dropped")
        #expect(reopened.fsck().isClean)
        try? reopened.close()
    }

    /// A writer's records went into another thread's frame (here a flush's, which takes every
    /// record queued) before the writer took the journal's lock; that flush's journal sync then
    /// failed and dropped the frame. The writer finds its records journaled, but must not
    /// acknowledge: the store is poisoned and the frame is gone, so a kill would lose the write.
    @Test func aWriteWhoseRecordsAFailedFlushJournaledIsNotAcknowledged() throws {
        let disk = SimulatedDisk(seed: 27)
        let hook = BeforeLockHook()
        let store = try Store(directory: disk.directory(), options: options(hook), create: true)
        try store.createVolume(name: "v", size: Self.volumeBytes)
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 1500), at: 0)
        try dev.flush()
        var flushFailed = false
        // The writer's first take of `journalMutex` is in `journalQueuedRecords`, after its
        // records are queued: the flush runs right there, on the writer's thread.
        hook.arm(ObjectIdentifier(store.journalMutex)) {
            disk.inject(.io("injected EIO"), on: .sync, filePrefix: "journal-", dropsUnsyncedWrites: true)
            flushFailed = (try? store.flush()) == nil
        }
        let acknowledged = (try? dev.write(block(seed: 1501), at: 4096)) != nil
        #expect(flushFailed && disk.faultsFired == 1, "the flush did not fail at its journal sync")
        #expect(!acknowledged, "a write was acknowledged after the failed sync that dropped its frame poisoned the store")
        _ = try? store.close()
        let reopened = try simulatedStore(disk)
        #expect(try reopened.device(named: "v").read(4096, at: 0) == block(seed: 1500))
        if acknowledged {
            #expect(try reopened.device(named: "v").read(4096, at: 4096) == block(seed: 1501),
                    "an acknowledged write is lost by a reopen in the same boot")
        }
        #expect(reopened.fsck().isClean)
        try? reopened.close()
    }

    /// A writer checked the poison and is about to write its frame when a flush's journal sync
    /// fails. The flush may not poison the store (and report its failure) while the frame is
    /// being written, or the frame lands after the poison, behind what the failed sync dropped,
    /// and its write is acknowledged after the store refused everything. The writer holds the
    /// journal's lock and lets the flush go on until it returns or waits for that lock.
    @Test func noFrameIsWrittenAfterAFailedJournalSyncPoisonedTheStore() throws {
        let disk = SimulatedDisk(seed: 28)
        let events = Events()
        let hook = BeforeLockHook()
        let flushInSync = DispatchSemaphore(value: 0), syncMayFail = DispatchSemaphore(value: 0)
        let flushReturnedOrWaits = DispatchSemaphore(value: 0)
        var journalLock: ObjectIdentifier?
        let directory = HookedDirectory(disk.directory()) { file, operation in
            guard file.hasPrefix("journal-") else { return }
            if operation == .sync, events.take(\.pauseJournalSync) {
                flushInSync.signal()
                _ = syncMayFail.wait(timeout: .now() + 10)
            } else if operation == .write, events.take(\.holdFrameWrite) {
                // The writer holds `journalMutex` and has checked the poison: the sync fails now.
                // Only the flusher can take `journalMutex` next, and that means waiting for it.
                hook.arm(journalLock!) { flushReturnedOrWaits.signal() }
                syncMayFail.signal()
                _ = flushReturnedOrWaits.wait(timeout: .now() + 10)
                events.set(\.frameWrittenAfterTheFlushFailed, events.get(\.flushFailed))
            }
        }
        let store = try Store(directory: directory, options: options(hook), create: true)
        journalLock = ObjectIdentifier(store.journalMutex)
        try store.createVolume(name: "v", size: Self.volumeBytes)
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 1600), at: 0)
        try dev.flush()
        try dev.write(block(seed: 1601), at: 4096)
        disk.inject(.io("injected EIO"), on: .sync, filePrefix: "journal-", dropsUnsyncedWrites: true)
        events.set(\.pauseJournalSync, true)
        let flusher = Thread {
            let failed = (try? store.flush()) == nil
            events.set(\.flushFailed, failed)
            flushReturnedOrWaits.signal()
            events.set(\.flushDone, true)
        }
        flusher.start()
        #expect(flushInSync.wait(timeout: .now() + 10) == .success)
        events.set(\.holdFrameWrite, true)
        let acknowledged = (try? dev.write(block(seed: 1602), at: 2 * 4096)) != nil
        while !events.get(\.flushDone) { usleep(1000) }
        #expect(events.get(\.flushFailed) && disk.faultsFired == 1, "the flush did not fail at its journal sync")
        #expect(!events.get(\.frameWrittenAfterTheFlushFailed),
                "a frame was written after a failed journal sync poisoned the store (the write was \(acknowledged ? "" : "not ")acknowledged)")
        _ = try? store.close()
        // Not prevented (docs/INVARIANTS.md 1): the writer's frame, written while the sync ran,
        // lies past the frames that sync dropped; within the boot a valid frame after a bad one
        // is corruption. Holding `journalMutex` across the flush's journal sync would prevent it.
        withKnownIssue("a frame appended while a journal sync fails lies past what the sync dropped: the reopen refuses") {
            let reopened = try simulatedStore(disk)
            #expect(try reopened.device(named: "v").read(4096, at: 0) == block(seed: 1600))
            try? reopened.close()
        }
    }

    /// A flush refills the space reserve (`flushMutex`) while a writer's journal frame gets
    /// ENOSPC and gives the reserve back (`journalMutex`). The reserve was taken after the refill
    /// began, so it must stay taken: in use (new block data refused) or, if the refill came last,
    /// full. Never empty while the store thinks it is there for the next full disk.
    @Test func aJournalAppendThatTakesTheReserveDuringARefillLeavesItTaken() throws {
        let disk = SimulatedDisk(seed: 29)
        let events = Events()
        let inRefill = DispatchSemaphore(value: 0), reserveTaken = DispatchSemaphore(value: 0)
        let directory = HookedDirectory(disk.directory()) { file, operation in
            guard file == Store.spaceReserveFile, operation == .sync, events.take(\.pauseRefill) else { return }
            inRefill.signal()
            // Waits for the writer to take the reserve, for a second: a writer that waits for
            // this refill to end first never comes before that.
            _ = reserveTaken.wait(timeout: .now() + 1)
        }
        let store = try Store(directory: directory, options: options(), create: true)
        try store.createVolume(name: "v", size: Self.volumeBytes)
        let dev = try store.device(named: "v")
        #expect(disk.size(of: Store.spaceReserveFile) == 64 << 10)
        // A full disk: a writer's frame gets ENOSPC and takes the reserve.
        disk.inject(.noSpace, on: .write, filePrefix: "journal-")
        try dev.write(block(seed: 1700), at: 0)
        #expect(store.spaceReserveInUse.load(ordering: .relaxed) && disk.size(of: Store.spaceReserveFile) == 0)
        // Space is back; a flush refills the reserve and stops before syncing it, full again.
        events.set(\.pauseRefill, true)
        let flusher = Thread {
            _ = try? store.flush()
            events.set(\.flushDone, true)
        }
        flusher.start()
        #expect(inRefill.wait(timeout: .now() + 10) == .success)
        #expect(disk.size(of: Store.spaceReserveFile) == 64 << 10)
        // A trim: it stores no block data, which the reserve being out would refuse.
        disk.inject(.noSpace, on: .write, filePrefix: "journal-")
        try dev.trim(offset: 0, length: 4096, fua: false)
        reserveTaken.signal()
        while !events.get(\.flushDone) { usleep(1000) }
        #expect(disk.faultsFired == 2)
        let inUse = store.spaceReserveInUse.load(ordering: .relaxed)
        let reserveBytes = disk.size(of: Store.spaceReserveFile)
        #expect(inUse || reserveBytes == 64 << 10,
                "the reserve is empty (\(reserveBytes) bytes) while the store counts on it for the next full disk")
        try store.close()
    }
}

/// Flags the tests' hooks and threads share.
final class Events: @unchecked Sendable {
    struct Flags {
        var pauseJournalSync = false, holdFrameWrite = false, frameWrittenAfterTheFlushFailed = false
        var flushFailed = false, flushDone = false, pauseRefill = false
    }
    private let lock = NSLock()
    private var flags = Flags()
    func get(_ flag: WritableKeyPath<Flags, Bool>) -> Bool { lock.withLock { flags[keyPath: flag] } }
    func set(_ flag: WritableKeyPath<Flags, Bool>, _ value: Bool) { lock.withLock { flags[keyPath: flag] = value } }
    /// Clears `flag` and returns whether it was set.
    func take(_ flag: WritableKeyPath<Flags, Bool>) -> Bool {
        lock.withLock { defer { flags[keyPath: flag] = false }; return flags[keyPath: flag] }
    }
}

/// A store's `interleaving` that leaves every lock as it is, except that it runs an action on
/// the thread about to take a given lock, once (before that thread waits for the lock).
final class BeforeLockHook: InterleavingScheduler, @unchecked Sendable {
    private let lock = NSLock()
    private var armed: (lock: ObjectIdentifier, action: () -> Void)?

    func arm(_ target: ObjectIdentifier, action: @escaping () -> Void) { lock.withLock { armed = (target, action) } }

    func acquire(_ target: ObjectIdentifier) {
        let action: (() -> Void)? = lock.withLock {
            guard let a = armed, a.lock == target else { return nil }
            armed = nil
            return a.action
        }
        action?()
    }
    func tryAcquire(_ target: ObjectIdentifier) -> Bool? { nil }
    func release(_ target: ObjectIdentifier) {}
    func yield() {}
}
