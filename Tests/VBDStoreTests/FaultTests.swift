import Foundation
import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Faults of the persistence layer: failed syncs, a damaged journal, checkpoint or superblock,
/// lost directory entries, a deleted lock file. Each test failed before its fix.
@Suite struct FaultTests {
    // MARK: a. A failed fsync poisons the store

    /// Linux may drop the dirty pages of a failed fsync and report success on the retry: a
    /// later FLUSH must not be acknowledged, and nothing more may be written until a reopen.
    @Test(arguments: ["data", "journal-"])
    func failedSyncPoisonsTheStoreUntilReopened(file: String) throws {
        let disk = SimulatedDisk(seed: 1)
        let store = try simulatedStore(disk, create: true)
        try store.createVolume(name: "v", size: 1 << 20)
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 1), at: 0)
        try dev.flush()
        try dev.write(block(seed: 2), at: 4096)
        disk.inject(.io("EIO"), on: .sync, filePrefix: file, dropsUnsyncedWrites: true)
        #expect(throws: (any Error).self) { try dev.flush() }
        #expect(disk.faultsFired == 1)
        // The retry would find nothing left to sync and succeed: it must be refused.
        #expect(throws: (any Error).self) { try dev.flush() }
        #expect(throws: (any Error).self) { try dev.write(block(seed: 3), at: 8192) }
        #expect(throws: (any Error).self) { try store.createVolume(name: "w", size: 1 << 20) }
        let refusal = #expect(throws: StoreError.self) { try store.flush() }
        #expect(refusal?.description.contains("fdatasync") == true)

        store.abandonWithoutFlush()
        disk.powerLoss()
        disk.reboot()
        let reopened = try simulatedStore(disk)
        let again = try reopened.device(named: "v")
        #expect(try again.read(4096, at: 0) == block(seed: 1))
        #expect(reopened.fsck().isClean)
        try again.write(block(seed: 4), at: 8192)
        try again.flush()
        try reopened.close()
    }

    // MARK: b. A corrupt journal frame followed by valid frames

    /// Three flushed frames, the first damaged: opening names the frame and what follows,
    /// a read-only open refuses too and changes nothing, and only an explicit repair drops them.
    @Test func corruptFrameBeforeValidFramesIsRefusedNotTruncated() throws {
        let disk = SimulatedDisk(seed: 2)
        do {
            let store = try simulatedStore(disk, create: true)
            try store.createVolume(name: "v", size: 1 << 20)
            let dev = try store.device(named: "v")
            for i in 0..<3 {
                try dev.write(block(seed: UInt64(10 + i)), at: UInt64(i) * 4096)
                try dev.flush()
            }
            store.abandonWithoutFlush()
        }
        // The current generation's journal (the previous one ends with the seal of this one).
        let journal = disk.fileNames.filter { $0.hasPrefix("journal-") }
            .max { UInt64($0.dropFirst(8))! < UInt64($1.dropFirst(8))! }!
        disk.flipByte(file: journal, at: JournalFrame.headerBytes + 2)   // the first frame's payload
        let before = disk.fileNames.map { ($0, disk.size(of: $0)) }

        for readOnly in [false, true] {
            do {
                _ = try simulatedStore(disk, readOnly: readOnly)
                Issue.record("a journal with valid frames after a corrupt one opened (readOnly \(readOnly))")
            } catch let e as StoreError {
                #expect(e.code == "corrupted")
                #expect(e.description.contains("\(journal) frame 0 at offset 0 is corrupt"))
                #expect(e.description.contains("frame 2 at offset"))
                #expect(e.description.contains("fsck --repair"))
            }
            #expect(disk.fileNames.map { ($0, disk.size(of: $0)) }.elementsEqual(before, by: { $0 == $1 }))
        }

        let seen = DamageRecorder()
        let repaired = try simulatedStore(disk, repair: { seen.record($0); return true })
        let damage = try #require(seen.damages.first)
        #expect(damage.badFrame == 0)
        // Frame 0 created the volume's first write; frames 1 and 2 follow and are dropped.
        #expect(damage.followingFrames.map(\.sequence).contains(2))
        #expect(repaired.fsck().isClean)
        try repaired.close()
        _ = try simulatedStore(disk).close()
    }

    /// A torn last frame is a crash's normal leftover: it is cut without asking.
    @Test func tornLastFrameIsStillCutSilently() throws {
        let disk = SimulatedDisk(seed: 3)
        do {
            let store = try simulatedStore(disk, create: true)
            try store.createVolume(name: "v", size: 1 << 20)
            let dev = try store.device(named: "v")
            try dev.write(block(seed: 1), at: 0)
            try dev.flush()
            try dev.write(block(seed: 2), at: 4096)
            try dev.flush()
            store.abandonWithoutFlush()
        }
        // The current generation's journal (the previous one ends with the seal of this one).
        let journal = disk.fileNames.filter { $0.hasPrefix("journal-") }
            .max { UInt64($0.dropFirst(8))! < UInt64($1.dropFirst(8))! }!
        disk.flipByte(file: journal, at: disk.size(of: journal) - 3)   // the last frame's checksum
        let store = try simulatedStore(disk)
        #expect(try store.device(named: "v").read(4096, at: 0) == block(seed: 1))
        try store.close()
    }

    // MARK: c. New files are durable in their directory before the superblock names them

    /// A power cut right after checkpoints: the files the superblock names must still exist.
    @Test func checkpointFilesSurviveAPowerCutAfterTheSwitch() throws {
        let disk = SimulatedDisk(seed: 4)
        let store = try simulatedStore(disk, create: true)
        try store.createVolume(name: "v", size: 1 << 20)
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 5), at: 0)
        try store.checkpoint()
        disk.powerLoss()
        store.abandonWithoutFlush()
        disk.reboot()
        let reopened = try simulatedStore(disk)
        #expect(try reopened.device(named: "v").read(4096, at: 0) == block(seed: 5))
        try reopened.close()
    }

    /// The simulated disk itself: a created file is lost, a removed one comes back, until the
    /// directory is synced.
    @Test func simulatedDirectoryEntriesNeedADirectorySync() throws {
        let disk = SimulatedDisk(seed: 5)
        let dir = disk.directory()
        let kept = try dir.openFile("kept", create: true)
        try [UInt8](repeating: 1, count: 600).withUnsafeBytes { try kept.write($0, at: 0) }
        try kept.sync()
        try dir.syncDirectory()
        _ = try dir.openFile("new", create: true)
        try dir.removeFile("kept")
        disk.powerLoss()
        disk.reboot()
        #expect(disk.fileNames == ["kept"])
        #expect(disk.size(of: "kept") == 600)
        _ = try dir.openFile("new", create: true)
        try dir.removeFile("kept")
        try dir.syncDirectory()
        disk.powerLoss()
        #expect(disk.fileNames == ["new"])
    }

    // MARK: d. A lock no file operation defeats

    @Test func deletingTheLockFileDoesNotAdmitASecondOpener() throws {
        let dir = TemporaryStoreDirectory()
        let store = try Store.initialize(path: dir.path)
        #expect(unlink(dir.path + "/lock") == 0)
        for readOnly in [false, true] {
            var options = Store.Options()
            options.readOnly = readOnly
            do {
                _ = try Store.open(path: dir.path, options: options)
                Issue.record("a second opener got in after `rm lock` (readOnly \(readOnly))")
            } catch let e as StoreError {
                #expect(e.code == "locked")
                #expect(e.description.contains("in use by another process"))
            }
        }
        try store.close()
        // Readers share; a writer waits for them.
        var readOnly = Store.Options()
        readOnly.readOnly = true
        let r1 = try Store.open(path: dir.path, options: readOnly)
        let r2 = try Store.open(path: dir.path, options: readOnly)
        #expect(throws: StoreError.self) { _ = try Store.open(path: dir.path) }
        try r1.close(); try r2.close()
        try Store.open(path: dir.path).close()
    }

    // MARK: e. The older superblock slot and its checkpoint

    /// Damage to the newest checkpoint, or to the newest superblock slot, falls back to the
    /// previous generation instead of leaving the store unopenable, and loses nothing: the
    /// previous journal is sealed for the newest checkpoint, so recovery replays it and then the
    /// newest journal, including writes that freed chunks the previous checkpoint still names
    /// and reused their space. The open writes nothing; the next checkpoint skips the damage.
    @Test(arguments: ["checkpoint", "superblock"])
    func damagedNewestGenerationFallsBackToThePreviousOne(damaged: String) throws {
        let disk = SimulatedDisk(seed: 6)
        var newest: UInt64 = 0
        do {
            let store = try simulatedStore(disk, create: true)
            try store.createVolume(name: "v", size: 1 << 20)
            let dev = try store.device(named: "v")
            try dev.write(block(seed: 1), at: 0)
            try store.checkpoint()
            try dev.write(block(seed: 2), at: 4096)
            try dev.write(block(seed: 5), at: 12288)   // unflushed: only the checkpoint holds it
            try store.checkpoint()
            newest = store.mutex.withLock { store.generation }
            // After the newest checkpoint: overwrite blocks the previous one names (their chunks
            // are freed and their sectors reused by the next writes), all flushed.
            try dev.write(block(seed: 3), at: 0)
            try dev.flush()
            try dev.write(block(seed: 4), at: 8192)
            try dev.write(block(seed: 6), at: 4096)
            try dev.flush()
            store.abandonWithoutFlush()
        }
        #expect(disk.fileNames.contains("journal-\(newest - 1)"))
        if damaged == "checkpoint" {
            try! damageCommittedRoot(disk, generation: newest)
        } else {
            disk.flipByte(file: "superblock", at: Int(newest % 2) * Store.superblockSlotBytes + 16)
        }
        let expected: [(offset: UInt64, seed: UInt64)] = [(0, 3), (4096, 6), (8192, 4), (12288, 5)]
        // Read-only first (what `vbdtool list` or `fsck` would see): the same, and nothing written.
        let filesBefore = disk.fileNames
        do {
            let readOnly = try simulatedStore(disk, readOnly: true)
            #expect(readOnly.recoveryWarnings.count == 1)
            #expect(readOnly.recoveryWarnings.first?.contains("nothing flushed was lost") == true)
            let dev = try readOnly.device(named: "v")
            for e in expected { #expect(try dev.read(4096, at: e.offset) == block(seed: e.seed)) }
            try readOnly.close()
        }
        #expect(disk.fileNames == filesBefore)
        let store = try simulatedStore(disk)
        #expect(store.recoveryWarnings.count == 1)
        #expect(store.recoveryWarnings.first?.contains("nothing flushed was lost") == true)
        let dev = try store.device(named: "v")
        for e in expected { #expect(try dev.read(4096, at: e.offset) == block(seed: e.seed)) }
        #expect(store.fsck().isClean)
        // New writes go on in the newest journal: a crash before the next checkpoint falls back
        // the same way and loses nothing; after that checkpoint no fallback is needed.
        try dev.write(block(seed: 7), at: 16384)
        try dev.flush()
        store.abandonWithoutFlush()
        disk.powerLoss()
        disk.reboot()
        let reopened = try simulatedStore(disk)
        #expect(reopened.recoveryWarnings.first?.contains("nothing flushed was lost") == true)
        let again = try reopened.device(named: "v")
        for e in expected + [(16384, 7)] { #expect(try again.read(4096, at: e.offset) == block(seed: e.seed)) }
        #expect(reopened.fsck().isClean)
        try reopened.checkpoint()
        reopened.abandonWithoutFlush()
        disk.powerLoss()
        disk.reboot()
        let last = try simulatedStore(disk)
        #expect(last.recoveryWarnings.isEmpty)
        let final = try last.device(named: "v")
        for e in expected + [(16384, 7)] { #expect(try final.read(4096, at: e.offset) == block(seed: e.seed)) }
        #expect(last.fsck().isClean)
        try last.close()
    }

    // MARK: f. Failed control operations take no effect

    /// With the journal refusing to grow, every control operation fails, and none of them shows
    /// in memory, in a later flush, or after a reopen.
    @Test func failedControlOperationsTakeNoEffect() throws {
        let disk = SimulatedDisk(seed: 7)
        let store = try simulatedStore(disk, create: true)
        try store.createVolume(name: "v", size: 1 << 20)
        try store.snapshot(volume: "v", name: "s")
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 1), at: 0)
        let operations: [(String, () throws -> Void)] = [
            ("create", { try store.createVolume(name: "new", size: 1 << 20) }),
            ("snapshot", { try store.snapshot(volume: "v", name: "t") }),
            ("share", { try store.share(snapshot: "v@s", as: "c") }),
            ("rm", { try store.delete("v", force: true) }),
            ("resize", { try store.resize(volume: "v", size: 2 << 20) }),
        ]
        let before = store.list()
        for (name, operation) in operations {
            disk.inject(.noSpace, on: .write, filePrefix: "journal-", count: 2)
            #expect(throws: StoreError.noSpace, "\(name)") { try operation() }
            disk.removeInjectedFaults()
            #expect(store.list() == before, "\(name) took effect in memory although it failed")
            try store.flush()
            #expect(store.list() == before, "\(name) took effect at the next flush")
        }
        #expect(try dev.read(4096, at: 0) == block(seed: 1))
        store.abandonWithoutFlush()
        let reopened = try simulatedStore(disk)
        #expect(reopened.list() == before)
        #expect(reopened.fsck().isClean)
        try reopened.close()
    }

    // MARK: g. A full disk

    /// Filling the disk: writes get ENOSPC (not EIO), flush still works, rm and gc work, and
    /// new data is accepted again without a restart once space is freed.
    @Test func fullDiskDeletesAndRecoversOnline() throws {
        let disk = SimulatedDisk(seed: 8)
        let store = try simulatedStore(disk, create: true)
        // One group, so that keep can store a duplicate of fill's block without new space.
        try store.createVolume(name: "keep", size: 1 << 20, group: "pool")
        try store.createVolume(name: "fill", size: 64 << 20, group: "pool")
        let keep = try store.device(named: "keep")
        try keep.write(block(seed: 99), at: 0)
        try keep.flush()
        disk.spaceBytesMax = disk.bytesHeld + (2 << 20)
        let fill = try store.device(named: "fill")
        var written = 0
        do {
            while written < 4096 {
                try fill.write(block(seed: 1000 + UInt64(written)), at: UInt64(written) * 4096)
                written += 1
            }
        } catch BlockDeviceError.noSpace {}
        #expect(written > 100 && written < 4096)
        try fill.flush()
        // A commit that finds no room to grow `meta` fails with ENOSPC and leaves the store writable.
        disk.inject(.noSpace, on: .write, filePrefix: "meta", count: 2)
        #expect(throws: StoreError.noSpace) { try store.checkpoint() }
        disk.removeInjectedFaults()
        // Nothing new fits, but what is stored stays usable and the store stays writable.
        #expect(throws: BlockDeviceError.noSpace) { try keep.write(block(seed: 5000), at: 8192) }
        try keep.write(block(seed: 1000), at: 4096)   // a duplicate needs no new space
        try keep.flush()

        try store.delete("fill")
        _ = try store.gc()
        try keep.write(block(seed: 5000), at: 8192)
        try keep.flush()
        try store.createVolume(name: "after", size: 1 << 20)
        #expect(try keep.read(4096, at: 0) == block(seed: 99))
        #expect(try keep.read(4096, at: 4096) == block(seed: 1000))
        #expect(store.fsck().isClean)
        try store.close()
        let reopened = try simulatedStore(disk)
        #expect(try reopened.device(named: "keep").read(4096, at: 8192) == block(seed: 5000))
        try reopened.close()
    }
}

final class DamageRecorder: @unchecked Sendable {
    private let lock = NSLock()
    private var seen: [JournalDamage] = []
    func record(_ d: JournalDamage) { lock.lock(); seen.append(d); lock.unlock() }
    var damages: [JournalDamage] { lock.lock(); defer { lock.unlock() }; return seen }
}
