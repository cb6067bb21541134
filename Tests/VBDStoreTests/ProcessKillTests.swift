import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Acknowledged writes survive a kill of the process (docs/INVARIANTS.md 1, "A kill of the process"), and the power-cut
/// contract stays as it was: on a simulated disk that models both a kill (unsynced writes
/// kept, same boot) and a power cut (unsynced writes kept, dropped or torn at random, new boot).
@Suite struct ProcessKillTests {
    static let volumeBytes = 1 << 20

    /// The bytes a volume must hold: what the test wrote, applied the way the store applies it.
    struct Model {
        var bytes = [UInt8](repeating: 0, count: ProcessKillTests.volumeBytes)
        mutating func write(_ data: [UInt8], at offset: Int) { bytes.replaceSubrange(offset..<offset + data.count, with: data) }
        mutating func zero(_ offset: Int, _ length: Int) { write([UInt8](repeating: 0, count: length), at: offset) }
    }

    /// A new store on `disk` with the empty volume "v" every test writes to.
    func newStoreWithVolume(_ disk: SimulatedDisk) throws -> (Store, VolumeDevice) {
        let store = try simulatedStore(disk, create: true)
        try store.createVolume(name: "v", size: UInt64(Self.volumeBytes))
        return (store, try store.device(named: "v"))
    }

    func contents(_ store: Store) throws -> [UInt8] {
        try store.device(named: "v").read(Self.volumeBytes, at: 0)
    }

    /// The journal writes go to now (the newest generation's).
    func currentJournal(_ disk: SimulatedDisk) -> String {
        disk.fileNames.filter { $0.hasPrefix("journal-") }.max { UInt64($0.dropFirst(8))! < UInt64($1.dropFirst(8))! }!
    }

    /// Writes of every kind, none flushed: single blocks, a multi-block request, an unaligned
    /// write (read-modify-write), a trim and a write-zeroes.
    func unflushedWrites(_ dev: VolumeDevice, _ model: inout Model, seed: UInt64) throws {
        let a = block(seed: seed), b = block(seed: seed + 1) + block(seed: seed + 2) + block(seed: seed + 3)
        try dev.write(a, at: 4096); model.write(a, at: 4096)
        try dev.write(b, at: 8 * 4096); model.write(b, at: 8 * 4096)
        let c = [UInt8](repeating: UInt8(truncatingIfNeeded: seed) | 1, count: 100)
        try dev.write(c, at: 20 * 4096 + 7); model.write(c, at: 20 * 4096 + 7)
        try dev.trim(offset: 0, length: 4096, fua: false); model.zero(0, 4096)
        try dev.writeZeroes(offset: 9 * 4096, length: 4096, mayTrim: false, fastOnly: false, fua: false)
        model.zero(9 * 4096, 4096)
    }

    @Test func acknowledgedWritesSurviveAKillAndThenAPowerCut() throws {
        let disk = SimulatedDisk(seed: 11)
        var model = Model()
        do {
            let (store, dev) = try newStoreWithVolume(disk)
            let flushed = block(seed: 1)
            try dev.write(flushed, at: 0); model.write(flushed, at: 0)
            try dev.flush()
            try unflushedWrites(dev, &model, seed: 100)
            disk.processKill()
            store.abandonWithoutFlush()
        }
        disk.reboot()
        let reopened = try simulatedStore(disk)
        #expect(try contents(reopened) == model.bytes, "a write acknowledged before the kill is missing")
        #expect(reopened.fsck().isClean)
        // Recovery made them durable: a power cut now (nothing flushed since) keeps them all.
        reopened.abandonWithoutFlush()
        disk.powerLoss()
        disk.reboot()
        let afterCut = try simulatedStore(disk)
        #expect(try contents(afterCut) == model.bytes, "a power cut after the kill's recovery lost a write")
        #expect(afterCut.fsck().isClean)
        try afterCut.close()
    }

    /// After a kill and its recovery, more unflushed writes and a power cut at each step of the
    /// flush that would cover them: what the flush before the cut and the recovery covered is
    /// there, each later request is there whole or not at all, and all of them if the flush
    /// returned.
    @Test(arguments: 0..<8)
    func aPowerCutKeepsWhatWasCoveredAndEachRequestWholeOrNotAtAll(cutAfterCalls: Int) throws {
        for seed in UInt64(1)...6 {
            let disk = SimulatedDisk(seed: seed * 31 + UInt64(cutAfterCalls))
            var model = Model()
            do {
                let (store, dev) = try newStoreWithVolume(disk)
                try dev.write(block(seed: 1), at: 0); model.write(block(seed: 1), at: 0)
                try dev.flush()
                try unflushedWrites(dev, &model, seed: 200)
                disk.processKill()
                store.abandonWithoutFlush()
            }
            disk.reboot()
            let store = try simulatedStore(disk)
            let dev = try store.device(named: "v")
            // Four-block requests, each with its own content, then a flush the power cut strikes.
            var requests: [(offset: Int, bytes: [UInt8])] = []
            for k in 0..<5 {
                let bytes = (0..<4).flatMap { block(seed: 1000 * seed + UInt64(10 * k + $0)) }
                let offset = (32 + 8 * k) * 4096
                try dev.write(bytes, at: UInt64(offset))
                requests.append((offset, bytes))
            }
            disk.crashCountdown = cutAfterCalls
            var flushReturned = false
            do { try dev.flush(); flushReturned = true } catch {}
            if !disk.isCrashed { disk.powerLoss() }
            store.abandonWithoutFlush()
            disk.reboot()
            let after = try simulatedStore(disk)
            let got = try contents(after)
            let covered = Array(got[0..<32 * 4096]), expected = Array(model.bytes[0..<32 * 4096])
            #expect(covered == expected, "seed \(seed) cut \(cutAfterCalls): lost what the kill's recovery covered")
            for r in requests {
                let now = Array(got[r.offset..<r.offset + r.bytes.count])
                let whole = now == r.bytes, absent = now.allSatisfy { $0 == 0 }
                #expect(whole || absent, "seed \(seed) cut \(cutAfterCalls): request at \(r.offset) is half applied")
                if flushReturned { #expect(whole, "seed \(seed) cut \(cutAfterCalls): a flushed request was lost") }
            }
            #expect(after.fsck().isClean)
            try after.close()
        }
    }

    /// A kill that interrupted the journal write of the last request leaves a torn frame: the
    /// store opens, keeps every write before it and drops only that one.
    @Test func aTornLastFrameAfterAKillLosesOnlyTheWriteInFlight() throws {
        let disk = SimulatedDisk(seed: 12)
        var model = Model()
        do {
            let (store, dev) = try newStoreWithVolume(disk)
            try dev.flush()
            for k in 0..<3 {
                try dev.write(block(seed: 300 + UInt64(k)), at: UInt64(k) * 4096)
                if k < 2 { model.write(block(seed: 300 + UInt64(k)), at: k * 4096) }
            }
            disk.processKill()
            store.abandonWithoutFlush()
        }
        disk.reboot()
        // The last frame (the third write's) loses its last bytes, as a write cut short would.
        let journal = currentJournal(disk)
        let file = try disk.directory().openFile(journal, create: false)
        try file.truncate(to: try file.size() - 5)
        let reopened = try simulatedStore(disk)
        #expect(try contents(reopened) == model.bytes)
        #expect(reopened.fsck().isClean)
        // The torn tail is gone: new frames follow the valid ones, and the next open replays them.
        try reopened.device(named: "v").write(block(seed: 400), at: 5 * 4096)
        model.write(block(seed: 400), at: 5 * 4096)
        reopened.abandonWithoutFlush()
        disk.processKill()
        disk.reboot()
        let again = try simulatedStore(disk)
        #expect(try contents(again) == model.bytes)
        try again.close()
    }

    /// A bad frame with valid frames after it: within the boot that wrote them (a kill) that is
    /// corruption and the open refuses; after a power cut the frames were never synced (they
    /// may land in any order), so it is a torn tail: the open drops them, keeps what was
    /// flushed, and the next open in the new boot does not bring them back.
    @Test func aBadUnsyncedFrameBeforeValidOnesIsCorruptionWithinTheBootAndATornTailAfterAPowerCut() throws {
        let disk = SimulatedDisk(seed: 13)
        var model = Model()
        let journal: String
        let firstUnflushed: Int
        do {
            let (store, dev) = try newStoreWithVolume(disk)
            try dev.write(block(seed: 500), at: 0); model.write(block(seed: 500), at: 0)
            try dev.flush()
            journal = currentJournal(disk)
            firstUnflushed = disk.size(of: journal)
            for k in 1...3 { try dev.write(block(seed: 500 + UInt64(k)), at: UInt64(k) * 4096) }
            #expect(disk.size(of: journal) > firstUnflushed, "unflushed writes are not in the journal")
            // The kernel happened to write the frames back (an fsync of the journal from outside).
            try disk.directory().openFile(journal, create: false).sync()
            disk.processKill()
            store.abandonWithoutFlush()
        }
        disk.reboot()
        disk.flipByte(file: journal, at: firstUnflushed + JournalFrame.headerBytes + 1)
        #expect {
            _ = try simulatedStore(disk)
        } throws: { error in
            (error as? StoreError)?.code == "corrupted" && "\(error)".contains("\(journal) frame")
        }
        // The same bytes after a power cut: the frames were never covered by a flush.
        disk.powerLoss()
        disk.reboot()
        let afterCut = try simulatedStore(disk)
        #expect(try contents(afterCut) == model.bytes)
        #expect(afterCut.fsck().isClean)
        afterCut.abandonWithoutFlush()
        disk.processKill()
        disk.reboot()
        let again = try simulatedStore(disk)
        #expect(try contents(again) == model.bytes, "frames voided by the recovery came back")
        try again.close()
    }

    /// A write acknowledged while a flush syncs the data file is journaled after the frames that
    /// flush's marker covers, but before the marker: the marker does not cover it. A flush called
    /// after the write returned must cover it, or a power cut after that flush loses it.
    @Test func aWriteJournaledWhileAFlushSyncsTheDataIsCoveredByTheNextFlush() throws {
        let disk = SimulatedDisk(seed: 15)
        var duringDataSync: (() -> Void)?
        let directory = HookedDirectory(disk.directory()) { file, operation in
            guard file == "data", operation == .sync, let action = duringDataSync else { return }
            duringDataSync = nil
            action()
        }
        var options = Store.Options()
        options.secretForNewStore = 7
        let store = try Store(directory: directory, options: options, create: true)
        try store.createVolume(name: "v", size: UInt64(Self.volumeBytes))
        let dev = try store.device(named: "v")
        var model = Model()
        try dev.write(block(seed: 700), at: 0); model.write(block(seed: 700), at: 0)
        try dev.flush()
        // Something for the next flush to cover, so that it writes a marker.
        try dev.write(block(seed: 701), at: 2 * 4096); model.write(block(seed: 701), at: 2 * 4096)
        // Acknowledged between the flush's journal write and its marker (to a block that was
        // unmapped, so it frees nothing).
        duringDataSync = { try! dev.write(block(seed: 702), at: 4096) }
        try dev.flush()
        #expect(duringDataSync == nil, "the flush synced no data")
        model.write(block(seed: 702), at: 4096)
        // The write above returned before this flush was called: the flush makes it durable.
        try dev.flush()
        store.abandonWithoutFlush()
        disk.powerLoss()
        disk.reboot()
        let after = try simulatedStore(disk)
        #expect(try contents(after) == model.bytes, "a write acknowledged before a flush was lost by a power cut after it")
        #expect(after.fsck().isClean)
        try after.close()
    }

    /// A failed fdatasync of the data file may have dropped the dirty pages of writes acknowledged
    /// before it (Linux marks them clean after a writeback error), and the store says to reopen.
    /// The reopen, in the same boot, must not trust the journal frames of those writes: their
    /// chunks' bytes are gone, so a block would map to bytes that fail their hash. Each such
    /// write reads as before it or as written, and fsck finds nothing.
    @Test func aReopenAfterAFailedDataSyncDoesNotTrustFramesWhoseDataItDropped() throws {
        let disk = SimulatedDisk(seed: 16)
        var model = Model()
        let (store, dev) = try newStoreWithVolume(disk)
        try dev.write(block(seed: 800), at: 0); model.write(block(seed: 800), at: 0)
        try dev.flush()
        // Journaled (unsynced) before it is acknowledged; its chunk is in the page cache only.
        try dev.write(block(seed: 801), at: 4096)
        disk.inject(.io("injected EIO"), on: .sync, filePrefix: "data", dropsUnsyncedWrites: true)
        #expect(throws: (any Error).self) { try dev.flush() }
        _ = try? store.close()   // poisoned: closes without a checkpoint
        let reopened = try simulatedStore(disk)
        #expect(try reopened.device(named: "v").read(4096, at: 0) == Array(model.bytes[0..<4096]))
        let written = try? reopened.device(named: "v").read(4096, at: 4096)
        #expect(written == block(seed: 801) || written == [UInt8](repeating: 0, count: 4096),
                "a block maps to a chunk whose bytes the failed sync dropped")
        #expect(reopened.fsck().isClean)
        try? reopened.close()
    }

    /// A failed fdatasync of the journal may drop its unsynced frames and poisons the store. A
    /// change that still reached the journal after that (a trim, which did not check the poison)
    /// would land past the dropped frames, behind a gap; within the boot a valid frame after a
    /// bad one is corruption, so the reopen the store asks for would refuse to open it.
    @Test func aChangeAfterAFailedJournalSyncDoesNotMakeTheReopenRefuse() throws {
        let disk = SimulatedDisk(seed: 17)
        let (store, dev) = try newStoreWithVolume(disk)
        try dev.write(block(seed: 900), at: 0)
        try dev.flush()
        try dev.write(block(seed: 901), at: 4096)
        disk.inject(.io("injected EIO"), on: .sync, filePrefix: "journal-", dropsUnsyncedWrites: true)
        #expect(throws: (any Error).self) { try dev.flush() }
        _ = try? dev.trim(offset: 2 * 4096, length: 4096, fua: false)
        _ = try? store.close()   // poisoned: closes without a checkpoint
        let reopened = try simulatedStore(disk)
        #expect(try reopened.device(named: "v").read(4096, at: 0) == block(seed: 900))
        #expect(reopened.fsck().isClean)
        try? reopened.close()
    }

    /// Where unsynced writes die with the process (RADOS), writes are not journaled at once
    /// (records wait for the flush's frame, as before), and a kill keeps what was flushed.
    @Test func whereUnsyncedWritesDieWithTheProcessRecordsWaitForTheFlush() throws {
        let disk = SimulatedDisk(seed: 14, unsyncedWritesSurviveProcess: false)
        var model = Model()
        do {
            let (store, dev) = try newStoreWithVolume(disk)
            try dev.write(block(seed: 600), at: 0); model.write(block(seed: 600), at: 0)
            try dev.flush()
            let journal = currentJournal(disk)
            let before = disk.size(of: journal)
            try dev.write(block(seed: 601), at: 4096)
            #expect(disk.size(of: journal) == before, "a write was journaled on storage that loses it with the process")
            disk.processKill()
            store.abandonWithoutFlush()
        }
        disk.reboot()
        let reopened = try simulatedStore(disk)
        let got = try contents(reopened)
        #expect(Array(got[0..<4096]) == Array(model.bytes[0..<4096]))
        #expect(Array(got[4096..<8192]) == block(seed: 601) || got[4096..<8192].allSatisfy { $0 == 0 })
        #expect(reopened.fsck().isClean)
        try reopened.close()
    }
}
