import VBDCore
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// The check after a real power cut (IntegrationTests/test-power-cut.sh): the store written by
/// `CrashWriter` inside a QEMU guest lost power; this runs in the next boot of that guest, opens the
/// store, checks that every write a flush acknowledged is there, and runs fsck.
///
/// The floors carry what must survive from one cut to the next. They live on a raw device of their
/// own (not on the disk under test), as `CrashWriter.blocks` little-endian UInt64: for each block the
/// oldest sequence number it may hold, 0 for none. Sequence numbers start at 10,000,000, so 0 is free.
public enum PowerCutCheck {
    public struct Outcome: Sendable {
        public var problems: [String] = []
        public var blocksWithData = 0
        public var blocksRequired = 0
        /// Blocks holding a write newer than any flush acknowledged: the cut came mid-stream.
        public var unflushedSurvivors = 0
        public var fsckProblems = 0
        public var passed: Bool { problems.isEmpty }
    }

    static var floorsSize: Int { CrashWriter.blocks * 8 }

    public static func readFloors(path: String) throws -> [UInt64] {
        var bytes = [UInt8](repeating: 0, count: floorsSize)
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw PowerCutError("cannot open floors \(path): errno \(errno)") }
        defer { close(fd) }
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, floorsSize, 0) }
        guard n == floorsSize else { throw PowerCutError("short read of floors \(path): \(n) of \(floorsSize) bytes") }
        return (0..<CrashWriter.blocks).map { b in
            bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: b * 8, as: UInt64.self)) }
        }
    }

    public static func writeFloors(_ floors: [UInt64], path: String) throws {
        var bytes = [UInt8](repeating: 0, count: floorsSize)
        for (b, f) in floors.enumerated() {
            withUnsafeBytes(of: f.littleEndian) { bytes.replaceSubrange(b * 8..<b * 8 + 8, with: $0) }
        }
        let fd = open(path, O_WRONLY)
        guard fd >= 0 else { throw PowerCutError("cannot open floors \(path) for writing: errno \(errno)") }
        defer { close(fd) }
        let n = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, floorsSize, 0) }
        guard n == floorsSize else { throw PowerCutError("short write of floors \(path): \(n) of \(floorsSize) bytes") }
        // The next cut may come before the guest powers off cleanly: the floors must be on the host file now.
        guard fsync(fd) == 0 else { throw PowerCutError("fsync of floors \(path) failed: errno \(errno)") }
    }

    /// Raises the floors by the writes `first...lastFlushed` that a flush acknowledged before the cut.
    public static func raise(_ floors: inout [UInt64], first: UInt64, lastFlushed: UInt64) {
        guard lastFlushed >= first else { return }
        for s in first...lastFlushed {
            let b = Int(s % UInt64(CrashWriter.blocks))
            floors[b] = max(floors[b], s)
        }
    }

    /// Checks every block of the reopened store against `floors`, then raises each floor to what
    /// survived (a recovered write, flushed or not, is what clients may have read since) and runs fsck.
    public static func check(store: Store, floors: inout [UInt64]) throws -> Outcome {
        var outcome = Outcome()
        let device = try store.device(named: CrashWriter.volume)
        for b in 0..<CrashWriter.blocks {
            if floors[b] != 0 { outcome.blocksRequired += 1 }
            var bytes = [UInt8](repeating: 0, count: 4096)
            try bytes.withUnsafeMutableBytes { (p: UnsafeMutableRawBufferPointer) throws in
                try device.read(offset: UInt64(b * 4096), into: p)
            }
            if bytes.allSatisfy({ $0 == 0 }) {
                if floors[b] != 0 { outcome.problems.append("block \(b) reads as zeroes, lost flushed write \(floors[b])") }
                continue
            }
            outcome.blocksWithData += 1
            guard let s = CrashWriter.sequence(in: bytes) else {
                outcome.problems.append("block \(b) holds bytes no write wrote (torn or mixed)")
                continue
            }
            if s % UInt64(CrashWriter.blocks) != UInt64(b) {
                outcome.problems.append("block \(b) holds write \(s), which went to block \(s % UInt64(CrashWriter.blocks))")
            } else if s < floors[b] {
                outcome.problems.append("block \(b) holds write \(s), older than flushed write \(floors[b])")
            } else {
                if s > floors[b] { outcome.unflushedSurvivors += 1 }
                floors[b] = s
            }
        }
        let report = store.fsck()
        outcome.fsckProblems = report.problems.count
        outcome.problems += report.problems.prefix(10).map { "fsck: \($0)" }
        return outcome
    }

    /// The guest's verify step: prints `power-cut verify: PASS ...` or `power-cut verify: FAIL ...`
    /// lines on the console and returns whether it passed; the floors are updated only on a pass.
    public static func run(storePath: String, floorsPath: String, previousFirst: UInt64, previousFlushed: UInt64) throws -> Bool {
        var floors = try readFloors(path: floorsPath)
        raise(&floors, first: previousFirst, lastFlushed: previousFlushed)
        let store = try Store.open(path: storePath)
        let outcome = try check(store: store, floors: &floors)
        try store.close()
        let summary = "\(outcome.blocksRequired) blocks with a flushed write required, \(outcome.blocksWithData) hold data, "
            + "\(outcome.unflushedSurvivors) hold a newer unflushed write, "
            + "fsck \(outcome.fsckProblems == 0 ? "clean" : "found \(outcome.fsckProblems) problems") "
            + "(writes \(previousFirst)...\(previousFlushed) acknowledged by a flush before the cut)"
        if outcome.passed {
            try writeFloors(floors, path: floorsPath)
            print("power-cut verify: PASS \(summary)")
        } else {
            for p in outcome.problems.prefix(20) { print("power-cut verify: problem: \(p)") }
            print("power-cut verify: FAIL \(outcome.problems.count) problems; \(summary)")
        }
        fflush(nil)
        return outcome.passed
    }
}

public struct PowerCutError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}
