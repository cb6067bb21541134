import Foundation
import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Attacks on the fallback to the previous checkpoint (commit f5563e7): journal-G ends with a seal
/// of generation G+1, so checkpoint G + journal-G + journal-(G+1) is everything flushed. These
/// tests damage the newest generation and then fail, crash or damage again around the recovery.
@Suite struct FallbackAttackTests {
    /// What a store must hold after the scenario below: image -> (offset, seed) of each block.
    static let expectedBlocks: [String: [(offset: UInt64, seed: UInt64)]] = [
        "v": [(0, 3), (4096, 6), (8192, 4), (12288, 5)],
        "v@s": [(0, 3), (4096, 2), (12288, 5)],
        "w": [(0, 8)],
    ]

    /// Checkpoint G, checkpoint G+1 (with an unflushed write only the seal frame and checkpoint
    /// G+1 hold), then in journal-(G+1): flushed overwrites of blocks checkpoint G names (their
    /// sectors are reused), a delete, a create, a snapshot and a resize. Returns G+1.
    func buildScenario(_ disk: SimulatedDisk, beforeSecondCheckpoint: (Store) throws -> Void = { _ in }) throws -> UInt64 {
        let store = try simulatedStore(disk, create: true)
        try store.createVolume(name: "v", size: 1 << 20)
        try store.createVolume(name: "doomed", size: 1 << 20)
        let dev = try store.device(named: "v")
        try dev.write(block(seed: 1), at: 0)
        try store.device(named: "doomed").write(block(seed: 20), at: 0)
        try store.checkpoint()
        try dev.write(block(seed: 2), at: 4096)
        try dev.write(block(seed: 5), at: 12288)   // unflushed: the seal frame carries it
        try beforeSecondCheckpoint(store)
        try store.checkpoint()
        let newest = store.mutex.withLock { store.generation }
        try dev.write(block(seed: 3), at: 0)
        try dev.flush()
        try store.delete("doomed")
        try store.createVolume(name: "w", size: 1 << 20)
        try store.device(named: "w").write(block(seed: 8), at: 0)
        _ = try store.snapshot(volume: "v", name: "s")
        try dev.write(block(seed: 4), at: 8192)
        try dev.write(block(seed: 6), at: 4096)
        try store.resize(volume: "v", size: 2 << 20)
        try store.flush()
        store.abandonWithoutFlush()
        return newest
    }

    /// Every file of the disk with its bytes (an open that only syncs leaves them as they were).
    func fileContents(_ disk: SimulatedDisk) throws -> [String: [UInt8]] {
        var files: [String: [UInt8]] = [:]
        for name in disk.fileNames { files[name] = try disk.directory().openFile(name, create: false).readAll() }
        return files
    }

    /// Where each valid frame of a journal ends.
    func frameEnds(_ disk: SimulatedDisk, _ journal: String) throws -> [Int] {
        let bytes = try disk.directory().openFile(journal, create: false).readAll()
        let generation = UInt64(journal.dropFirst("journal-".count))!
        var end = 0
        return JournalFrame.decodeValidPrefix(bytes, generation: generation).payloads.map {
            end += JournalFrame.bytes(payload: $0.count)
            return end
        }
    }

    /// Everything acknowledged by the scenario, as a list of what is wrong (empty when right).
    func problems(in store: Store) -> [String] {
        var found: [String] = []
        let names = Set(store.list().map(\.name))
        if names.contains("doomed") { found.append("deleted volume 'doomed' is back") }
        for (image, blocks) in Self.expectedBlocks.sorted(by: { $0.key < $1.key }) {
            guard names.contains(image), let dev = try? store.device(named: image) else {
                found.append("\(image) is missing"); continue
            }
            for b in blocks {
                do {
                    if try dev.read(4096, at: b.offset) != block(seed: b.seed) {
                        found.append("\(image) @\(b.offset) does not hold block \(b.seed)")
                    }
                } catch {
                    found.append("\(image) @\(b.offset): read fails (\(error))")
                }
            }
        }
        if let v = try? store.info("v"), v.size != 2 << 20 { found.append("v has size \(v.size), not \(2 << 20)") }
        let fsck = store.fsck()
        if !fsck.isClean { found.append("fsck: \(fsck.problems.prefix(3).joined(separator: "; "))") }
        return found
    }

    func damage(_ disk: SimulatedDisk, newest: UInt64, what: String) {
        if what == "checkpoint" {
            try! damageCommittedRoot(disk, generation: newest)
        } else {
            disk.flipByte(file: "superblock", at: Int(newest % 2) * Store.superblockSlotBytes + 16)
        }
    }

    // MARK: The baseline holds

    /// The claim itself, with control operations in journal-(G+1): read-only and writable opens
    /// see everything, and the read-only open makes no mutating call at all.
    @Test(arguments: ["checkpoint", "superblock"])
    func fallbackWithControlOperationsLosesNothing(damaged: String) throws {
        let disk = SimulatedDisk(seed: 31)
        let newest = try buildScenario(disk)
        damage(disk, newest: newest, what: damaged)
        let callsBefore = disk.mutatingCalls
        let readOnly = try simulatedStore(disk, readOnly: true)
        #expect(problems(in: readOnly) == [])
        try readOnly.close()
        #expect(disk.mutatingCalls == callsBefore)
        let store = try simulatedStore(disk)
        #expect(problems(in: store) == [])
        try store.close()
        let again = try simulatedStore(disk)
        #expect(again.recoveryWarnings.isEmpty)
        #expect(problems(in: again) == [])
        try again.close()
    }

    // MARK: The first checkpoint after a fallback

    /// A fallback open writes nothing but the cut of a torn tail: the damaged generation stays
    /// until the next checkpoint. If that checkpoint fails (a transient EIO, a full disk),
    /// opening again once the fault is gone must still find everything.
    @Test(arguments: [("meta", SimulatedDisk.Call.write), ("superblock", .write), ("", .syncDirectory),
                      ("journal-", .truncate)])
    func failedCheckpointAfterAFallbackLosesNothing(file: String, call: SimulatedDisk.Call) throws {
        let disk = SimulatedDisk(seed: 32)
        let newest = try buildScenario(disk)
        damage(disk, newest: newest, what: "checkpoint")
        let filesBefore = try fileContents(disk)
        let store = try simulatedStore(disk)
        #expect(problems(in: store) == [])
        #expect(try fileContents(disk) == filesBefore, "the fallback open wrote")
        disk.inject(.io("injected EIO"), on: call, filePrefix: file)
        #expect(throws: (any Error).self) { try store.checkpoint() }
        #expect(disk.faultsFired == 1)
        disk.removeInjectedFaults()
        store.abandonWithoutFlush()
        // The process restarts (no power loss): the same disk, opened again.
        let again = try simulatedStore(disk)
        #expect(problems(in: again) == [], "after a failed \(call) of \(file)*: \(again.recoveryWarnings)")
        try again.close()
    }

    /// A power cut at every step of the first checkpoint after a fallback: the next open finds
    /// everything.
    @Test(arguments: ["checkpoint", "superblock"])
    func crashDuringTheCheckpointAfterAFallbackLosesNothing(damaged: String) throws {
        var failures: [String] = []
        var step = 0
        while step < 40 {
            let disk = SimulatedDisk(seed: 33)
            let newest = try buildScenario(disk)
            damage(disk, newest: newest, what: damaged)
            let store = try simulatedStore(disk)
            disk.crashCountdown = step
            if (try? store.checkpoint()) != nil {
                // No crash: the whole checkpoint ran within `step` mutating calls.
                disk.crashCountdown = nil
                #expect(problems(in: store) == [])
                try store.close()
                let again = try simulatedStore(disk)
                #expect(again.recoveryWarnings.isEmpty, "\(again.recoveryWarnings)")
                #expect(problems(in: again) == [])
                try again.close()
                break
            }
            store.abandonWithoutFlush()
            disk.powerLoss()
            disk.reboot()
            do {
                let reopened = try simulatedStore(disk)
                let found = problems(in: reopened)
                if !found.isEmpty { failures.append("crash after \(step) calls: \(found.prefix(4)) warnings \(reopened.recoveryWarnings)") }
                try reopened.close()
            } catch {
                failures.append("crash after \(step) calls: reopen fails: \(error)")
            }
            step += 1
        }
        #expect(step > 3 && step < 40)
        #expect(failures == [])
    }

    /// A second fallback after the first: the first checkpoint after the fallback, new writes,
    /// then that checkpoint is damaged too. Recovery then chains three journals (the fallback
    /// root's, the skipped generation's, the newest) and everything acknowledged is there.
    @Test func secondFallbackAfterTheFirstLosesNothing() throws {
        let disk = SimulatedDisk(seed: 34)
        let newest = try buildScenario(disk)
        damage(disk, newest: newest, what: "checkpoint")
        let first = try simulatedStore(disk)
        #expect(problems(in: first) == [])
        try first.device(named: "w").write(block(seed: 8), at: 8192)
        try first.flush()
        try first.checkpoint()
        let latest = first.mutex.withLock { first.generation }
        try first.device(named: "w").write(block(seed: 9), at: 4096)
        try first.flush()
        first.abandonWithoutFlush()
        damage(disk, newest: latest, what: "checkpoint")
        let second = try simulatedStore(disk)
        #expect(problems(in: second) == [], "warnings: \(second.recoveryWarnings)")
        #expect(second.recoveryWarnings.first?.contains("nothing flushed was lost") == true, "\(second.recoveryWarnings)")
        #expect(try second.device(named: "w").read(4096, at: 8192) == block(seed: 8))
        #expect(try second.device(named: "w").read(4096, at: 4096) == block(seed: 9))
        try second.close()
        let third = try simulatedStore(disk)
        #expect(third.recoveryWarnings.isEmpty)
        #expect(problems(in: third) == [])
        try third.close()
    }

    // MARK: Crashes and failures of ordinary checkpoints, then a fallback

    /// A power cut at every step of checkpoint G+1 (before and after the seal frame, the
    /// checkpoint file, the directory sync, the superblock), then the rest of the scenario, and
    /// then the newest generation is damaged.
    @Test func crashDuringACheckpointThenFallbackLosesNothing() throws {
        var failures: [String] = []
        var step = 0
        while step < 30 {
            let disk = SimulatedDisk(seed: 35)
            let store = try simulatedStore(disk, create: true)
            try store.createVolume(name: "v", size: 1 << 20)
            let dev = try store.device(named: "v")
            try dev.write(block(seed: 1), at: 0)
            try store.checkpoint()
            try dev.write(block(seed: 2), at: 4096)
            try dev.flush()
            try dev.write(block(seed: 5), at: 12288)   // unflushed
            disk.crashCountdown = step
            let crashed: Bool
            do { try store.checkpoint(); crashed = false } catch { crashed = true }
            store.abandonWithoutFlush()
            if crashed { disk.powerLoss() }
            disk.reboot()
            let reopened = try simulatedStore(disk)
            let d = try reopened.device(named: "v")
            let unflushed = try d.read(4096, at: 12288)
            if unflushed != block(seed: 5) && unflushed != [UInt8](repeating: 0, count: 4096) {
                failures.append("step \(step): the unflushed block reads as other data")
            }
            try d.write(block(seed: 5), at: 12288)
            try reopened.checkpoint()
            let newest = reopened.mutex.withLock { reopened.generation }
            try d.write(block(seed: 3), at: 0)
            try d.write(block(seed: 6), at: 4096)
            try d.flush()
            reopened.abandonWithoutFlush()
            damage(disk, newest: newest, what: "checkpoint")
            let store2 = try simulatedStore(disk)
            let d2 = try store2.device(named: "v")
            for (offset, seed) in [(UInt64(0), UInt64(3)), (4096, 6), (12288, 5)] where (try? d2.read(4096, at: offset)) != block(seed: seed) {
                failures.append("step \(step) crashed=\(crashed): @\(offset) lost block \(seed)")
            }
            if !store2.fsck().isClean { failures.append("step \(step): fsck \(store2.fsck().problems.prefix(2))") }
            try store2.close()
            if !crashed { break }
            step += 1
        }
        #expect(step > 3 && step < 30)
        #expect(failures == [])
    }

    /// A checkpoint that fails after its seal frame is durable (EIO writing the checkpoint file:
    /// the store stays writable), then writes and a control operation, then a successful
    /// checkpoint, then a fallback from it.
    @Test(arguments: [("meta", SimulatedDisk.Call.write), ("", .syncDirectory), ("journal-", .truncate)])
    func failedCheckpointThenWritesThenFallbackLosesNothing(file: String, call: SimulatedDisk.Call) throws {
        let disk = SimulatedDisk(seed: 36)
        let newest = try buildScenario(disk) { store in
            disk.inject(.io("injected EIO"), on: call, filePrefix: file)
            #expect(throws: (any Error).self) { try store.checkpoint() }
            #expect(disk.faultsFired == 1)
            // Still writable: the seal frame is in journal-G, and more frames follow it.
            let dev = try store.device(named: "v")
            try dev.write(block(seed: 2), at: 4096)
            try dev.flush()
            try store.createVolume(name: "x", size: 1 << 20)
            try store.delete("x")
        }
        damage(disk, newest: newest, what: "checkpoint")
        let store = try simulatedStore(disk)
        #expect(problems(in: store) == [], "warnings: \(store.recoveryWarnings)")
        #expect(!store.list().map(\.name).contains("x"))
        try store.close()
    }

    /// Damage to the seal frame itself (journal-G's last record frame) together with the newest
    /// checkpoint: the open refuses, and after a repair recovery cannot chain, and must then not
    /// claim that nothing was lost.
    @Test func damagedSealFrameIsNotReportedAsLossless() throws {
        let disk = SimulatedDisk(seed: 37)
        let newest = try buildScenario(disk)
        damage(disk, newest: newest, what: "checkpoint")
        let previous = "journal-\(newest - 1)"
        // The seal frame is the last but one: the marker that covers it follows.
        let frames = try frameEnds(disk, previous)
        disk.flipByte(file: previous, at: frames[frames.count - 2] - 3)   // the seal frame's checksum
        // The marker after the seal frame proves it was synced: damage, not a torn tail.
        #expect {
            _ = try simulatedStore(disk, readOnly: true)
        } throws: { error in
            "\(error)".contains("\(previous) frame \(frames.count - 2) at offset")
        }
        // A repair drops it, so recovery cannot chain: it must not claim that nothing was lost.
        let store = try simulatedStore(disk, repair: { _ in true })
        #expect(!store.recoveryWarnings.isEmpty)
        #expect(!store.recoveryWarnings.contains { $0.contains("nothing flushed was lost") })
        try store.close()
    }

    /// Damage to the previous generation's journal alone: the newest generation does not read it.
    @Test func damagedOlderJournalAloneChangesNothing() throws {
        let disk = SimulatedDisk(seed: 38)
        let newest = try buildScenario(disk)
        disk.flipByte(file: "journal-\(newest - 1)", at: JournalFrame.headerBytes + 2)
        let store = try simulatedStore(disk)
        #expect(store.recoveryWarnings.isEmpty)
        #expect(problems(in: store) == [])
        try store.close()
    }

    /// The older journal damaged before its last frame and the newest checkpoint damaged too: the
    /// fallback cannot be complete, so the open refuses (read-only and writable) and changes nothing.
    @Test func damagedOlderJournalAndCheckpointAreRefusedNotSilentlyDropped() throws {
        let disk = SimulatedDisk(seed: 39)
        // A flushed frame before the seal, so the damaged frame has a valid one after it.
        let newest = try buildScenario(disk) { store in try store.flush() }
        damage(disk, newest: newest, what: "checkpoint")
        disk.flipByte(file: "journal-\(newest - 1)", at: JournalFrame.headerBytes + 2)
        let callsBefore = disk.mutatingCalls
        #expect(throws: StoreError.self) { _ = try simulatedStore(disk, readOnly: true) }
        #expect(throws: StoreError.self) { _ = try simulatedStore(disk) }
        #expect(disk.mutatingCalls == callsBefore)
    }
}
