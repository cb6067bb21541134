#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CVBDSys

/// Real files under a directory. The only file in the store that calls the C library.
public final class PosixDirectory: StorageDirectory {
    public let path: String
    private var lockDescriptor: Int32 = -1
    private var wrotePidFile = false

    public init(path: String, create: Bool) throws(StorageError) {
        self.path = path
        var st = stat()
        if stat(path, &st) != 0 {
            guard create else { throw .notFound("no store at \(path)") }
            if mkdir(path, 0o755) != 0 { throw .io("cannot create \(path): \(String(cString: strerror(errno)))") }
        } else if (st.st_mode & S_IFMT) != S_IFDIR {
            throw .io("\(path) is not a directory")
        }
    }

    deinit { unlock() }

    /// The kernel's boot id: a process killed on this boot left its unsynced writes in the page
    /// cache, where the next process of the same boot reads them.
    public var unsyncedWritesEpoch: String? { PosixDirectory.bootID }

    /// Read once: it changes only with a reboot. Nil when /proc is not mounted (then unsynced
    /// frames are never trusted, which is what a power cut needs).
    static let bootID: String? = {
        guard let f = fopen("/proc/sys/kernel/random/boot_id", "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 64)
        guard fgets(&line, Int32(line.count), f) != nil else { return nil }
        let id = String(cString: line).trimmingNewline
        return id.isEmpty ? nil : "boot:" + id
    }()

    public func openFile(_ name: String, create: Bool) throws(StorageError) -> any StorageFile {
        let full = path + "/" + name
        let fd = open(full, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0o644)
        if fd < 0 {
            if errno == ENOENT { throw .notFound(full) }
            throw .io("open \(full): \(String(cString: strerror(errno)))")
        }
        return PosixFile(descriptor: fd, path: full)
    }

    public func fileExists(_ name: String) -> Bool {
        access(path + "/" + name, F_OK) == 0
    }

    public func removeFile(_ name: String) throws(StorageError) {
        if unlink(path + "/" + name) != 0 && errno != ENOENT {
            throw .io("unlink \(name): \(String(cString: strerror(errno)))")
        }
    }

    public func fileNames() throws(StorageError) -> [String] {
        guard let dir = opendir(path) else { throw .io("opendir \(path): \(String(cString: strerror(errno)))") }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    /// The lock is held on the store directory itself: `rm lock` (or deleting any file) cannot
    /// defeat it, and a second writer or a reader is refused for as long as this process lives.
    /// The `lock` file only tells the refused process which pid holds the store.
    public func lockExclusive() throws(StorageError) {
        let fd = try lockDirectory(LOCK_EX)
        let pidFile = open(path + "/lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        if pidFile >= 0 {
            let pid = "\(getpid())\n"
            _ = ftruncate(pidFile, 0)
            _ = pid.withCString { pwrite(pidFile, $0, strlen($0), 0) }
            close(pidFile)
        }
        lockDescriptor = fd
        wrotePidFile = true
    }

    public func lockShared() throws(StorageError) {
        lockDescriptor = try lockDirectory(LOCK_SH)
    }

    private func lockDirectory(_ mode: Int32) throws(StorageError) -> Int32 {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .io("cannot open \(path) to lock it: \(String(cString: strerror(errno)))") }
        if flock(fd, mode | LOCK_NB) != 0 {
            close(fd)
            var buf = [UInt8](repeating: 0, count: 32)
            var holder = "unknown"
            let pidFile = open(path + "/lock", O_RDONLY | O_CLOEXEC)
            if pidFile >= 0 {
                let n = pread(pidFile, &buf, 31, 0)
                if n > 0 { holder = String(decoding: buf[..<n], as: UTF8.self).trimmingSpaces }
                close(pidFile)
            }
            throw .locked("store at \(path) is in use by another process (pid \(holder)); stop it or talk to it through its control socket")
        }
        return fd
    }

    public func unlock() {
        if lockDescriptor >= 0 {
            if wrotePidFile { _ = truncate(path + "/lock", 0) }
            wrotePidFile = false
            close(lockDescriptor)
            lockDescriptor = -1
        }
    }

    /// Makes file creations and removals durable (the directory entry itself).
    public func syncDirectory() throws(StorageError) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw .io("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        if fsync(fd) != 0 {
            let e = errno
            throw e == ENOSPC ? .noSpace : .io("fsync \(path): \(String(cString: strerror(e)))")
        }
    }
}

final class PosixFile: StorageFile {
    private var descriptor: Int32
    private let path: String

    init(descriptor: Int32, path: String) {
        self.descriptor = descriptor
        self.path = path
    }

    deinit { close() }

    private func failure(_ op: String) -> StorageError {
        let e = errno
        if e == ENOSPC || e == EDQUOT { return .noSpace }
        return .io("\(op) \(path): \(String(cString: strerror(e)))")
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(StorageError) -> Int {
        while true {
            let n = pread(descriptor, buffer.baseAddress, buffer.count, off_t(offset))
            if n >= 0 { return n }
            if errno != EINTR { throw failure("read") }
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(StorageError) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(descriptor, bytes.baseAddress! + done, bytes.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw failure("write")
            }
            done += n
        }
    }

    /// Linux's IOV_MAX (UIO_MAXIOV), which Glibc does not export to Swift.
    static let gatherMax = 1024

    /// `pwritev`, up to `gatherMax` parts per call, resuming after a short write.
    func write(gathering parts: [UnsafeRawBufferPointer], at offset: UInt64) throws(StorageError) {
        var vectors = parts.filter { $0.count > 0 }.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var first = 0
        var at = offset
        while first < vectors.count {
            let count = min(vectors.count - first, Self.gatherMax)
            let n = vectors.withUnsafeBufferPointer { pwritev(descriptor, $0.baseAddress! + first, Int32(count), off_t(at)) }
            if n < 0 {
                if errno == EINTR { continue }
                throw failure("write")
            }
            at += UInt64(n)
            // Skip the parts written whole; trim the one written in part.
            var left = n
            while first < vectors.count && left >= vectors[first].iov_len {
                left -= vectors[first].iov_len
                first += 1
            }
            if left > 0 {
                vectors[first].iov_base += left
                vectors[first].iov_len -= left
            }
        }
    }

    func sync() throws(StorageError) {
        if fdatasync(descriptor) != 0 { throw failure("fdatasync") }
    }

    func size() throws(StorageError) -> UInt64 {
        var st = stat()
        if fstat(descriptor, &st) != 0 { throw failure("fstat") }
        return UInt64(st.st_size)
    }

    func truncate(to size: UInt64) throws(StorageError) {
        if ftruncate(descriptor, off_t(size)) != 0 { throw failure("ftruncate") }
    }

    /// The most one `fallocate` punches. A punch holds the file's block map (ext4's `i_data_sem`)
    /// for its whole length, and a read of any part of the file that misses the page cache waits
    /// for it: one 1 GiB punch held such reads for 145 ms, 4 MiB slices for no longer than the
    /// machine's own noise (Benchmarks/README.md, "Issue 15: reads behind a hole punch").
    static let punchSliceBytes: UInt64 = 4 << 20

    func punchHole(offset: UInt64, length: UInt64) throws(StorageError) {
        var at = offset
        let end = offset + length
        while at < end {
            // Slices end on slice-size boundaries, so a run is cut the same way whatever its start.
            let sliceEnd = min(end, (at / Self.punchSliceBytes + 1) * Self.punchSliceBytes)
            // File systems without hole punching keep the bytes, which is safe: the space is only reused.
            if vbd_punch_hole(descriptor, Int64(at), Int64(sliceEnd - at)) != 0 {
                if errno == EOPNOTSUPP || errno == ENOSYS { return }
                throw failure("fallocate(punch)")
            }
            at = sliceEnd
        }
    }

    func writeBack(offset: UInt64, length: UInt64, waiting: Bool) {
        // A hint: where it fails (not supported), `sync` does all the work as before.
        _ = vbd_write_back(descriptor, Int64(offset), Int64(length), waiting ? 1 : 0)
    }

    func close() {
        if descriptor >= 0 {
            Glibc.close(descriptor)
            descriptor = -1
        }
    }
}

extension String {
    var trimmingSpaces: String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\n" || c == "\0" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\n" || c == "\0" { s.removeLast() }
        return String(s)
    }
}

extension String {
    /// Without the line end `fgets` keeps.
    fileprivate var trimmingNewline: String {
        var s = self
        while s.last == "\n" || s.last == "\r" { s.removeLast() }
        return s
    }
}
