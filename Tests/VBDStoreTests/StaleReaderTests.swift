import Testing
import VBDCache
import VBDCore
import VBDSimulation
@testable import VBDStore

/// Item 1 of issue 12: a chunk number freed and reused while a reader still holds it must end as
/// a retry or a correct read, never as another volume's bytes.
@Suite struct StaleReaderTests {
    struct Fixture {
        let store: Store
        let hook = RunAtUnlock()
        let t: VolumeDevice
        let w: VolumeDevice

        init(cache: Bool, hash: HashFunction = .xxh3) throws {
            var options = Store.Options()
            options.interleaving = hook
            options.hashFunction = hash
            options.secretForNewStore = 7
            if cache { options.cache = BlockCache(configuration: .init(capacityBytes: 1 << 20, shardCount: 1)) }
            store = try Store(directory: SimulatedDisk(seed: 1).directory(), options: options, create: true)
            _ = try store.createVolume(name: "t", size: 1 << 20)
            _ = try store.createVolume(name: "w", size: 1 << 20)
            t = try store.device(named: "t")
            w = try store.device(named: "w")
        }
    }

    /// The reader's unlock is followed by: `t`'s block 0 overwritten (its chunk freed) and a
    /// new block written to `w`, which gets the freed number (free numbers are reused LIFO).
    func freeAndReuse(_ f: Fixture, rewrite: [UInt8], other: [UInt8]) {
        f.hook.arm {
            try! f.t.write(rewrite, at: 0)
            try! f.w.write(other, at: 0)
        }
    }

    @Test func cachedReadNeverReturnsTheBlockThatReusedItsChunkNumber() throws {
        let f = try Fixture(cache: true)
        let old = block(seed: 1), new = block(seed: 2), other = block(seed: 3)
        try f.t.write(old, at: 0)
        freeAndReuse(f, rewrite: new, other: other)
        var got = [UInt8](repeating: 0, count: 4096)
        let served = got.withUnsafeMutableBytes { f.t.readIfCached(offset: 0, into: $0, zeroBlocksAllowed: true) }
        #expect(f.store.uniqueChunkCount == 2)
        if served != nil {
            let readOtherVolumesBlock = got == other, readOldBlock = got == old
            #expect(!readOtherVolumesBlock, "volume t read volume w's block through the cache")
            #expect(readOldBlock)
        }
    }

    @Test func readNeverReturnsTheBlockThatReusedItsChunkNumber() throws {
        let f = try Fixture(cache: true)
        let old = block(seed: 1), new = block(seed: 2), other = block(seed: 3)
        try f.t.write(old, at: 0)
        freeAndReuse(f, rewrite: new, other: other)
        let got = try f.t.read(4096, at: 0)
        let readOtherVolumesBlock = got == other, readOldOrNewBlock = got == old || got == new
        #expect(!readOtherVolumesBlock, "volume t read volume w's block through the cache")
        #expect(readOldOrNewBlock)
    }

    /// The number and the sectors are both reused (a flush released the sectors) for new
    /// contents of the same block: the reader's entry names the same location, but it is not
    /// the same chunk, so the hash mismatch is a retry, not corruption.
    @Test func reuseOfNumberAndSectorsIsARetryNotCorruption() throws {
        let f = try Fixture(cache: false)
        // t's chunk first, at sector 0; then free space inside the file behind it, so that
        // allocation reuses holes (from sector 0) instead of appending.
        try f.t.write(block(seed: 1), at: 0)
        for b in 0..<16 { try f.w.write(block(seed: 100 + UInt64(b)), at: UInt64(b) * 4096) }
        try f.w.trim(offset: 0, length: 16 * 4096, fua: false)
        try f.store.flush()
        let new = block(seed: 2)
        f.hook.arm {
            try! f.t.trim(offset: 0, length: 4096, fua: false)
            try! f.store.flush()   // the chunk's sectors become free
            try! f.t.write(new, at: 0)
        }
        let got = try f.t.read(4096, at: 0)
        let readNewBlock = got == new
        #expect(readNewBlock)
    }
}

/// Runs `action` at every store-lock release (not re-entrantly) while armed.
final class RunAtEveryUnlock: InterleavingScheduler, @unchecked Sendable {
    var action: (() -> Void)?
    private var running = false
    func acquire(_ lock: ObjectIdentifier) {}
    func tryAcquire(_ lock: ObjectIdentifier) -> Bool? { nil }
    func yield() {}
    func release(_ lock: ObjectIdentifier) {
        guard !running, let action else { return }
        running = true
        action()
        running = false
    }
}

@Suite struct LosingReaderTests {
    /// Every time the reader lets go of the lock, the block it is reading is overwritten (its
    /// chunk freed): the unlocked attempts all lose, and the last one, holding the lock across
    /// its load, returns a version that was written, instead of reporting corruption.
    @Test func aReaderThatKeepsLosingTheRaceStillReadsAWrittenVersion() throws {
        let hook = RunAtEveryUnlock()
        var options = Store.Options()
        options.interleaving = hook
        let store = try Store(directory: SimulatedDisk(seed: 5).directory(), options: options, create: true)
        _ = try store.createVolume(name: "t", size: 1 << 20)
        let t = try store.device(named: "t")
        try t.write(block(seed: 0), at: 0)
        var versions: [[UInt8]] = [block(seed: 0)]
        hook.action = {
            guard versions.count < 50 else { return }
            let next = block(seed: UInt64(versions.count))
            versions.append(next)
            try! t.write(next, at: 0)
        }
        let got = try t.read(4096, at: 0)
        hook.action = nil
        // Each unlocked attempt loses (two unlocks, two overwrites); the locked one ends it.
        #expect(versions.count >= Store.readAttemptsUnlocked)
        #expect(versions.count <= 2 * Store.readAttemptsUnlocked + 1, "\(versions.count) overwrites before the read finished")
        let readAWrittenVersion = versions.contains(got)
        #expect(readAWrittenVersion)
    }
}
