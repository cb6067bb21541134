/// The file interface the store does all its I/O through.
///
/// Two implementations: ``PosixDirectory`` (real files) and the simulator's `SimulatedDirectory`,
/// which on a crash keeps, drops or tears every write that was not yet synced. The store must
/// be correct against the weakest behaviour this interface allows:
///
/// ### Contract
/// 1. `write` returns once the bytes are visible to later `read`s, not once they are durable.
/// 2. `sync` makes every earlier `write`, `truncate` and `punchHole` of that file durable.
/// 3. Unsynced writes may survive a crash whole, partly (any subset of 512-byte sectors) or not at all.
/// 4. Creating and removing a file is durable only after a later `syncDirectory` returns (the
///    directory entry is metadata of the directory, not of the file: fsync(2) on Linux).
/// 5. A failed `sync` may have dropped the unsynced writes, and a later `sync` may then report
///    success without writing them (Linux after a writeback error): the caller must not retry.
/// 6. While the directory's ``StorageDirectory/unsyncedWritesEpoch`` stays the same, every
///    returned `write` survives the death of the process that made it, synced or not (the
///    kernel's page cache holds it); a crash that ends the epoch falls under 3.
public protocol StorageFile: AnyObject {
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError)
    /// Writes `parts` back to back from `offset`: the same as one `write` of their concatenation.
    func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError)
    func sync() throws(StorageError)
    func size() throws(StorageError) -> UInt64
    func truncate(to size: UInt64) throws(StorageError)
    /// Frees the storage of a range; it then reads as zeroes.
    func punchHole(offset: UInt64, length: UInt64) throws(StorageError)
    /// Starts writing a range back to the device, and with `waiting` waits until it is written;
    /// durable only after `sync`. For pacing a large write so that the device's queue holds a
    /// bounded amount of it: a read queued behind it waits for a slice, not for all of it.
    func writeBack(offset: UInt64, length: UInt64, waiting: Bool)
    func close()
}

extension StorageFile {
    /// Storage whose `sync` is the only way to the device: nothing to pace.
    public func writeBack(offset: UInt64, length: UInt64, waiting: Bool) {}
}

public protocol StorageDirectory: AnyObject {
    /// Opens a file, creating it empty when `create` is set and it does not exist.
    func openFile(_ name: String, create: Bool) throws(StorageError) -> any StorageFile
    func fileExists(_ name: String) -> Bool
    func removeFile(_ name: String) throws(StorageError)
    func fileNames() throws(StorageError) -> [String]
    /// Makes every earlier creation and removal of a file in the directory durable.
    func syncDirectory() throws(StorageError)
    /// Takes the single-writer lock; throws `.locked` if another process holds it.
    func lockExclusive() throws(StorageError)
    /// Takes a reader's lock: shared with other readers, refused while a writer holds the store.
    func lockShared() throws(StorageError)
    func unlock()
    /// Human-readable location, for messages.
    var path: String { get }
    /// Names the span in which writes that were not synced outlive the process that made them:
    /// for local files the kernel's boot (its boot_id), since the page cache keeps them until
    /// they are written back; nil where they die with the process (RADOS's asynchronous
    /// operations). Recovery trusts unsynced journal frames only within the epoch that wrote them.
    var unsyncedWritesEpoch: String? { get }
}

public enum StorageError: Error, Equatable, CustomStringConvertible {
    case notFound(String)
    case noSpace
    case locked(String)
    case io(String)
    /// The simulator's power cut: every call after it fails until the store is reopened.
    case crashed

    public var description: String {
        switch self {
        case .notFound(let s): return "not found: \(s)"
        case .noSpace: return "no space left on device"
        case .locked(let s): return s
        case .io(let s): return s
        case .crashed: return "simulated crash"
        }
    }
}

extension StorageFile {
    /// One `write` per part (the simulator's files; a real file gathers them into one system call).
    public func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError) {
        var at = offset
        for part in parts where part.count > 0 {
            try write(part, at: at)
            at += UInt64(part.count)
        }
    }

    /// Reads exactly `buffer.count` bytes or throws; a short read past the end is an I/O error.
    func readExactly(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) {
        var done = 0
        while done < buffer.count {
            let n = try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + UInt64(done))
            if n == 0 { throw .io("short read at offset \(offset + UInt64(done))") }
            done += n
        }
    }

    func readAll() throws(StorageError) -> [UInt8] {
        let n = Int(try size())
        var bytes = [UInt8](repeating: 0, count: n)
        var failure: StorageError?
        bytes.withUnsafeMutableBytes { b in
            do throws(StorageError) { try readExactly(into: b, at: 0) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }
}
