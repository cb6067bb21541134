import VBDCore
import VBDStore

// MARK: - Notes on the design
//
// A disk that loses power on command, behind the same `StorageDirectory` interface the real
// store uses (after SQLite's test6.c crash VFS and TigerBeetle's simulated storage). Each file
// keeps the bytes that are durable and the operations since its last sync. On a crash every
// unsynced operation, independently and in order, is kept, dropped, or (for writes and
// punches) torn: an arbitrary subset of its 512-byte sectors lands. Creating and removing files
// is durable at once, as on a journaling file system (the store never depends on their order).
// A crash can also be scheduled after the N-th mutating call, so it can strike between any two
// steps of a flush or checkpoint: that call and every later one fail with `.crashed`.

public final class SimulatedDisk {
    final class File {
        var durable: [UInt8] = []
        var current: [UInt8] = []
        var unsynced: [Operation] = []
    }

    enum Operation {
        case write(offset: Int, bytes: [UInt8])
        case truncate(Int)
        case punch(offset: Int, length: Int)
    }

    var files: [String: File] = [:]
    var rng: SimulationRandom
    var locked = false
    public private(set) var isCrashed = false
    /// Mutating calls left before the scheduled crash; nil = none scheduled.
    public var crashCountdown: Int?
    public private(set) var mutatingCalls = 0

    public init(seed: UInt64) {
        rng = SimulationRandom(seed: seed ^ 0xD15C)
    }

    /// A directory view of this disk for one `Store`.
    public func directory() -> any StorageDirectory { SimulatedDirectory(disk: self) }

    func mutating() throws(StorageError) {
        if isCrashed { throw .crashed }
        mutatingCalls += 1
        if let n = crashCountdown {
            if n <= 0 { powerLoss(); throw .crashed }
            crashCountdown = n - 1
        }
    }

    /// Cuts the power: unsynced operations are kept, dropped or torn at random.
    public func powerLoss() {
        for file in files.values {
            var bytes = file.durable
            for op in file.unsynced {
                let fate = rng.next() % 3   // 0 keep, 1 drop, 2 tear
                if fate == 1 { continue }
                switch op {
                case let .write(offset, data):
                    if bytes.count < offset + data.count { bytes.append(contentsOf: repeatElement(0, count: offset + data.count - bytes.count)) }
                    var s = 0
                    while s < data.count {
                        let e = min(s + 512, data.count)
                        if fate == 0 || rng.next() % 2 == 0 { bytes.replaceSubrange(offset + s..<offset + e, with: data[s..<e]) }
                        s = e
                    }
                case let .truncate(size):
                    if size < bytes.count { bytes.removeSubrange(size...) } else { bytes.append(contentsOf: repeatElement(0, count: size - bytes.count)) }
                case let .punch(offset, length):
                    var s = offset
                    while s < min(offset + length, bytes.count) {
                        let e = min(s + 512, offset + length, bytes.count)
                        if fate == 0 || rng.next() % 2 == 0 { for k in s..<e { bytes[k] = 0 } }
                        s = e
                    }
                }
            }
            file.durable = bytes
            file.current = bytes
            file.unsynced = []
        }
        isCrashed = true
        locked = false
    }

    /// Power is back: the disk holds what survived; a new store may open it.
    public func reboot() {
        isCrashed = false
        crashCountdown = nil
        locked = false
    }

    /// Corrupts one byte of a file (bit rot), durably.
    public func flipByte(file name: String, at offset: Int) {
        guard let f = files[name], offset < f.current.count else { return }
        f.current[offset] ^= 0x5A
        f.durable = f.current.count == f.durable.count ? f.current : f.durable
    }

    public var fileNames: [String] { files.keys.sorted() }
    public func size(of name: String) -> Int { files[name]?.current.count ?? 0 }
}

final class SimulatedDirectory: StorageDirectory {
    let disk: SimulatedDisk
    var holdsLock = false
    init(disk: SimulatedDisk) { self.disk = disk }

    var path: String { "sim:" }

    func openFile(_ name: String, create: Bool) throws(StorageError) -> any StorageFile {
        if disk.isCrashed { throw .crashed }
        if disk.files[name] == nil {
            guard create else { throw .notFound(name) }
            disk.files[name] = SimulatedDisk.File()
        }
        return SimulatedFile(disk: disk, file: disk.files[name]!)
    }

    func fileExists(_ name: String) -> Bool { disk.files[name] != nil }

    func removeFile(_ name: String) throws(StorageError) {
        if disk.isCrashed { throw .crashed }
        disk.files[name] = nil
    }

    func fileNames() throws(StorageError) -> [String] { disk.fileNames }

    func lockExclusive() throws(StorageError) {
        if disk.locked { throw .locked("store is in use by another process") }
        disk.locked = true
        holdsLock = true
    }

    func unlock() {
        if holdsLock && !disk.isCrashed { disk.locked = false }
        holdsLock = false
    }
}

final class SimulatedFile: StorageFile {
    let disk: SimulatedDisk
    let file: SimulatedDisk.File
    var isClosed = false

    init(disk: SimulatedDisk, file: SimulatedDisk.File) {
        self.disk = disk
        self.file = file
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        if disk.isCrashed { throw .crashed }
        let o = Int(offset)
        guard o < file.current.count else { return 0 }
        let n = min(buffer.count, file.current.count - o)
        file.current.withUnsafeBytes { src in
            buffer.baseAddress!.copyMemory(from: src.baseAddress! + o, byteCount: n)
        }
        return n
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        try disk.mutating()
        let o = Int(offset)
        if file.current.count < o + bytes.count {
            file.current.append(contentsOf: repeatElement(0, count: o + bytes.count - file.current.count))
        }
        file.current.replaceSubrange(o..<o + bytes.count, with: bytes)
        file.unsynced.append(.write(offset: o, bytes: Array(bytes)))
    }

    func sync() throws(StorageError) {
        try disk.mutating()
        file.durable = file.current
        file.unsynced = []
    }

    func size() throws(StorageError) -> UInt64 {
        if disk.isCrashed { throw .crashed }
        return UInt64(file.current.count)
    }

    func truncate(to size: UInt64) throws(StorageError) {
        try disk.mutating()
        let s = Int(size)
        if s < file.current.count { file.current.removeSubrange(s...) } else {
            file.current.append(contentsOf: repeatElement(0, count: s - file.current.count))
        }
        file.unsynced.append(.truncate(s))
    }

    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) {
        try disk.mutating()
        let o = Int(offset), e = min(Int(offset + length), file.current.count)
        if o < e { for k in o..<e { file.current[k] = 0 } }
        file.unsynced.append(.punch(offset: o, length: Int(length)))
    }

    func close() { isClosed = true }
}

/// The simulation's random source: ``SplitMix64`` plus the draws a fault schedule needs.
public struct SimulationRandom: RandomNumberGenerator {
    var generator: SplitMix64
    public init(seed: UInt64) { generator = SplitMix64(seed: seed) }
    public mutating func next() -> UInt64 { generator.next() }
    public mutating func below(_ n: Int) -> Int { Int(next() % UInt64(max(n, 1))) }
    public mutating func chance(_ percent: Int) -> Bool { below(100) < percent }
}
