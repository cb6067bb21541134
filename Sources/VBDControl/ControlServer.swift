import Foundation
import Logging
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// Runs the requests a ``ControlServer`` receives: a ``ControlService`` (one store), or a server's
/// router over several RADOS families.
public protocol ControlRequestHandler: Sendable {
    func execute(_ envelope: ControlEnvelope, actor: String, progress: @escaping ProgressSink) throws(ControlFailure) -> ControlResult
}

extension ControlService: ControlRequestHandler {
    /// One store: a request naming a RADOS family is refused (it is meant for a server of families).
    public func execute(_ envelope: ControlEnvelope, actor: String, progress: @escaping ProgressSink) throws(ControlFailure) -> ControlResult {
        if let family = envelope.family {
            throw ControlFailure(code: "not-found", message: "the server of \(storePath) serves one store, not the RADOS family '\(family)'")
        }
        return try execute(envelope.request, actor: actor, progress: progress)
    }
}

/// Serves the control protocol (see ControlMessages.swift) on a unix socket, running each request
/// through a ``ControlService``.
///
/// ### Concurrency
/// One thread accepts; each connection gets its own thread, at most
/// ``ControlLimits/connectionsMax`` at once (a further client gets a `busy` failure). Store
/// operations block, so threads keep them off any event loop.
///
/// ### Failure modes
/// A client that sends nothing for ``ControlLimits/requestReadTimeoutSeconds`` or an oversized
/// frame is answered with a failure and dropped. A client that goes away while its request runs
/// does not stop the request (a snapshot or import completes; only the reply is lost).
public final class ControlServer: Sendable {
    public let socketPath: String
    let service: any ControlRequestHandler
    let logger: Logger

    private struct State {
        var listener: Int32 = -1
        var activeConnections = 0
        var stopping = false
    }
    private let state = Mutex(State())
    private let acceptLoopDone = DispatchSemaphore(value: 0)

    public init(socketPath: String, service: any ControlRequestHandler, logger: Logger) {
        self.socketPath = socketPath
        self.service = service
        self.logger = logger
    }

    /// Binds the socket (mode 0600, replacing a stale file) and starts accepting.
    public func start() throws(ControlFailure) {
        let fd = try UnixSocket.listen(socketPath, backlog: 64)
        state.withLock { $0.listener = fd }
        Thread.detachNewThread { [self] in
            acceptLoop(fd)
            acceptLoopDone.signal()
        }
        logger.info("control socket listening", metadata: ["path": "\(socketPath)"])
    }

    /// Stops accepting, waits up to `grace` for requests in flight, removes the socket file.
    public func stop(grace: Duration = .seconds(30)) {
        let fd = state.withLock { s -> Int32 in
            s.stopping = true
            let fd = s.listener
            s.listener = -1
            return fd
        }
        guard fd >= 0 else { return }
        // shutdown() wakes the thread blocked in accept(); it then sees `stopping` and leaves.
        shutdown(fd, Int32(SHUT_RDWR))
        acceptLoopDone.wait()
        close(fd)
        unlink(socketPath)
        let deadline = ContinuousClock.now + grace
        while state.withLock({ $0.activeConnections }) > 0 && ContinuousClock.now < deadline {
            usleep(20_000)
        }
        let left = state.withLock { $0.activeConnections }
        if left > 0 { logger.warning("control requests still running at shutdown", metadata: ["count": "\(left)"]) }
    }

    private func acceptLoop(_ listener: Int32) {
        while true {
            let fd = accept(listener, nil, nil)
            if fd < 0 {
                if errno == EINTR || errno == ECONNABORTED { continue }
                if state.withLock({ $0.stopping }) { return }
                logger.error("control socket accept failed: \(String(cString: strerror(errno)))")
                usleep(100_000)   // EMFILE and the like: do not spin
                continue
            }
            if state.withLock({ $0.stopping }) {
                close(fd)
                return
            }
            // accept4 is not imported without _GNU_SOURCE; set close-on-exec so helpers such as
            // qemu-img never inherit a client's socket.
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            let admitted = state.withLock { s -> Bool in
                guard s.activeConnections < ControlLimits.connectionsMax else { return false }
                s.activeConnections += 1
                return true
            }
            UnixSocket.setTimeouts(fd, receiveSeconds: ControlLimits.requestReadTimeoutSeconds, sendSeconds: 30)
            guard admitted else {
                try? ControlFraming.send(ControlReply.failure(ControlFailure(
                    code: "busy", message: "the server is running \(ControlLimits.connectionsMax) control requests; try again")),
                    on: fd, bytesMax: ControlLimits.replyBytesMax)
                close(fd)
                continue
            }
            Thread.detachNewThread { [self] in
                serve(fd)
                close(fd)
                state.withLock { $0.activeConnections -= 1 }
            }
        }
    }

    private func serve(_ fd: Int32) {
        let reply: ControlReply
        do {
            let peer = try UnixSocket.checkPeerIsOwnerOrRoot(fd)
            let deadline = ContinuousClock.now + .seconds(ControlLimits.requestReadTimeoutSeconds)
            guard let envelope = try ControlFraming.receive(ControlEnvelope.self, from: fd, bytesMax: ControlLimits.requestBytesMax,
                                                            deadline: deadline) else {
                return
            }
            guard envelope.version == controlProtocolVersion else {
                throw ControlFailure(code: "protocol", message: "control protocol version \(envelope.version) is not supported (this server speaks \(controlProtocolVersion)); use the vbdtool that matches the server")
            }
            // The request may run long (fsck, import): no receive timeout while it does.
            UnixSocket.setTimeouts(fd, receiveSeconds: 0, sendSeconds: 30)
            logger.info("control request", metadata: ["request": "\(envelope.request)"])
            let result = try service.execute(envelope, actor: "uid:\(peer.uid) pid:\(peer.pid) (control socket)") { report in
                // Progress is best effort: a client that went away does not stop the work.
                try? ControlFraming.send(ControlReply.progress(report), on: fd, bytesMax: ControlLimits.replyBytesMax)
            }
            reply = .success(result)
        } catch {
            let failure = ControlFailure(error)
            if failure.code == "internal" || failure.code == "protocol" || failure.code == "io" || failure.code == "corrupted" {
                logger.warning("control request failed", metadata: ["code": "\(failure.code)", "message": "\(failure.message)"])
            }
            reply = .failure(failure)
        }
        do {
            try ControlFraming.send(reply, on: fd, bytesMax: ControlLimits.replyBytesMax)
        } catch {
            // Too large to send (a huge diff): say so instead.
            try? ControlFraming.send(ControlReply.failure(error), on: fd, bytesMax: ControlLimits.replyBytesMax)
        }
    }
}
