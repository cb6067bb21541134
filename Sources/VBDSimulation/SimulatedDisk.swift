import VBDCore
import VBDStore

// MARK: - Notes on the design
//
// A disk that loses power on command, behind the same `StorageDirectory` interface the real
// store uses (after SQLite's test6.c crash VFS and TigerBeetle's simulated storage). Each file
// keeps the bytes that are durable and the operations since its last sync. On a crash every
// unsynced operation, independently and in order, is kept, dropped, or (for writes and
// punches) torn: an arbitrary subset of its 512-byte sectors lands. Creating or removing a file
// is durable only once the directory is synced (`syncDirectory`), as with fsync(2) on Linux: a
// crash before that drops a created file and brings a removed one back.
// A crash can also be scheduled after the N-th mutating call, so it can strike between any two
// steps of a flush or checkpoint: that call and every later one fail with `.crashed`.
// Two kinds of crash: a power cut (the above; the machine boots again, so the disk's epoch
// changes) and a kill of the process, after which the disk holds every write the process made,
// synced or not, in the same epoch: the page cache outlives the process. A disk made with
// `unsyncedWritesSurviveProcess: false` models storage whose unsynced writes die with the
// process (RADOS): a kill then loses them as a power cut does, and the disk names no epoch.
//
// Faults short of a crash: `inject` makes chosen calls fail with EIO or ENOSPC, a failed sync
// may drop the file's unsynced writes while reporting success on the next sync (what Linux
// does after a writeback error), so a store that retries the sync acknowledges lost data;
// `spaceBytesMax` makes the disk fill up, and `flipByte` corrupts bytes at rest.

public final class SimulatedDisk {
    final class File {
        var durable: [UInt8] = []
        var current: [UInt8] = []
        var unsynced: [Operation] = []
        /// Its directory entry survives a crash (created before the last directory sync).
        var entryIsDurable = false
        /// 512-byte sectors inside the file that hold no storage (punched, or never written).
        var holes = Set<Int>()

        var sectorCount: Int { (current.count + 511) / 512 }
        var allocatedBytes: Int { (sectorCount - holes.count) * 512 }

        /// Sectors a write of `[offset, offset+length)` would newly allocate.
        func sectorsAllocated(writing offset: Int, length: Int) -> Int {
            guard length > 0 else { return 0 }
            let first = offset / 512, last = (offset + length - 1) / 512
            // Sectors skipped over past the end become holes and take no storage.
            let beyond = max(0, last + 1 - max(sectorCount, first))
            return beyond + holes.filter { $0 >= first && $0 <= last }.count
        }

        func noteWrite(offset: Int, length: Int) {
            guard length > 0 else { return }
            let oldSectors = sectorCount
            let first = offset / 512, last = (offset + length - 1) / 512
            if first > oldSectors { for k in oldSectors..<first { holes.insert(k) } }
            for k in first...last { holes.remove(k) }
        }

        func noteTruncate(to size: Int) {
            let oldSectors = sectorCount, newSectors = (size + 511) / 512
            if newSectors < oldSectors { holes = holes.filter { $0 < newSectors } }
            else if newSectors > oldSectors { for k in oldSectors..<newSectors { holes.insert(k) } }
        }

        func notePunch(offset: Int, length: Int) {
            let first = (offset + 511) / 512, end = min((offset + length) / 512, sectorCount)
            if first < end { for k in first..<end { holes.insert(k) } }
        }
    }

    /// The calls a fault can be injected into.
    public enum Call: Sendable, Equatable, CaseIterable { case read, write, sync, truncate, punch, create, syncDirectory }

    /// A fault waiting for its call: `error` on the next `count` calls of `call` on files whose
    /// name starts with `filePrefix`.
    struct Fault {
        var call: Call
        var filePrefix: String
        var error: StorageError
        var count: Int
        var dropsUnsyncedWrites: Bool
    }

    enum Operation {
        case write(offset: Int, bytes: [UInt8])
        case truncate(Int)
        case punch(offset: Int, length: Int)
    }

    var files: [String: File] = [:]
    /// Removed since the last directory sync: a crash brings them back.
    var removedBeforeDirectorySync: [String: File] = [:]
    var faults: [Fault] = []
    /// Injected faults that have fired so far.
    public private(set) var faultsFired = 0
    /// Total file bytes the disk holds; a write or truncate beyond it fails with ENOSPC.
    public var spaceBytesMax: Int?
    var rng: SimulationRandom
    var locked = false
    var readers = 0
    public private(set) var isCrashed = false
    /// Mutating calls left before the scheduled crash; nil = none scheduled.
    public var crashCountdown: Int?
    /// What the scheduled crash is.
    public var scheduledCrash = Crash.powerLoss
    public enum Crash: Sendable, Equatable { case powerLoss, processKill }
    /// The last crash, until the next one.
    public private(set) var lastCrash: Crash?
    /// Counts boots: a power cut starts a new one (the store's `unsyncedWritesEpoch`).
    public private(set) var boot = 1
    /// Whether unsynced writes outlive the process that made them (local files) or not (RADOS).
    public let unsyncedWritesSurviveProcess: Bool
    public private(set) var mutatingCalls = 0

    public init(seed: UInt64, unsyncedWritesSurviveProcess: Bool = true) {
        rng = SimulationRandom(seed: seed ^ 0xD15C)
        self.unsyncedWritesSurviveProcess = unsyncedWritesSurviveProcess
    }

    /// A directory view of this disk for one `Store`.
    public func directory() -> any StorageDirectory { SimulatedDirectory(disk: self) }

    /// Makes the next `count` calls of `call` on files named `filePrefix...` fail with `error`.
    /// With `dropsUnsyncedWrites` a failing sync also forgets the file's unsynced writes (Linux
    /// marks the pages clean after a writeback error; once evicted, reads see the disk again):
    /// they are lost, and the next sync succeeds without them.
    public func inject(_ error: StorageError, on call: Call, filePrefix: String = "", count: Int = 1,
                       dropsUnsyncedWrites: Bool = false) {
        faults.append(Fault(call: call, filePrefix: filePrefix, error: error, count: count, dropsUnsyncedWrites: dropsUnsyncedWrites))
    }

    public func removeInjectedFaults() { faults = [] }

    /// Arms one fault drawn from `rng`: EIO or ENOSPC on a read, write, sync, truncate, punch,
    /// create or directory sync of the data file, a journal, a checkpoint or the superblock;
    /// a failing sync drops the file's unsynced writes half of the time (Linux's behaviour).
    public func injectRandomFault(using rng: inout SimulationRandom) {
        let call = Call.allCases[rng.below(Call.allCases.count)]
        let file = ["data", "journal-", "meta", "superblock", ""][rng.below(5)]
        let error: StorageError = (call == .write || call == .truncate) && rng.chance(50) ? .noSpace : .io("injected EIO")
        inject(error, on: call, filePrefix: file, count: 1 + rng.below(2),
               dropsUnsyncedWrites: call == .sync && rng.chance(50))
    }

    /// Throws the injected fault for this call, if one is armed.
    func injectedFault(_ call: Call, file name: String, _ file: File?) throws(StorageError) {
        guard let k = faults.firstIndex(where: { $0.call == call && name.hasPrefix($0.filePrefix) }) else { return }
        let fault = faults[k]
        if fault.count <= 1 { faults.remove(at: k) } else { faults[k].count -= 1 }
        faultsFired += 1
        if fault.dropsUnsyncedWrites, let file {
            // The dirty pages are gone (marked clean, then evicted): the file is what the disk holds.
            file.current = file.durable
            file.unsynced = []
        }
        throw fault.error
    }

    /// Bytes held by all files (a removed file's bytes stay until the directory sync).
    public var bytesHeld: Int {
        files.values.reduce(0) { $0 + $1.allocatedBytes } + removedBeforeDirectorySync.values.reduce(0) { $0 + $1.allocatedBytes }
    }

    /// ENOSPC when `sectors` more sectors would pass `spaceBytesMax`.
    func reserve(sectors: Int) throws(StorageError) {
        if let max = spaceBytesMax, sectors > 0, bytesHeld + sectors * 512 > max { throw .noSpace }
    }

    func mutating() throws(StorageError) {
        if isCrashed { throw .crashed }
        mutatingCalls += 1
        if let n = crashCountdown {
            if n <= 0 {
                if scheduledCrash == .processKill { processKill() } else { powerLoss() }
                throw .crashed
            }
            crashCountdown = n - 1
        }
    }

    /// Cuts the power: unsynced operations are kept, dropped or torn at random, and the machine
    /// boots again (a new epoch).
    public func powerLoss() {
        loseUnsyncedOperations()
        boot += 1
        lastCrash = .powerLoss
        isCrashed = true
        locked = false
        readers = 0
    }

    /// Kills the process using the disk: every call of it fails from now on and its lock goes.
    /// On local files the disk keeps all it wrote, synced or not (nothing becomes durable that
    /// was not); where unsynced writes die with the process they are lost as in a power cut.
    public func processKill() {
        if !unsyncedWritesSurviveProcess { loseUnsyncedOperations() }
        lastCrash = .processKill
        isCrashed = true
        locked = false
        readers = 0
    }

    /// Each unsynced operation is kept, dropped or torn at random; directory changes since the
    /// last directory sync are undone.
    func loseUnsyncedOperations() {
        // Directory changes since the last directory sync are undone first.
        for (name, file) in files where !file.entryIsDurable { files[name] = nil }
        for (name, file) in removedBeforeDirectorySync { files[name] = file }
        removedBeforeDirectorySync = [:]
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
            file.holes = file.holes.filter { $0 < file.sectorCount }
        }
    }

    /// Power is back, or a new process starts after a kill: the disk holds what survived; a new
    /// store may open it.
    public func reboot() {
        isCrashed = false
        crashCountdown = nil
        scheduledCrash = .powerLoss
        locked = false
        readers = 0
    }

    /// Corrupts one byte of a file (bit rot), durably.
    public func flipByte(file name: String, at offset: Int) {
        guard let f = files[name], offset < f.current.count else { return }
        f.current[offset] ^= 0x5A
        if offset < f.durable.count { f.durable[offset] ^= 0x5A }
    }

    public var fileNames: [String] { files.keys.sorted() }
    public func size(of name: String) -> Int { files[name]?.current.count ?? 0 }
}

final class SimulatedDirectory: StorageDirectory {
    let disk: SimulatedDisk
    var holdsLock = false
    var holdsSharedLock = false
    init(disk: SimulatedDisk) { self.disk = disk }

    var path: String { "sim:" }
    var unsyncedWritesEpoch: String? { disk.unsyncedWritesSurviveProcess ? "sim-boot-\(disk.boot)" : nil }

    func openFile(_ name: String, create: Bool) throws(StorageError) -> any StorageFile {
        if disk.isCrashed { throw .crashed }
        if disk.files[name] == nil {
            guard create else { throw .notFound(name) }
            try disk.injectedFault(.create, file: name, nil)
            disk.files[name] = SimulatedDisk.File()
        }
        return SimulatedFile(disk: disk, file: disk.files[name]!, name: name)
    }

    func fileExists(_ name: String) -> Bool { disk.files[name] != nil }

    func removeFile(_ name: String) throws(StorageError) {
        if disk.isCrashed { throw .crashed }
        guard let file = disk.files.removeValue(forKey: name) else { return }
        // A file whose creation was never made durable just vanishes; an older one of that
        // name (removed before the same sync) is already remembered.
        if file.entryIsDurable && disk.removedBeforeDirectorySync[name] == nil {
            disk.removedBeforeDirectorySync[name] = file
        }
    }

    func syncDirectory() throws(StorageError) {
        try disk.mutating()
        try disk.injectedFault(.syncDirectory, file: "", nil)
        for file in disk.files.values { file.entryIsDurable = true }
        disk.removedBeforeDirectorySync = [:]
    }

    func fileNames() throws(StorageError) -> [String] { disk.fileNames }

    func lockExclusive() throws(StorageError) {
        if disk.locked || disk.readers > 0 { throw .locked("store is in use by another process") }
        disk.locked = true
        holdsLock = true
    }

    func lockShared() throws(StorageError) {
        if disk.locked { throw .locked("store is in use by another process") }
        disk.readers += 1
        holdsSharedLock = true
    }

    func unlock() {
        if holdsLock && !disk.isCrashed { disk.locked = false }
        if holdsSharedLock && disk.readers > 0 { disk.readers -= 1 }
        holdsLock = false
        holdsSharedLock = false
    }
}

final class SimulatedFile: StorageFile {
    let disk: SimulatedDisk
    let file: SimulatedDisk.File
    let name: String
    var isClosed = false

    init(disk: SimulatedDisk, file: SimulatedDisk.File, name: String) {
        self.disk = disk
        self.file = file
        self.name = name
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        if disk.isCrashed { throw .crashed }
        try disk.injectedFault(.read, file: name, file)
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
        try disk.injectedFault(.write, file: name, file)
        let o = Int(offset)
        if disk.spaceBytesMax != nil { try disk.reserve(sectors: file.sectorsAllocated(writing: o, length: bytes.count)) }
        file.noteWrite(offset: o, length: bytes.count)
        if file.current.count < o + bytes.count {
            file.current.append(contentsOf: repeatElement(0, count: o + bytes.count - file.current.count))
        }
        file.current.replaceSubrange(o..<o + bytes.count, with: bytes)
        file.unsynced.append(.write(offset: o, bytes: Array(bytes)))
    }

    func sync() throws(StorageError) {
        try disk.mutating()
        try disk.injectedFault(.sync, file: name, file)
        file.durable = file.current
        file.unsynced = []
    }

    func size() throws(StorageError) -> UInt64 {
        if disk.isCrashed { throw .crashed }
        return UInt64(file.current.count)
    }

    func truncate(to size: UInt64) throws(StorageError) {
        try disk.mutating()
        try disk.injectedFault(.truncate, file: name, file)
        let s = Int(size)
        file.noteTruncate(to: s)
        if s < file.current.count { file.current.removeSubrange(s...) } else {
            file.current.append(contentsOf: repeatElement(0, count: s - file.current.count))
        }
        file.unsynced.append(.truncate(s))
    }

    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) {
        try disk.mutating()
        try disk.injectedFault(.punch, file: name, file)
        let o = Int(offset), e = min(Int(offset + length), file.current.count)
        if o < e { for k in o..<e { file.current[k] = 0 } }
        file.notePunch(offset: o, length: Int(length))
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
