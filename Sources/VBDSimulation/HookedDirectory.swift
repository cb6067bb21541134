import VBDStore

/// A file operation about to run through a ``HookedDirectory``.
public enum FileOperation: Sendable, Equatable {
    case open, remove, read, write, sync, size, truncate, punchHole, writeBack, syncDirectory
}

/// A `StorageDirectory` that calls `before` ahead of every operation on it or its files, then
/// passes the operation on. The concurrency simulator makes every file operation a scheduling
/// point with it; tests use it to run something at an exact moment (during a hole punch, say).
public final class HookedDirectory: StorageDirectory {
    let base: any StorageDirectory
    let before: (_ file: String, _ operation: FileOperation) -> Void

    public init(_ base: any StorageDirectory, before: @escaping (_ file: String, _ operation: FileOperation) -> Void) {
        self.base = base
        self.before = before
    }

    public func openFile(_ name: String, create: Bool) throws(StorageError) -> any StorageFile {
        before(name, .open)
        return HookedFile(try base.openFile(name, create: create), name: name, before: before)
    }
    public func fileExists(_ name: String) -> Bool { base.fileExists(name) }
    public func removeFile(_ name: String) throws(StorageError) { before(name, .remove); try base.removeFile(name) }
    public func fileNames() throws(StorageError) -> [String] { try base.fileNames() }
    public func syncDirectory() throws(StorageError) { before(".", .syncDirectory); try base.syncDirectory() }
    public func lockExclusive() throws(StorageError) { try base.lockExclusive() }
    public func lockShared() throws(StorageError) { try base.lockShared() }
    public func unlock() { base.unlock() }
    public var path: String { base.path }
    public var unsyncedWritesEpoch: String? { base.unsyncedWritesEpoch }
}

final class HookedFile: StorageFile {
    let base: any StorageFile
    let name: String
    let before: (String, FileOperation) -> Void

    init(_ base: any StorageFile, name: String, before: @escaping (String, FileOperation) -> Void) {
        self.base = base
        self.name = name
        self.before = before
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        before(name, .read)
        return try base.read(into: buffer, at: offset)
    }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        before(name, .write)
        try base.write(bytes, at: offset)
    }
    func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError) {
        before(name, .write)
        try base.write(gathering: parts, at: offset)
    }
    func sync() throws(StorageError) { before(name, .sync); try base.sync() }
    func size() throws(StorageError) -> UInt64 { before(name, .size); return try base.size() }
    func truncate(to size: UInt64) throws(StorageError) { before(name, .truncate); try base.truncate(to: size) }
    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) {
        before(name, .punchHole)
        try base.punchHole(offset: offset, length: length)
    }
    func writeBack(offset: UInt64, length: UInt64, waiting: Bool) {
        before(name, .writeBack)
        base.writeBack(offset: offset, length: length, waiting: waiting)
    }
    func close() { base.close() }
}
