import Foundation
import VBDCore

#if canImport(Glibc)
import Glibc
#endif

/// Length-prefixed JSON frames over a blocking socket: a 4-byte big-endian length, then the bytes.
enum ControlFraming {
    static let encoder: JSONEncoder = {
        let e = JSONEncoder()
        e.outputFormatting = [.sortedKeys]
        return e
    }()

    /// Encodes and sends one frame. Fails (without sending) when the frame would exceed `bytesMax`.
    static func send<T: Encodable>(_ value: T, on fd: Int32, bytesMax: Int) throws(ControlFailure) {
        let body: Data
        do { body = try encoder.encode(value) } catch {
            throw ControlFailure(code: "internal", message: "cannot encode a control message: \(error)")
        }
        guard body.count <= bytesMax else {
            throw ControlFailure(code: "too-large", message: "control message of \(body.count) bytes exceeds the limit of \(bytesMax) bytes")
        }
        var frame = [UInt8]()
        frame.reserveCapacity(4 + body.count)
        let n = UInt32(body.count)
        frame += [UInt8(n >> 24), UInt8((n >> 16) & 0xFF), UInt8((n >> 8) & 0xFF), UInt8(n & 0xFF)]
        frame += body
        try writeAll(frame, to: fd)
    }

    /// Receives one frame and decodes it. Returns nil when the peer closed before a frame began.
    /// With a `deadline` the whole frame must arrive by then (a per-recv timeout would let a peer
    /// that sends a byte now and then hold the connection for ever).
    static func receive<T: Decodable>(_ type: T.Type, from fd: Int32, bytesMax: Int,
                                      deadline: ContinuousClock.Instant? = nil) throws(ControlFailure) -> T? {
        var header = [UInt8](repeating: 0, count: 4)
        let got = try readFully(&header, from: fd, deadline: deadline)
        if got == 0 { return nil }
        guard got == 4 else { throw ControlFailure(code: "protocol", message: "control connection closed in the middle of a frame header") }
        let length = Int(header[0]) << 24 | Int(header[1]) << 16 | Int(header[2]) << 8 | Int(header[3])
        // Checked before allocating: a hostile length must not make us reserve memory.
        guard length <= bytesMax else {
            throw ControlFailure(code: "too-large", message: "peer announced a control message of \(length) bytes; the limit is \(bytesMax)")
        }
        var body = [UInt8](repeating: 0, count: length)
        guard try readFully(&body, from: fd, deadline: deadline) == length else {
            throw ControlFailure(code: "protocol", message: "control connection closed in the middle of a frame")
        }
        do { return try JSONDecoder().decode(T.self, from: Data(body)) } catch {
            throw ControlFailure(code: "protocol", message: "malformed control message: \(error)")
        }
    }

    static func writeAll(_ bytes: [UInt8], to fd: Int32) throws(ControlFailure) {
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { buffer in
                // MSG_NOSIGNAL: a vanished peer is an error here, not a SIGPIPE that kills the process.
                Glibc.send(fd, buffer.baseAddress! + offset, buffer.count - offset, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw ControlFailure(code: "io", message: "control socket write failed: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
    }

    /// Reads until `buffer` is full or the peer closes; returns the bytes read.
    static func readFully(_ buffer: inout [UInt8], from fd: Int32,
                          deadline: ContinuousClock.Instant? = nil) throws(ControlFailure) -> Int {
        var offset = 0
        while offset < buffer.count {
            if let deadline {
                let left = deadline - ContinuousClock.now
                let milliseconds = left.components.seconds * 1000 + left.components.attoseconds / 1_000_000_000_000_000
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let ready = milliseconds > 0 ? poll(&poller, 1, Int32(clamping: milliseconds)) : 0
                if ready == 0 {
                    throw ControlFailure(code: "timeout", message: "control peer did not send its whole request in time")
                }
                if ready < 0 && errno == EINTR { continue }
            }
            let n = buffer.withUnsafeMutableBytes { b in Glibc.recv(fd, b.baseAddress! + offset, b.count - offset, 0) }
            if n == 0 { break }
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK {
                    throw ControlFailure(code: "timeout", message: "control peer sent nothing for too long")
                }
                throw ControlFailure(code: "io", message: "control socket read failed: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
        return offset
    }
}

/// Unix stream sockets: just what the control channel needs.
enum UnixSocket {
    static func address(_ path: String) throws(ControlFailure) -> sockaddr_un {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        guard bytes.count <= ControlLimits.unixPathBytesMax else {
            throw ControlFailure(code: "invalid-argument",
                                 message: "socket path '\(path)' is \(bytes.count) bytes; unix sockets allow at most \(ControlLimits.unixPathBytesMax): use a shorter store path")
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return addr
    }

    enum ConnectOutcome {
        case connected(Int32)
        /// Nobody listens there (no socket file, or a stale one a dead server left).
        case noServer
    }

    static func connect(_ path: String) throws(ControlFailure) -> ConnectOutcome {
        var addr = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlFailure(code: "io", message: "socket(): \(String(cString: strerror(errno)))") }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        if rc == 0 { return .connected(fd) }
        let error = errno
        close(fd)
        if error == ENOENT || error == ECONNREFUSED || error == ENOTDIR { return .noServer }
        if error == EACCES {
            throw ControlFailure(code: "permission-denied", message: "a server listens on \(path) but this user may not connect to it (it belongs to the user running `vbdtool serve`)")
        }
        throw ControlFailure(code: "io", message: "cannot connect to \(path): \(String(cString: strerror(error)))")
    }

    /// Binds and listens on `path` with mode 0600 (owner only), replacing a stale socket file.
    static func listen(_ path: String, backlog: Int32) throws(ControlFailure) -> Int32 {
        var addr = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ControlFailure(code: "io", message: "socket(): \(String(cString: strerror(errno)))") }
        unlink(path)
        // The umask makes bind create the socket as 0600 at once: no window where others may connect.
        let previousMask = umask(0o177)
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        let bindError = errno
        umask(previousMask)
        guard rc == 0 else {
            close(fd)
            throw ControlFailure(code: "io", message: "cannot bind control socket \(path): \(String(cString: strerror(bindError)))")
        }
        guard Glibc.listen(fd, backlog) == 0 else {
            let e = errno
            close(fd)
            throw ControlFailure(code: "io", message: "cannot listen on \(path): \(String(cString: strerror(e)))")
        }
        return fd
    }

    /// Refuses peers other than this process's user and root. The socket's 0600 mode already
    /// keeps others out; this holds even if the mode or the directory's permissions were loosened.
    /// Returns the peer's pid and uid (the actor recorded in the audit log).
    @discardableResult
    static func checkPeerIsOwnerOrRoot(_ fd: Int32) throws(ControlFailure) -> (pid: Int32, uid: UInt32) {
        var credentials = UnixPeerCredentials()
        var length = socklen_t(MemoryLayout<UnixPeerCredentials>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0 else {
            throw ControlFailure(code: "permission-denied", message: "cannot identify the control client: \(String(cString: strerror(errno)))")
        }
        guard credentials.uid == geteuid() || credentials.uid == 0 else {
            throw ControlFailure(code: "permission-denied", message: "user \(credentials.uid) may not control this server (it runs as user \(geteuid()))")
        }
        return (credentials.pid, credentials.uid)
    }

    static func setTimeouts(_ fd: Int32, receiveSeconds: Int, sendSeconds: Int) {
        var rcv = timeval(tv_sec: receiveSeconds, tv_usec: 0)
        var snd = timeval(tv_sec: sendSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &rcv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &snd, socklen_t(MemoryLayout<timeval>.size))
    }
}
