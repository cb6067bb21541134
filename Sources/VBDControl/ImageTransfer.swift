import Foundation
import Logging
import NBDServer
import VBDCore
import VBDStore

#if canImport(Glibc)
import Glibc
#endif

/// `import` and `export`: disk images in files to volumes and back, sparse on both sides.
///
/// ### Sparseness
/// Import skips the file's holes (SEEK_DATA/SEEK_HOLE) and every all-zero block, so the volume
/// maps nothing there. Export writes only blocks that hold data and extends the file with
/// ftruncate, so the file's holes are where the volume's are (and where it had zero blocks).
///
/// ### Formats
/// Raw files are read directly. Anything else (qcow2, vmdk, vdi, ...) goes through qemu-img:
/// `qemu-img convert` streams it into the new volume over a private NBD unix socket that this
/// process serves for the duration of the import, so no temporary raw copy is needed.
struct ImageTransfer {
    let store: Store

    // MARK: Import

    func importImage(path: String, name: String, blockSize: Int, group: String?, format requestedFormat: String?,
                     progress: @escaping ProgressSink) throws -> TransferReport {
        let started = ContinuousClock.now
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Self.fileFailure("cannot open \(path)", errno) }
        defer { close(fd) }
        let probe = try probeFormat(path: path, fd: fd, requested: requestedFormat)
        guard probe.size > 0 else {
            throw ControlFailure(code: "invalid-argument", message: "\(path) is empty: nothing to import")
        }
        // All or nothing: the data goes into an incomplete volume that becomes `name` in one
        // durable step once it is all in. A killed import leaves only an incomplete volume, which
        // the next import (or the next open) deletes, so re-running it just works.
        guard (try? store.info(name)) == nil else { throw StoreError.alreadyExists(name) }
        try store.discardIncompleteVolumes()
        let incomplete = try store.createIncompleteVolume(size: probe.size, blockSize: blockSize, group: group).name
        let dataBytes: UInt64
        do {
            if probe.format == "raw" {
                dataBytes = try copyRawFile(fd: fd, size: probe.size, into: incomplete, blockBytes: blockSize, progress: progress)
            } else {
                dataBytes = try convertWithQemuImg(path: path, format: probe.format, into: incomplete, size: probe.size, progress: progress)
            }
            try store.flush()
            try store.publishIncompleteVolume(incomplete, as: name)
        } catch {
            try? store.discardIncompleteVolumes(abandoning: incomplete)
            throw error
        }
        return TransferReport(name: name, path: path, format: probe.format, size: probe.size, dataBytes: dataBytes,
                              seconds: Self.seconds(since: started))
    }

    struct FormatProbe {
        var format: String
        /// The virtual disk size (for raw: the file size).
        var size: UInt64
    }

    /// Asks `qemu-img info` when it is installed; without it only raw images can be imported, and
    /// a file that starts with a known image magic is refused rather than imported as raw bytes.
    func probeFormat(path: String, fd: Int32, requested: String?) throws -> FormatProbe {
        let rawSize = try Self.fileSize(fd: fd, path: path)
        if requested == "raw" { return FormatProbe(format: "raw", size: rawSize) }
        guard let qemuImg = Subprocess.find("qemu-img") else {
            if let requested {
                throw ControlFailure(code: "not-supported", message: "importing \(requested) images needs qemu-img (apt-get install qemu-utils)")
            }
            if let magic = Self.imageMagic(fd: fd) {
                throw ControlFailure(code: "not-supported", message: "\(path) is a \(magic) image; importing it needs qemu-img (apt-get install qemu-utils)")
            }
            return FormatProbe(format: "raw", size: rawSize)
        }
        var arguments = ["info", "--output=json"]
        if let requested { arguments += ["-f", requested] }
        arguments.append(path)
        let outcome = try Subprocess.run(qemuImg, arguments)
        guard outcome.status == 0 else {
            throw ControlFailure(code: "invalid-argument", message: "qemu-img cannot read \(path): \(outcome.standardError.trimmingSpaces())")
        }
        struct Info: Decodable {
            var format: String
            var virtualSize: UInt64
            enum CodingKeys: String, CodingKey {
                case format
                case virtualSize = "virtual-size"
            }
        }
        guard let info = try? JSONDecoder().decode(Info.self, from: Data(outcome.standardOutput)) else {
            throw ControlFailure(code: "io", message: "unexpected output from qemu-img info for \(path)")
        }
        return FormatProbe(format: info.format, size: info.format == "raw" ? rawSize : info.virtualSize)
    }

    /// Reads the data regions of a raw file and writes its non-zero blocks into the volume.
    func copyRawFile(fd: Int32, size: UInt64, into name: String, blockBytes: Int, progress: @escaping ProgressSink) throws -> UInt64 {
        let device = try store.device(named: name)
        let step = ControlLimits.transferBytesPerStep
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: step, alignment: 4096)
        defer { buffer.deallocate() }
        let block = UInt64(blockBytes)
        var throttle = ProgressThrottle(phase: "import", total: size, sink: progress)
        var written: UInt64 = 0
        var position: UInt64 = 0
        while position < size {
            guard let region = Self.nextDataRegion(fd: fd, from: position, size: size) else { break }
            // Whole blocks: a block the region only touches is read whole (its other bytes are
            // the file's zeroes), so no block is written partially twice.
            var offset = max(position, region.lowerBound / block * block)
            let end = min(size, (region.upperBound + block - 1) / block * block)
            while offset < end {
                let count = Int(min(UInt64(step), end - offset))
                let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
                try Self.preadFully(fd: fd, into: slice, at: offset)
                written += try Self.writeNonZeroRuns(slice, at: offset, blockBytes: blockBytes, to: device)
                offset += UInt64(count)
                throttle.report(offset)
            }
            position = end
        }
        throttle.finish()
        return written
    }

    /// Writes the runs of `data` that are not all-zero blocks; returns the bytes written.
    static func writeNonZeroRuns(_ data: UnsafeMutableRawBufferPointer, at offset: UInt64, blockBytes: Int,
                                 to device: VolumeDevice) throws -> UInt64 {
        var written: UInt64 = 0
        var runStart: Int?
        var index = 0
        func flushRun(upTo end: Int) throws {
            guard let start = runStart else { return }
            try device.write(offset: offset + UInt64(start), data: UnsafeRawBufferPointer(rebasing: data[start..<end]), fua: false)
            written += UInt64(end - start)
            runStart = nil
        }
        while index < data.count {
            let end = min(index + blockBytes, data.count)
            if isAllZero(UnsafeRawBufferPointer(rebasing: data[index..<end])) {
                try flushRun(upTo: index)
            } else if runStart == nil {
                runStart = index
            }
            index = end
        }
        try flushRun(upTo: data.count)
        return written
    }

    /// `[start, end)` of the next region at or after `offset` that may hold data, or nil when only
    /// holes remain. File systems without SEEK_DATA report everything as data.
    // Linux's whence values (lseek(2)); Glibc declares them only under _GNU_SOURCE.
    static let seekData: Int32 = 3
    static let seekHole: Int32 = 4

    static func nextDataRegion(fd: Int32, from offset: UInt64, size: UInt64) -> Range<UInt64>? {
        let data = lseek(fd, off_t(offset), seekData)
        if data < 0 {
            return errno == ENXIO ? nil : offset..<size
        }
        guard UInt64(data) < size else { return nil }
        let hole = lseek(fd, data, seekHole)
        let end = hole < 0 ? size : min(size, UInt64(hole))
        return UInt64(data)..<end
    }

    /// Streams a non-raw image into the volume: `qemu-img convert` writes to an NBD server this
    /// process runs on a private unix socket for the length of the import.
    func convertWithQemuImg(path: String, format: String, into name: String, size: UInt64,
                            progress: @escaping ProgressSink) throws -> UInt64 {
        guard let qemuImg = Subprocess.find("qemu-img") else {
            throw ControlFailure(code: "not-supported", message: "importing \(format) images needs qemu-img (apt-get install qemu-utils)")
        }
        var template = Array("/tmp/vbd-import-XXXXXX".utf8CString)
        guard let dir = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }).map({ String(cString: $0) }) else {
            throw Self.fileFailure("cannot create a temporary directory", errno)
        }
        let socketPath = dir + "/nbd.sock"
        defer {
            unlink(socketPath)
            rmdir(dir)
        }
        var logger = Logger(label: "vbd.import")
        logger.logLevel = .warning
        let server = NBDServer(configuration: .init(exports: store, unixSocketPath: socketPath, logger: logger,
                                                    ioThreadsPerPool: 2, eventLoopThreads: 1))
        try runBlocking { try await server.start() }
        defer { _ = try? runBlocking { await server.stop() } }
        let throttle = ProgressThrottleBox(ProgressThrottle(phase: "import", total: 100, unit: "percent", sink: progress))
        // --target-is-zero: the new volume reads as zeroes, so qemu-img skips zero areas (sparse).
        let outcome = try Subprocess.run(qemuImg, ["convert", "-p", "-n", "--target-is-zero", "-f", format, "-O", "raw", path,
                                                   "nbd+unix:///\(name)?socket=\(socketPath)"]) { chunk in
            // qemu-img -p prints "    (12.34/100%)\r" as it goes.
            if let percent = QemuProgress.lastPercent(in: chunk) { throttle.report(UInt64(percent)) }
        }
        guard outcome.status == 0 else {
            throw ControlFailure(code: "io", message: "qemu-img convert failed for \(path): \(outcome.standardError.trimmingSpaces())")
        }
        throttle.finish()
        return try store.usage().images.first { $0.name == name }?.allocatedBytes ?? 0
    }

    // MARK: Export

    func exportImage(name: String, path: String, overwrite: Bool, progress: @escaping ProgressSink) throws -> TransferReport {
        let started = ContinuousClock.now
        let info = try store.info(name)
        let device = try store.device(named: name)
        let flags = O_WRONLY | O_CREAT | O_CLOEXEC | (overwrite ? O_TRUNC : O_EXCL)
        let fd = open(path, flags, 0o644)
        guard fd >= 0 else {
            if errno == EEXIST {
                throw ControlFailure(code: "already-exists", message: "\(path) already exists; pass --force to overwrite it")
            }
            throw Self.fileFailure("cannot create \(path)", errno)
        }
        var succeeded = false
        defer {
            close(fd)
            if !succeeded { unlink(path) }
        }
        // The file gets its full size first: every byte not written below stays a hole.
        guard ftruncate(fd, off_t(info.size)) == 0 else { throw Self.fileFailure("cannot size \(path)", errno) }
        let step = ControlLimits.transferBytesPerStep
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: step, alignment: 4096)
        defer { buffer.deallocate() }
        var throttle = ProgressThrottle(phase: "export", total: info.size, sink: progress)
        var written: UInt64 = 0
        var offset: UInt64 = 0
        while offset < info.size {
            let extents = try device.extents(offset: offset, length: info.size - offset, maxExtents: ControlLimits.extentsPerCallMax)
            guard !extents.isEmpty else { break }
            for extent in extents {
                if !extent.flags.contains(.zero) {
                    var at = offset
                    let end = offset + extent.length
                    while at < end {
                        let count = Int(min(UInt64(step), end - at))
                        let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count])
                        try device.read(offset: at, into: slice)
                        written += try Self.pwriteNonZeroBlocks(slice, fd: fd, at: at, blockBytes: info.blockSize, path: path)
                        at += UInt64(count)
                        throttle.report(at)
                    }
                }
                offset += extent.length
                throttle.report(offset)
            }
        }
        guard fsync(fd) == 0 else { throw Self.fileFailure("cannot sync \(path)", errno) }
        throttle.finish()
        succeeded = true
        return TransferReport(name: name, path: path, format: "raw", size: info.size, dataBytes: written,
                              seconds: Self.seconds(since: started))
    }

    static func pwriteNonZeroBlocks(_ data: UnsafeMutableRawBufferPointer, fd: Int32, at offset: UInt64, blockBytes: Int,
                                    path: String) throws -> UInt64 {
        var written: UInt64 = 0
        var index = 0
        while index < data.count {
            let end = min(index + blockBytes, data.count)
            let block = UnsafeRawBufferPointer(rebasing: data[index..<end])
            if !isAllZero(block) {
                var done = 0
                while done < block.count {
                    let n = pwrite(fd, block.baseAddress! + done, block.count - done, off_t(offset + UInt64(index + done)))
                    if n < 0 {
                        if errno == EINTR { continue }
                        if errno == ENOSPC { throw ControlFailure(code: "no-space", message: "no space left writing \(path)") }
                        throw fileFailure("cannot write \(path)", errno)
                    }
                    done += n
                }
                written += UInt64(block.count)
            }
            index = end
        }
        return written
    }

    // MARK: Helpers

    static func isAllZero(_ bytes: UnsafeRawBufferPointer) -> Bool {
        // Word-wise: this runs over every byte imported or exported.
        let base = bytes.baseAddress!
        var i = 0
        let count = bytes.count
        while i + 8 <= count {
            if base.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        while i < count {
            if base.load(fromByteOffset: i, as: UInt8.self) != 0 { return false }
            i += 1
        }
        return true
    }

    static func preadFully(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset + UInt64(done)))
            if n < 0 {
                if errno == EINTR { continue }
                throw fileFailure("read failed", errno)
            }
            if n == 0 {
                // The file shrank under us: the rest reads as zeroes, like a hole.
                (buffer.baseAddress! + done).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - done)
                return
            }
            done += n
        }
    }

    static func fileSize(fd: Int32, path: String) throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw fileFailure("cannot stat \(path)", errno) }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = lseek(fd, 0, SEEK_END)
            guard end >= 0 else { throw fileFailure("cannot size \(path)", errno) }
            return UInt64(end)
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw ControlFailure(code: "invalid-argument", message: "\(path) is not a regular file or block device")
        }
        return UInt64(st.st_size)
    }

    /// The name of a well-known image format whose magic starts the file, if any.
    static func imageMagic(fd: Int32) -> String? {
        var head = [UInt8](repeating: 0, count: 8)
        guard pread(fd, &head, 8, 0) == 8 else { return nil }
        if head[0..<4] == [0x51, 0x46, 0x49, 0xFB] { return "qcow2" }
        if head[0..<4] == [0x4B, 0x44, 0x4D, 0x56] { return "vmdk" }
        if head == Array("conectix".utf8) { return "vhd" }
        return nil
    }

    static func fileFailure(_ what: String, _ error: Int32) -> ControlFailure {
        let code: String
        switch error {
        case ENOENT: code = "file-not-found"
        case EACCES, EPERM: code = "permission-denied"
        case ENOSPC: code = "no-space"
        default: code = "io"
        }
        return ControlFailure(code: code, message: "\(what): \(String(cString: strerror(error)))")
    }

    static func seconds(since start: ContinuousClock.Instant) -> Double {
        (ContinuousClock.now - start).inSeconds
    }
}

/// Parses qemu-img's `-p` output.
enum QemuProgress {
    /// The last complete "(NN.NN/100%)" in `chunk`.
    static func lastPercent(in chunk: [UInt8]) -> Double? {
        let text = String(decoding: chunk, as: UTF8.self)
        var result: Double?
        for piece in text.split(separator: "(").dropFirst() {
            guard let slash = piece.firstIndex(of: "/"), piece[slash...].hasPrefix("/100%)") else { continue }
            if let value = Double(piece[..<slash]) { result = value }
        }
        return result
    }
}
