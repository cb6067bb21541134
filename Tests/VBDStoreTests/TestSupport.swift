import Foundation
import VBDCore
import VBDSimulation
@testable import VBDStore

/// A fresh temporary store directory, removed when the test ends.
final class TemporaryStoreDirectory {
    let path: String
    init() {
        path = NSTemporaryDirectory() + "vbd-test-" + UUID().uuidString
    }
    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// Bytes the directory's files occupy on disk (`du`), holes excluded.
    var diskUsage: UInt64 {
        var total: UInt64 = 0
        for name in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? [] {
            var st = stat()
            if stat(path + "/" + name, &st) == 0 { total += UInt64(st.st_blocks) * 512 }
        }
        return total
    }
}

/// A block of `size` bytes that compresses roughly 2:1 and is unique per `seed`.
func block(seed: UInt64, size: Int = 4096) -> [UInt8] {
    var g = SplitMix64(seed: seed)
    var out = [UInt8](repeating: 0, count: size)
    var i = 0
    while i < size {
        let v = g.next()
        let run = Int(v & 7) + 1
        let byte = UInt8(truncatingIfNeeded: v >> 8)
        for k in 0..<run where i + k < size { out[i + k] = byte }
        i += run
        if i < size { out[i] = UInt8(truncatingIfNeeded: v >> 16); i += 1 }
    }
    return out
}

extension VolumeDevice {
    func write(_ bytes: [UInt8], at offset: UInt64, fua: Bool = false) throws {
        try bytes.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws in try write(offset: offset, data: b, fua: fua) }
    }
    func read(_ count: Int, at offset: UInt64) throws -> [UInt8] {
        var out = [UInt8](repeating: 0xEE, count: count)
        try out.withUnsafeMutableBytes { (b: UnsafeMutableRawBufferPointer) throws in try read(offset: offset, into: b) }
        return out
    }
}

/// A store on a simulated disk, as the fault tests open it (a fixed secret, a small space reserve).
func simulatedStore(_ disk: SimulatedDisk, create: Bool = false, readOnly: Bool = false,
                    repair: (@Sendable (JournalDamage) -> Bool)? = nil) throws -> Store {
    var options = Store.Options()
    options.secretForNewStore = 7
    options.spaceReserveBytes = 256 << 10
    options.readOnly = readOnly
    options.repairJournal = repair
    return try Store(directory: disk.directory(), options: options, create: create)
}

/// Damages the newest commit the way a damaged checkpoint file used to be: one byte of the
/// page-table root that the superblock slot of `generation` names. The older slot's root (another
/// slot of the page) is intact, so recovery can fall back to it.
func damageCommittedRoot(_ disk: SimulatedDisk, generation: UInt64) throws {
    let superblock = try disk.directory().openFile("superblock", create: false).readAll()
    let at = Int(generation % 2) * Store.superblockSlotBytes
    func u64(_ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(superblock[at + o + $1]) << UInt64(8 * $1) } }
    let page = PageNumber(u64(28)), version = PageVersion(packed: u64(36))
    disk.flipByte(file: "meta", at: Int(MetadataPageFile.slotOffset(page, slot: version.slot)) + 100)
}

/// Runs `action` once, on the calling thread, when a store lock is released for the `n`-th time
/// after `arm(after:_:)` (the next time by default): a chosen point between two phases of a
/// write, or the moment a reader has copied its chunk numbers out and let go of `mutex`.
final class RunAtUnlock: InterleavingScheduler, @unchecked Sendable {
    private var action: (() -> Void)?
    private var remaining = 0
    private var running = false

    func arm(after releases: Int = 1, _ action: @escaping () -> Void) {
        remaining = releases
        self.action = action
    }

    func acquire(_ lock: ObjectIdentifier) {}
    func tryAcquire(_ lock: ObjectIdentifier) -> Bool? { nil }
    func yield() {}
    func release(_ lock: ObjectIdentifier) {
        guard !running, action != nil else { return }
        remaining -= 1
        guard remaining == 0, let action else { return }
        self.action = nil
        running = true
        action()
        running = false
    }
}
