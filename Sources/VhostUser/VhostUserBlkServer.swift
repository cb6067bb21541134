import CVBDSys
import Foundation
import Logging
import Synchronization
import VBDAccounting
import VBDCore

#if canImport(Glibc)
import Glibc
#endif

/// Serves one export as a vhost-user-blk device on a unix socket: one front end (QEMU) at a time,
/// as vhost-user is a one-to-one protocol. When the front end disconnects (QEMU exits or restarts,
/// or sent something invalid) the session's queues stop, its memory is unmapped, and the socket
/// accepts the next connection. Other exports' sockets are independent.
public final class VhostUserBlkServer: @unchecked Sendable {
    public let socketPath: String
    public let exportName: String
    private let openDevice: @Sendable () throws(BlockDeviceError) -> any BlockDevice
    private let queueCountMax: Int
    private let pipeline: RequestPipeline?
    private let logger: Logger
    private let state = Mutex(State())
    private let finished = DispatchSemaphore(value: 0)

    private struct State {
        var listenFD: Int32 = -1
        var connectionFD: Int32 = -1
        var stopping = false
        var connections = 0
        /// Whose lease the current connection is served under (nil: none, or no tenancy).
        var connectionTenancy: TenancySession?
    }

    /// With `pipeline` (the request layer the NBD server's connections go through), a front end is
    /// admitted by what its unix credentials prove (SO_PEERCRED: `--peer-domain`), as an NBD client
    /// on the unix socket is; its requests are lease-checked, scheduled and charged by that layer.
    public init(socketPath: String, exportName: String, queueCountMax: Int = 4, pipeline: RequestPipeline? = nil,
                logger: Logger, openDevice: @escaping @Sendable () throws(BlockDeviceError) -> any BlockDevice) {
        self.socketPath = socketPath
        self.pipeline = pipeline
        self.exportName = exportName
        self.queueCountMax = queueCountMax
        self.logger = logger
        self.openDevice = openDevice
        // A lease that ends (expired, revoked, released) closes the connection it admitted, as
        // the NBD server closes its connections: the front end's rings stop, and a reconnect is
        // admitted again only with a new lease.
        pipeline?.tenancy.addLeaseEndObserver { [weak self] lease, end in
            self?.leaseEnded(lease, end)
        }
    }

    private func leaseEnded(_ lease: Lease, _ end: LeaseEnd) {
        let closed = state.withLock { state -> Bool in
            guard state.connectionFD >= 0, let tenancy = state.connectionTenancy,
                  tenancy.domain == lease.domain, tenancy.volume == lease.volume else { return false }
            // The serving thread sees the end of the stream, stops the queues (requests in
            // flight complete first) and closes the fd; shutting down under the lock keeps
            // the number from being reused meanwhile.
            shutdown(state.connectionFD, Int32(SHUT_RDWR))
            return true
        }
        if closed {
            logger.notice("vhost-user-blk: lease \(end.rawValue): closing the front end's connection",
                          metadata: ["export": "\(exportName)", "domain": "\(lease.domain)", "volume": "\(lease.volume)"])
        }
    }

    /// Connections accepted so far (tests wait on reconnects with it).
    public var connectionsAccepted: Int { state.withLock { $0.connections } }

    /// Binds and listens (a stale socket file at the path is replaced), then accepts on a thread.
    public func start() throws {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let pathBytes = Array(socketPath.utf8)
        guard pathBytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
            throw VhostUserProtocolError.connection("socket path '\(socketPath)' is longer than a unix socket address holds")
        }
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: pathBytes)
            raw[pathBytes.count] = 0
        }
        var status = stat()
        if lstat(socketPath, &status) == 0 {
            guard status.st_mode & S_IFMT == S_IFSOCK else {
                throw VhostUserProtocolError.connection("'\(socketPath)' exists and is not a socket")
            }
            unlink(socketPath)
        }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw VhostUserProtocolError.connection("socket: \(String(cString: strerror(errno)))") }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0, listen(fd, 4) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw VhostUserProtocolError.connection("cannot listen on '\(socketPath)': \(reason)")
        }
        state.withLock { $0.listenFD = fd }
        let thread = Thread { [self] in
            Thread.current.name = "vhost-blk srv"
            ServingPriority.adoptProcessNice()
            self.acceptLoop(listenFD: fd)
            self.finished.signal()
        }
        thread.name = "vhost-user-blk \(exportName)"
        thread.start()
    }

    /// Stops accepting, closes the current connection (its queues stop first) and removes the socket file.
    public func stop() {
        // Under the lock: the accept loop closes a finished connection under it too, so the
        // number cannot have been reused for another file meanwhile.
        let listening = state.withLock { state -> Int32? in
            guard !state.stopping, state.listenFD >= 0 else { return nil }
            state.stopping = true
            shutdown(state.listenFD, Int32(SHUT_RDWR))
            if state.connectionFD >= 0 { shutdown(state.connectionFD, Int32(SHUT_RDWR)) }
            return state.listenFD
        }
        guard let listenFD = listening else { return }
        finished.wait()
        close(listenFD)
        unlink(socketPath)
    }

    private func acceptLoop(listenFD: Int32) {
        while true {
            let fd = accept(listenFD, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if !state.withLock({ $0.stopping }) {
                    logger.error("vhost-user-blk: accept on \(socketPath) failed: \(String(cString: strerror(errno)))")
                }
                return
            }
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)   // (accept4 is not in Swift's Glibc module)
            let proceed = state.withLock { state -> Bool in
                guard !state.stopping else { return false }
                state.connectionFD = fd
                state.connections += 1
                return true
            }
            guard proceed else { close(fd); return }
            serve(connection: fd)
            state.withLock { state in
                state.connectionFD = -1
                state.connectionTenancy = nil
                close(fd)
            }
        }
    }

    private func serve(connection fd: Int32) {
        let device: any BlockDevice
        do { device = try openDevice() } catch {
            logger.error("vhost-user-blk: cannot open export \(exportName): \(error)")
            return
        }
        var requestSession: RequestSession?
        if let pipeline {
            var credentials = UnixPeerCredentials()
            var length = socklen_t(MemoryLayout<UnixPeerCredentials>.size)
            let identity = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) == 0
                ? PeerIdentity(unixCredentials: credentials) : PeerIdentity.unauthenticated
            switch pipeline.admit(device: device, identity: identity, door: .vhostUserBlk) {
            case .failure(let refusal):
                logger.error("vhost-user-blk: front end refused", metadata: ["export": "\(exportName)", "reason": "\(refusal)"])
                return
            case .success(let session):
                requestSession = session
            }
            // Published before the first request; a lease that ended between the admission and
            // here would have found no connection to close, so it is checked once more.
            state.withLock { $0.connectionTenancy = requestSession?.tenancy }
            if let tenancy = requestSession?.tenancy, !pipeline.tenancy.permits(tenancy, .read) {
                logger.notice("vhost-user-blk: the lease ended while the front end was admitted", metadata: ["export": "\(exportName)"])
                return
            }
        }
        logger.notice("vhost-user-blk: front end connected",
                      metadata: ["export": "\(exportName)", "socket": "\(socketPath)", "domain": "\(requestSession?.domain.name ?? "-")"])
        let session = VhostUserBlkSession(handler: VirtioBlkRequestHandler(device: device, session: requestSession),
                                          queueCountMax: queueCountMax, logger: logger)
        defer {
            let counters = session.close()
            func perQueue(_ value: (QueueCounters) -> UInt64) -> Logger.MetadataValue {
                "\(counters.map { String(value($0)) }.joined(separator: ","))"
            }
            logger.notice("vhost-user-blk: front end disconnected",
                          metadata: ["export": "\(exportName)", "requests per queue": perQueue(\.completed),
                                     "calls per queue": perQueue(\.calls), "kicks per queue": perQueue(\.kicks),
                                     "kick wake-ups per queue": perQueue(\.kickWakeups)])
        }
        var connection = VhostUserConnection(fd: fd)
        while true {
            do {
                guard let (header, payload, fds) = try connection.receive() else { return }
                if let reply = try session.handle(header: header, payload: payload, fileDescriptors: fds) {
                    try connection.send(reply.bytes, fileDescriptors: reply.fileDescriptors)
                }
            } catch {
                if !state.withLock({ $0.stopping }) {
                    logger.error("vhost-user-blk: closing the connection for \(exportName): \(error)")
                }
                return
            }
        }
    }
}

/// Reads whole vhost-user messages (header, payload, passed fds) from a stream socket.
public struct VhostUserConnection {
    public let fd: Int32
    public init(fd: Int32) { self.fd = fd }

    /// The next message, or nil at a clean end of stream (between messages).
    public mutating func receive() throws(VhostUserProtocolError) -> (VhostUserHeader, [UInt8], [Int32])? {
        var header = [UInt8](repeating: 0, count: VhostUserHeader.byteCount)
        var fds = [Int32](repeating: -1, count: VhostUserLimits.memoryRegionsMax)
        var fdCount: Int32 = 0, truncated: Int32 = 0
        var received: Int
        repeat {
            received = header.withUnsafeMutableBytes { raw in
                fds.withUnsafeMutableBufferPointer { f in
                    vbd_recv_with_fds(fd, raw.baseAddress, raw.count, f.baseAddress, Int32(f.count), &fdCount, &truncated)
                }
            }
        } while received < 0 && errno == EINTR
        if received < 0 { throw .connection("recvmsg: \(String(cString: strerror(errno)))") }
        if received == 0 { return nil }
        let passed = Array(fds[0..<Int(fdCount)])
        do throws(VhostUserProtocolError) {
            guard truncated == 0 else { throw .invalid(request: .setMemTable, detail: "more than \(VhostUserLimits.memoryRegionsMax) file descriptors in one message") }
            if received < header.count { try readExactly(&header, from: received) }
            let decoded = try VhostUserHeader.decode(header)
            var payload = [UInt8](repeating: 0, count: Int(decoded.size))
            if !payload.isEmpty { try readExactly(&payload, from: 0) }
            return (decoded, payload, passed)
        } catch {
            for fd in passed { close(fd) }
            throw error
        }
    }

    private func readExactly(_ buffer: inout [UInt8], from start: Int) throws(VhostUserProtocolError) {
        var done = start
        while done < buffer.count {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw .connection("read: \(String(cString: strerror(errno)))") }
            if n == 0 { throw .truncated(what: "message", expected: buffer.count, got: done) }
            done += n
        }
    }

    /// Sends `bytes`, with `fileDescriptors` (SCM_RIGHTS) on the first part.
    public func send(_ bytes: [UInt8], fileDescriptors: [Int32] = []) throws(VhostUserProtocolError) {
        var done = 0
        if !fileDescriptors.isEmpty {
            var n: Int
            repeat {
                n = bytes.withUnsafeBytes { raw in
                    fileDescriptors.withUnsafeBufferPointer { vbd_send_with_fds(fd, raw.baseAddress, raw.count, $0.baseAddress, Int32($0.count)) }
                }
            } while n < 0 && errno == EINTR
            if n <= 0 { throw .connection("sendmsg: \(String(cString: strerror(errno)))") }
            done = n
        }
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, $0.count - done, Int32(MSG_NOSIGNAL)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw .connection("send: \(String(cString: strerror(errno)))") }
            done += n
        }
    }
}
