import Foundation
import Synchronization

/// Where the tenancy state (balances, charges, leases, policies, bindings) is persisted.
/// `replace` must be atomic: after a crash the old or the new contents are there, never a mix.
public protocol StateStorage: AnyObject, Sendable {
    func read() throws -> [UInt8]?
    func replace(with bytes: [UInt8]) throws
}

public final class MemoryStateStorage: StateStorage, @unchecked Sendable {
    // @unchecked: every access goes through `lock`.
    private let lock = NSLock()
    private var bytes: [UInt8]?
    public private(set) var writes = 0

    public init(bytes: [UInt8]? = nil) { self.bytes = bytes }
    public func read() throws -> [UInt8]? { lock.withLock { bytes } }
    public func replace(with new: [UInt8]) throws {
        lock.withLock {
            bytes = new
            writes += 1
        }
    }
}

/// A file replaced by write-to-temporary, fsync, rename, fsync of the directory. One replace at a
/// time (`replacing`): two at once shared the temporary file, so one renamed it away under the
/// other (whose rename then failed) or renamed the other's half-written bytes into place.
public final class FileStateStorage: StateStorage, Sendable {
    public let path: String
    private let replacing = Mutex(())

    public struct FileError: Error, CustomStringConvertible {
        public var description: String
    }

    public init(path: String) { self.path = path }

    public func read() throws -> [UInt8]? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FileError(description: "cannot read \(path)")
        }
        return Array(data)
    }

    public func replace(with bytes: [UInt8]) throws {
        try replacing.withLock { _ in try replaceAlone(with: bytes) }
    }

    private func replaceAlone(with bytes: [UInt8]) throws {
        let temporary = path + ".tmp"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o640)
        guard fd >= 0 else { throw FileError(description: "cannot create \(temporary): \(String(cString: strerror(errno)))") }
        var written = 0
        while written < bytes.count {
            let count = bytes.withUnsafeBytes { write(fd, $0.baseAddress! + written, $0.count - written) }
            if count < 0 {
                if errno == EINTR { continue }
                let code = errno
                close(fd)
                throw FileError(description: "write \(temporary): \(String(cString: strerror(code)))")
            }
            written += count
        }
        guard fsync(fd) == 0 else {
            let code = errno
            close(fd)
            throw FileError(description: "fsync \(temporary): \(String(cString: strerror(code)))")
        }
        close(fd)
        guard rename(temporary, path) == 0 else {
            throw FileError(description: "rename to \(path): \(String(cString: strerror(errno)))")
        }
        let directory = (path as NSString).deletingLastPathComponent
        let directoryFD = open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if directoryFD >= 0 {
            fsync(directoryFD)
            close(directoryFD)
        }
    }
}
