import Foundation
import Testing
import VBDCore
import VBDSimulation
@testable import VBDStore

/// `Store.writeWithoutBlocking`, which event loops call for small writes: it writes exactly what
/// `write` would, or returns false having changed nothing visible.
@Suite struct WriteWithoutBlockingTests {
    private func attempt(_ device: VolumeDevice, _ bytes: [UInt8], at offset: UInt64) throws -> Bool {
        try bytes.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws(BlockDeviceError) -> Bool in
            try device.writeWithoutBlocking(offset: offset, data: b)
        }
    }

    @Test func smallAlignedWritesAreDoneAndReadBackAndDeduplicated() throws {
        let store = try simulatedStore(SimulatedDisk(seed: 1), create: true)
        _ = try store.createVolume(name: "a", size: 1 << 20)
        let a = try store.device(named: "a")
        let data = block(seed: 1) + block(seed: 2) + block(seed: 3) + block(seed: 4)
        #expect(try attempt(a, data, at: 8192))
        #expect(try a.read(data.count, at: 8192) == data)
        #expect(try attempt(a, block(seed: 1), at: 0), "a duplicate of a stored block")
        #expect(try store.usage().uniqueChunks == 4, "the duplicate shares its chunk")
        try store.flush()
        #expect(store.fsck().isClean)
    }

    @Test func refusesWhatCouldBlockOrFailAndChangesNothing() throws {
        var options = Store.Options()
        options.pendingJournalBytesMax = 64 << 10
        let store = try Store(directory: SimulatedDisk(seed: 2).directory(), options: options, create: true)
        _ = try store.createVolume(name: "a", size: 1 << 20)
        let a = try store.device(named: "a")
        try a.write(block(seed: 9), at: 0)
        _ = try store.snapshot(volume: "a", name: "s")
        let snapshot = try store.device(named: "a@s")
        let before = try a.read(1 << 20, at: 0)
        let big = [UInt8](repeating: 7, count: Store.writeWithoutBlockingBytesMax + 4096)
        #expect(try !attempt(a, big, at: 0), "larger than the limit")
        #expect(try !attempt(a, [UInt8](repeating: 7, count: 4096), at: 512), "unaligned: a read-modify-write")
        #expect(try !attempt(a, [UInt8](repeating: 7, count: 1000), at: 0), "part of a block")
        #expect(try !attempt(a, block(seed: 5), at: 1 << 20), "past the end: the ordinary write reports it")
        #expect(try !attempt(snapshot, block(seed: 5), at: 0), "a read-only snapshot")
        #expect(try a.read(1 << 20, at: 0) == before)

        // The store lock held by another thread for longer than the wait: nothing is done.
        let held = DispatchSemaphore(value: 0), release = DispatchSemaphore(value: 0)
        let holder = Thread {
            store.mutex.lock()
            held.signal()
            release.wait()
            store.mutex.unlock()
        }
        holder.start()
        held.wait()
        let whileHeld = try attempt(a, block(seed: 6), at: 0)
        release.signal()
        #expect(!whileHeld, "a busy store lock")
        #expect(try a.read(4096, at: 0) == block(seed: 9))

        // A journal due for a flush: the ordinary write flushes, so this one declines.
        var k: UInt64 = 0
        while store.unflushedJournalBytes < options.pendingJournalBytesMax {
            #expect(try attempt(a, block(seed: 100 + k), at: (k % 256) * 4096))
            k += 1
        }
        #expect(try !attempt(a, block(seed: 7), at: 0))
        #expect(try a.read(4096, at: 0) != block(seed: 7))
        try a.write(block(seed: 7), at: 0)
        #expect(store.unflushedJournalBytes < options.pendingJournalBytesMax, "the ordinary write flushed")
        #expect(try attempt(a, block(seed: 8), at: 0))
        try store.flush()
        #expect(store.fsck().isClean)
    }
}
