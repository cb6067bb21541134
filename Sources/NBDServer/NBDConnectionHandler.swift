import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import NIOSSL
import VBDAccounting
import VBDCore
import X509

// MARK: - Notes on the design
//
// The handler is the thin shell around the pure pieces of NBDProtocol: it feeds bytes to the
// ``NBDMessageParser``, hands messages to the handshake or transmission state machine, and performs
// the returned actions. Everything it does runs on the channel's event loop; device calls run on
// the I/O thread pools and come back as encoded reply buffers.
//
// Invariants:
// 1. Bounded memory. The handler asks the socket for more bytes (`read`) only when it could act on
//    them: during the handshake when no lookup or TLS upgrade is pending; during transmission when
//    fewer than `inFlightRequestsMax` requests and fewer than `inFlightBytesMax` payload bytes are in
//    flight and the channel is writable. So the inbound buffer holds at most one partial message
//    (<= 32 MiB + header) plus one socket read, and replies queued towards a slow client count
//    against the byte budget until the socket took them.
// 2. A request stays "in flight" from parsing until its reply has been written to the socket; only
//    then does NBD_CMD_DISC or server shutdown close the connection, so no acknowledged work is lost.
// 3. Unparseable input closes this connection only; state machines never see it.

/// Events the server sends down a connection's pipeline.
enum NBDConnectionEvent: Sendable {
    /// The server is stopping: take no new requests, finish the ones in flight, close.
    case shutdown
    /// A lease ended: connections of that domain to that volume finish in-flight requests and close.
    case leaseEnded(volume: String, domain: DomainID)
    /// These exports are no longer served here (their store is handed to another server): a
    /// connection to one of them (or opening one) finishes its in-flight requests and closes; it
    /// answers `isServing` with whether it did.
    case exportsWithdrawn(Set<String>, isServing: EventLoopPromise<Bool>)
}

final class NBDConnectionHandler: ChannelDuplexHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = Never
    typealias OutboundIn = Never
    typealias OutboundOut = ByteBuffer

    struct Environment: Sendable {
        var exports: any ExportProvider
        var limits: NBDServer.ServerLimits
        var tlsPolicy: NBDHandshakeStateMachine.TLSPolicy
        var sslContext: NIOSSLContext?
        /// The server checks client certificates against a CA: only then is a certificate an identity.
        var verifiesClientCertificates = false
        var readPool: NIOThreadPool
        var writePool: NIOThreadPool
        var observer: NBDRequestObserver?
        /// The request layer (admission, leases, scheduling, charges); nil without tenancy.
        var pipeline: RequestPipeline?
    }

    private enum Phase {
        case handshake(NBDHandshakeStateMachine)
        case transmission(NBDTransmissionStateMachine, any BlockDevice)
        case closed
    }

    private let environment: Environment
    private var logger: Logger
    private var phase: Phase
    private var parser: NBDMessageParser
    private var inbound: ByteBuffer?
    /// A handshake lookup or TLS upgrade is running; no option is parsed meanwhile.
    private var awaitingHandshakeResult = false
    /// The export a handshake lookup in flight opens (for `exportsWithdrawn`).
    private var exportBeingOpened: String?
    /// `read` was requested while the handler could not take more input.
    private var readDeferred = false
    /// The client closed its sending side (a half-close): nothing more will arrive, but what it
    /// sent is still handled and answered (see `finishEndedInput`).
    private var inputEnded = false
    private var inFlightBytes = 0
    /// True while `processInbound` runs: replies completed synchronously meanwhile (cache hits on
    /// the fast path, refusals) are written without a flush, and one flush at the end sends them
    /// together; re-entrant calls (a reply finishing inside the loop) return at once, the running
    /// loop picks up the input.
    private var processingInbound = false
    private var flushPending = false
    /// A flush is queued on the event loop for replies completed outside `processInbound`
    /// (requests finished by I/O threads or the scheduler): replies completed in one burst leave in
    /// one write, and the client is woken once for them rather than once each.
    private var flushScheduled = false
    private var shuttingDown = false
    private var handshakeTimeout: Scheduled<Void>?
    /// Armed while a message the client has begun (a request header, a WRITE payload) is incomplete
    /// and the server is reading: the client must finish it within `messageTimeout`.
    private var messageDeadline: Scheduled<Void>?
    /// Armed while the connection is in transmission with nothing in flight and nothing begun
    /// (only with an `idleTimeout`).
    private var idleDeadline: Scheduled<Void>?
    /// When the current message's clock started (nil: nothing begun, or the server not reading).
    /// `messageDeadline` may be scheduled for an earlier start; it re-arms itself from this.
    private var messageTimedSince: NIODeadline?
    /// When the connection became idle (nil: not idle, or no `idleTimeout`).
    private var idleSince: NIODeadline?
    /// Set once an export is opened under tenancy; nil without tenancy.
    private var session: RequestSession?
    /// SO_PEERCRED of a unix-socket client, read when it connected (nil over TCP).
    private let unixCredentials: UnixPeerCredentials?

    init(environment: Environment, unixCredentials: UnixPeerCredentials? = nil, logger: Logger) {
        self.environment = environment
        self.unixCredentials = unixCredentials
        self.logger = logger
        self.phase = .handshake(NBDHandshakeStateMachine(configuration: .init(
            tlsPolicy: environment.tlsPolicy,
            optionsMax: environment.limits.handshakeOptionsMax,
            requestBytesMax: environment.limits.requestBytesMax)))
        self.parser = NBDMessageParser(optionBytesMax: environment.limits.optionBytesMax,
                                       requestBytesMax: environment.limits.requestBytesMax)
    }

    // MARK: Channel events

    func channelActive(context: ChannelHandlerContext) {
        var greeting = context.channel.allocator.buffer(capacity: NBDWireSize.greeting)
        NBDHandshakeStateMachine.greeting(into: &greeting)
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
        let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        handshakeTimeout = context.eventLoop.assumeIsolated().scheduleTask(in: TimeAmount(environment.limits.handshakeTimeout)) {
            [self] in
            if case .handshake = self.phase {
                self.logger.info("handshake timed out")
                self.close(context: loopBoundContext.value)
            }
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimeout?.cancel()
        cancelDeadlines()
        phase = .closed
        inbound = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if case .closed = phase { return }
        repeat {
            Self.append(&incoming, to: &inbound, messageBytes: parser.pendingPayloadBytes, allocator: context.channel.allocator)
            processInbound(context: context)
        } while incoming.readableBytes > 0
    }

    /// Moves bytes of a socket read into the unread input `pending`. With nothing pending that
    /// becomes `incoming` itself. A WRITE payload arrives in many reads: the first time bytes
    /// are appended they go into a buffer sized for the whole message (`messageBytes`, the
    /// parser's ``NBDMessageParser/pendingPayloadBytes``) holding only the unread bytes; later reads
    /// append in place, and the read that completes the message gives it only the bytes it lacks,
    /// leaving the rest in `incoming` for after the message is parsed. So each payload byte is
    /// copied once and a buffer never outgrows its message. (Growing the buffer instead, by
    /// doubling and copy-on-write, carried along the bytes already consumed, which the previous
    /// request's payload still shares: a connection streaming 1 MiB writes piled up 2-8 MiB of
    /// buffer per queued request and spent most of its CPU copying.)
    static func append(_ incoming: inout ByteBuffer, to pending: inout ByteBuffer?, messageBytes: Int,
                       allocator: ByteBufferAllocator) {
        // Taken out of `pending`, so the buffer is uniquely referenced and appends happen in place.
        guard var accumulated = pending.take(), accumulated.readableBytes > 0 else {
            pending = incoming
            incoming.moveReaderIndex(to: incoming.writerIndex)
            return
        }
        if accumulated.readerIndex != 0 {
            // Inside a payload the pending bytes are part of it (the parser stops at the first
            // incomplete message); otherwise they are a partial header of a few bytes.
            let capacity = messageBytes > 0 ? messageBytes : accumulated.readableBytes + incoming.readableBytes
            var sized = allocator.buffer(capacity: max(capacity, accumulated.readableBytes))
            sized.writeBuffer(&accumulated)
            accumulated = sized
        }
        if accumulated.writableBytes >= incoming.readableBytes {
            accumulated.writeBuffer(&incoming)
        } else if accumulated.readableBytes < messageBytes && accumulated.capacity >= messageBytes,
                  var lacking = incoming.readSlice(length: messageBytes - accumulated.readableBytes) {
            // (The slice always exists here: incoming holds more than the buffer has room for,
            // and the room is at least what the message lacks.)
            accumulated.writeBuffer(&lacking)
        } else {
            // Whole messages still unparsed (the handler is not taking input): keep everything.
            var combined = allocator.buffer(capacity: accumulated.readableBytes + incoming.readableBytes)
            combined.writeBuffer(&accumulated)
            combined.writeBuffer(&incoming)
            accumulated = combined
        }
        pending = accumulated
    }

    func read(context: ChannelHandlerContext) {
        if canTakeInput(context: context) {
            context.read()
        } else {
            readDeferred = true
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        resumeIfPossible(context: context)
        context.fireChannelWritabilityChanged()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? ChannelEvent, case .inputClosed = event {
            inputEnded = true
            processInbound(context: context)   // ends the connection once the input is handled
            return
        }
        if let event = event as? NBDConnectionEvent {
            switch event {
            case .shutdown:
                beginShutdown(context: context)
            case .leaseEnded(let volume, let domain):
                if let session, session.domain == domain, session.tenancy.volume == volume {
                    logger.info("lease of \(domain) on \(volume) ended: closing after in-flight requests")
                    beginShutdown(context: context)
                }
            case .exportsWithdrawn(let names, let isServing):
                let export: String?
                switch phase {
                case .transmission(let machine, _): export = machine.export.export.name
                case .handshake: export = awaitingHandshakeResult ? exportBeingOpened : nil
                case .closed: export = nil
                }
                guard let export, names.contains(export) else {
                    isServing.succeed(false)
                    return
                }
                logger.info("export \(export) withdrawn from this server: closing after in-flight requests")
                beginShutdown(context: context)
                isServing.succeed(true)
            }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("connection error: \(error)")
        close(context: context)
    }

    // MARK: Input

    private func canTakeInput(context: ChannelHandlerContext) -> Bool {
        switch phase {
        case .closed:
            return false
        case .handshake:
            return !awaitingHandshakeResult
        case .transmission(let machine, _):
            return machine.canAcceptRequest && inFlightBytes < environment.limits.inFlightBytesMax
                && context.channel.isWritable
        }
    }

    private func resumeIfPossible(context: ChannelHandlerContext) {
        guard canTakeInput(context: context) else { return }
        processInbound(context: context)
        if readDeferred && canTakeInput(context: context) {
            readDeferred = false
            context.read()
        }
    }

    private func processInbound(context: ChannelHandlerContext) {
        guard !processingInbound else { return }
        processingInbound = true
        defer {
            processingInbound = false
            if flushPending {
                flushPending = false
                context.flush()
            }
            updateDeadlines(context: context)
            if inputEnded { finishEndedInput(context: context) }
        }
        while canTakeInput(context: context), var buffer = inbound {
            inbound = nil  // keeps `buffer` uniquely referenced while the parser consumes it
            let message: NBDClientMessage?
            do {
                message = try parser.nextMessage(from: &buffer)
            } catch {
                logger.info("closing connection: \(error)")
                close(context: context)
                return
            }
            // Drop a fully consumed buffer so the next socket read becomes the storage and slices
            // handed to WRITE requests do not pin or copy an ever-growing accumulation buffer.
            inbound = buffer.readableBytes > 0 ? buffer : nil
            guard let message else { return }
            messageTimedSince = nil  // finished: the next message, if begun, gets a clock of its own
            handle(message, context: context)
        }
    }

    private func handle(_ message: NBDClientMessage, context: ChannelHandlerContext) {
        switch phase {
        case .closed:
            return
        case .handshake(var machine):
            let action: NBDHandshakeStateMachine.Action
            switch message {
            case .clientFlags(let flags):
                action = machine.clientFlagsReceived(flags)
            case .option(let code, let payload):
                let option = NBDOption(code: code, payload: payload)
                logger.trace("option \(code)")
                action = machine.optionReceived(option)
            case .request:
                // The parser yields requests only after enterTransmission, which also switches
                // the phase; reaching this means the two drifted apart: end this connection.
                abort(.outOfOrder("request during the handshake"), context: context)
                return
            }
            phase = .handshake(machine)
            perform(action, context: context)
        case .transmission(var machine, let device):
            guard case .request(let request) = message else {
                abort(.outOfOrder("handshake message during transmission"), context: context)
                return
            }
            let receivedAt = ContinuousClock.now
            let action = machine.requestReceived(request)
            phase = .transmission(machine, device)
            switch action {
            case .execute(let operation)
                where !leasePermits(operation.command):
                let rejection = NBDRequestRejection(handle: operation.handle, command: operation.command,
                                                    error: .notPermitted,
                                                    message: "no write lease on \(machine.export.export.name)")
                var buffer = context.channel.allocator.buffer(capacity: 64 + rejection.message.utf8.count)
                NBDReplyEncoder.writeError(rejection, structured: machine.export.structuredReplies, into: &buffer)
                sendReply(buffer, promise: nil, context: context)
                // (charged as failed by the request layer when it refused)
                let completion = machine.requestCompleted()
                phase = .transmission(machine, device)
                if case .close = completion { close(context: context) }
            case .execute(let operation):
                execute(operation, payload: request.payload, device: device, machine: machine,
                        receivedAt: receivedAt, context: context)
            case .replyError(let rejection):
                logger.debug("request rejected: \(rejection.error) \(rejection.message)")
                var buffer = context.channel.allocator.buffer(capacity: 64 + rejection.message.utf8.count)
                NBDReplyEncoder.writeError(rejection, structured: machine.export.structuredReplies, into: &buffer)
                sendReply(buffer, promise: nil, context: context)
                if let command = rejection.command {
                    charge(command, bytes: 0, deviceTime: .zero, failed: true)
                    environment.observer?(NBDRequestRecord(
                        exportName: machine.export.export.name, command: command, bytes: UInt64(request.length),
                        duration: ContinuousClock.now - receivedAt, errorNumber: rejection.error.rawValue))
                }
            case .close:
                logger.debug("client disconnected (NBD_CMD_DISC)")
                close(context: context)
            case .abort(let reason):
                abort(reason, context: context)
            case .closeWhenIdle, .none:
                break
            }
        }
    }

    /// After the client half-closed, once the server has taken all the input it can: what is
    /// left is at most an incomplete message, which can never complete. The connection then ends
    /// as NBD_CMD_DISC would end it: requests in flight are answered, then it closes. While input
    /// is held back (requests in flight at the limit, an export lookup, a blocked socket) this
    /// waits; every one of those ends by processing input again, which calls this again.
    private func finishEndedInput(context: ChannelHandlerContext) {
        // Not taking input: held back (see above), closed, or already draining after a DISC.
        guard canTakeInput(context: context) else { return }
        switch phase {
        case .closed:
            return
        case .handshake:
            logger.debug("client closed its side during the handshake")
            close(context: context)
        case .transmission(var machine, let device):
            logger.debug("client closed its side: closing once requests in flight are answered")
            let action = machine.disconnectRequested()
            phase = .transmission(machine, device)
            if case .close = action { close(context: context) }
        }
    }

    // MARK: Deadlines

    /// Whether the client has begun a message it has not finished sending.
    private var messageStarted: Bool {
        !parser.isAtMessageBoundary || (inbound?.readableBytes ?? 0) > 0
    }

    /// Starts or stops the transmission clocks after input was processed or a request ended
    /// (the handshake has its own overall timeout). A message is timed only while the server is
    /// reading: waiting on the server's own backpressure is not the client's hold.
    ///
    /// This runs at every request completion, so it only records when a clock started: at most
    /// one timer per clock is scheduled, and when it fires it re-arms itself for the clock's
    /// current start instead of being cancelled and rescheduled per request (that churn cost a
    /// timer allocation and two heap operations per request at full queue depth).
    private func updateDeadlines(context: ChannelHandlerContext) {
        guard case .transmission(let machine, _) = phase else {
            cancelDeadlines()
            return
        }
        let started = messageStarted
        if started && canTakeInput(context: context) {
            if messageTimedSince == nil {
                let now = NIODeadline.now()
                messageTimedSince = now
                if messageDeadline == nil {
                    armMessageDeadline(at: now + TimeAmount(environment.limits.messageTimeout), context: context)
                }
            }
        } else {
            messageTimedSince = nil
        }
        if let idleTimeout = environment.limits.idleTimeout, !started, machine.inFlight == 0, !machine.isDisconnecting {
            if idleSince == nil {
                let now = NIODeadline.now()
                idleSince = now
                if idleDeadline == nil { armIdleDeadline(at: now + TimeAmount(idleTimeout), context: context) }
            }
        } else {
            idleSince = nil
        }
    }

    /// Fires at `deadline`; ends the connection if the message timed since then is still unfinished
    /// and the server still reading, else re-arms for the message being timed now, if any.
    private func armMessageDeadline(at deadline: NIODeadline, context: ChannelHandlerContext) {
        messageDeadline = schedule(at: deadline, context: context) { handler, context in
            handler.messageDeadline = nil
            guard let since = handler.messageTimedSince else { return }
            guard handler.messageStarted, handler.canTakeInput(context: context) else {
                handler.messageTimedSince = nil  // timed again when reading resumes
                return
            }
            let timeout = handler.environment.limits.messageTimeout
            let expires = since + TimeAmount(timeout)
            if expires > .now() {
                handler.armMessageDeadline(at: expires, context: context)
                return
            }
            handler.abort(.holdExpired("a started request was not completed within \(timeout)"), context: context)
        }
    }

    private func armIdleDeadline(at deadline: NIODeadline, context: ChannelHandlerContext) {
        idleDeadline = schedule(at: deadline, context: context) { handler, context in
            handler.idleDeadline = nil
            guard let since = handler.idleSince, let idleTimeout = handler.environment.limits.idleTimeout,
                  case .transmission(let machine, _) = handler.phase, machine.inFlight == 0,
                  !handler.messageStarted else {
                handler.idleSince = nil
                return
            }
            let expires = since + TimeAmount(idleTimeout)
            if expires > .now() {
                handler.armIdleDeadline(at: expires, context: context)
                return
            }
            handler.abort(.holdExpired("idle for \(idleTimeout)"), context: context)
        }
    }

    private func schedule(at deadline: NIODeadline, context: ChannelHandlerContext,
                          _ body: @escaping (NBDConnectionHandler, ChannelHandlerContext) -> Void) -> Scheduled<Void> {
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        return context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) {
            let (handler, context) = loopBound.value
            body(handler, context)
        }
    }

    private func cancelDeadlines() {
        messageDeadline?.cancel()
        messageDeadline = nil
        messageTimedSince = nil
        idleDeadline?.cancel()
        idleDeadline = nil
        idleSince = nil
    }

    // MARK: Handshake

    private func perform(_ action: NBDHandshakeStateMachine.Action, context: ChannelHandlerContext) {
        switch action {
        case .send(let replies):
            write(replies, context: context)

        case .sendAndClose(let replies, let reason):
            logger.debug("handshake ends: \(reason)")
            phase = .closed
            if replies.isEmpty {
                close(context: context)
            } else {
                let promise = context.eventLoop.makePromise(of: Void.self)
                write(replies, context: context, promise: promise)
                let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
                promise.futureResult.assumeIsolated().whenComplete { _ in
                    self.close(context: loopBoundContext.value)
                }
            }

        case .openExport(let name):
            awaitingHandshakeResult = true
            exportBeingOpened = name
            let exports = environment.exports
            let future = environment.readPool.runIfActive(eventLoop: context.eventLoop) {
                () -> Result<DeviceBox, BlockDeviceError> in
                do throws(BlockDeviceError) {
                    return .success(DeviceBox(device: try exports.openExport(named: name)))
                } catch {
                    return .failure(error)
                }
            }
            let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
            future.assumeIsolated().whenComplete { result in
                let context = loopBoundContext.value
                self.awaitingHandshakeResult = false
                self.exportBeingOpened = nil
                guard case .handshake(var machine) = self.phase else { return }
                let lookup: Result<NBDExportDescription, NBDExportLookupError>
                var device: (any BlockDevice)?
                var refused: String?
                if case .success(.success(let box)) = result { refused = self.refusal(box.device, context: context) }
                switch result {
                case .success(.success(let box)) where refused != nil:
                    let reason = refused ?? ""
                    self.logger.notice("refusing export \(box.device.name): \(reason)")
                    lookup = .failure(NBDExportLookupError(replyType: NBDOptionReplyType.errPolicy, message: reason))
                    self.session = nil
                case .success(.success(let box)):
                    device = box.device
                    lookup = .success(NBDExportDescription(
                        name: box.device.name, description: box.device.deviceDescription, size: box.device.size,
                        isReadOnly: box.device.isReadOnly,
                        preferredBlockSize: Self.preferredBlockSize(box.device.blockSize,
                                                                    max: self.environment.limits.requestBytesMax)))
                case .success(.failure(let error)):
                    lookup = .failure(NBDExportLookupError(error))
                case .failure(let error):
                    lookup = .failure(NBDExportLookupError(replyType: NBDOptionReplyType.errShutdown,
                                                           message: "server is shutting down: \(error)"))
                }
                let action = machine.exportOpened(lookup)
                self.phase = .handshake(machine)
                if case .enterTransmission(let final, let negotiated) = action, let device {
                    self.enterTransmission(final, negotiated, device: device, context: context)
                } else {
                    self.perform(action, context: context)
                }
                self.resumeIfPossible(context: context)
            }

        case .listExports:
            awaitingHandshakeResult = true
            let exports = environment.exports
            let future = environment.readPool.runIfActive(eventLoop: context.eventLoop) { exports.exportList() }
            let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
            future.assumeIsolated().whenComplete { result in
                let context = loopBoundContext.value
                self.awaitingHandshakeResult = false
                guard case .handshake(var machine) = self.phase else { return }
                let action: NBDHandshakeStateMachine.Action
                switch result {
                case .success(let list):
                    action = machine.exportListReceived(list.map { ($0.name, $0.description) })
                case .failure(let error):
                    action = machine.exportListFailed(NBDExportLookupError(
                        replyType: NBDOptionReplyType.errShutdown, message: "server is shutting down: \(error)"))
                }
                self.phase = .handshake(machine)
                self.perform(action, context: context)
                self.resumeIfPossible(context: context)
            }

        case .startTLS(let ack):
            guard let sslContext = environment.sslContext else {
                // NBDServer.start refuses a TLS policy without a context; a connection that gets
                // here anyway ends, the server does not.
                logger.error("closing connection: STARTTLS accepted without an SSL context")
                close(context: context)
                return
            }
            // proto.md: after the ACK the client starts TLS; anything it sent beyond the option
            // would be plaintext smuggled past the upgrade.
            if let inbound, inbound.readableBytes > 0 {
                logger.info("closing connection: \(NBDProtocolError.unexpectedDataBeforeTLS)")
                close(context: context)
                return
            }
            awaitingHandshakeResult = true
            write([ack], context: context)
            // A failing write can deliver input re-entrantly (NIO reads what the peer sent before
            // its reset): plaintext that arrived behind STARTTLS must not be parsed after it.
            if case .closed = phase { return }
            if let inbound, inbound.readableBytes > 0 {
                logger.info("closing connection: \(NBDProtocolError.unexpectedDataBeforeTLS)")
                close(context: context)
                return
            }
            // The ACK already passed down the pipeline in plaintext; everything after it is TLS.
            // Bytes reach this handler again only once the TLS handshake has succeeded (a failed
            // handshake surfaces as errorCaught and closes), so the upgrade counts as done here.
            do {
                try context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: sslContext),
                                                               position: .first)
            } catch {
                logger.error("cannot start TLS: \(error)")
                close(context: context)
                return
            }
            tlsHandshakeCompleted(context: context)

        case .enterTransmission:
            // Transmission starts only from an export lookup, which handles this action itself.
            abort(.outOfOrder("transmission without an opened export"), context: context)
        }
    }

    /// Why this connection may not open `device`, or nil when it may (always without tenancy).
    /// Decides the connection's domain from what it proved (its verified certificate, its unix
    /// credentials), then checks the export's binding and, when enforced, the domain's lease.
    /// Sets ``session`` for an admitted connection.
    private func refusal(_ device: any BlockDevice, context: ChannelHandlerContext) -> String? {
        guard let pipeline = environment.pipeline else { return nil }
        let identity = PeerIdentity(certificateSubject: verifiedCertificateSubject(context: context),
                                    unixCredentials: unixCredentials)
        switch pipeline.admit(device: device, identity: identity, door: .nbd) {
        case .failure(let refusal):
            return refusal.reason
        case .success(let admitted):
            session = admitted
            return nil
        }
    }

    /// The subject of the client certificate the TLS handshake verified against the server's CA,
    /// parsed by swift-certificates; nil on plain connections, without a CA (a certificate nobody
    /// checked proves nothing), or when the certificate cannot be parsed (logged).
    private func verifiedCertificateSubject(context: ChannelHandlerContext) -> CertificateSubject? {
        guard environment.verifiesClientCertificates,
              (try? context.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self)) != nil else { return nil }
        do {
            guard let peer = try context.pipeline.syncOperations.nioSSL_peerCertificate() else { return nil }
            return try Self.subject(of: Certificate(derEncoded: try peer.toDERBytes()))
        } catch {
            logger.warning("client certificate not usable as an identity: \(error)")
            return nil
        }
    }

    enum SubjectError: Error, CustomStringConvertible {
        case nonStringAttribute(String)
        var description: String { "subject attribute \(nonStringAttributeType) is not a string" }
        private var nonStringAttributeType: String {
            switch self { case .nonStringAttribute(let type): return type }
        }
    }

    /// A certificate's subject as a ``CertificateSubject`` (structured: no string is joined or split).
    static func subject(of certificate: Certificate) throws -> CertificateSubject {
        let names = try certificate.subject.map { relativeName in
            try relativeName.map { attribute in
                guard let value = String(attribute.value) else {
                    throw SubjectError.nonStringAttribute(attribute.type.description)
                }
                return CertificateSubject.Attribute(type: attribute.type.description, value: value)
            }
        }
        return CertificateSubject(certificateOrder: names)
    }

    /// proto.md, "Block size constraints": the preferred size is a power of two between 512 and the
    /// maximum; anything else the device reports is replaced by 4 KiB rather than sent as is.
    static func preferredBlockSize(_ blockSize: Int, max maximum: Int) -> UInt32 {
        guard blockSize >= 512, blockSize <= maximum, blockSize & (blockSize - 1) == 0 else { return 4096 }
        return UInt32(blockSize)
    }

    private func tlsHandshakeCompleted(context: ChannelHandlerContext) {
        guard case .handshake(var machine) = phase else { return }
        awaitingHandshakeResult = false
        let action = machine.tlsHandshakeCompleted()
        phase = .handshake(machine)
        logger.debug("TLS established")
        perform(action, context: context)
        resumeIfPossible(context: context)
    }

    private func enterTransmission(_ final: NBDHandshakeStateMachine.FinalReply, _ negotiated: NBDNegotiatedExport,
                                   device: any BlockDevice, context: ChannelHandlerContext) {
        handshakeTimeout?.cancel()
        // Phase and parser switch before the reply is written: a failing write makes NIO read
        // what the peer sent before its reset and deliver it to channelRead re-entrantly, and
        // those bytes must meet the transmission parser, never the finished handshake.
        parser.enterTransmission()
        phase = .transmission(
            NBDTransmissionStateMachine(export: negotiated, inFlightMax: environment.limits.inFlightRequestsMax),
            device)
        var buffer = context.channel.allocator.buffer(capacity: 256)
        final.encode(into: &buffer)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        logger[metadataKey: "export"] = "\(negotiated.export.name)"
        logger.debug("transmission starts", metadata: [
            "flags": "0x\(String(negotiated.transmissionFlags.rawValue, radix: 16))",
            "structured": "\(negotiated.structuredReplies)",
            "contexts": "\(negotiated.metaContexts)",
        ])
        if shuttingDown { beginShutdown(context: context) }
    }

    private func write(_ replies: [NBDOptionReply], context: ChannelHandlerContext,
                       promise: EventLoopPromise<Void>? = nil) {
        guard !replies.isEmpty else {
            promise?.succeed()
            return
        }
        var buffer = context.channel.allocator.buffer(capacity: 64 * replies.count)
        for reply in replies { reply.encode(into: &buffer) }
        context.writeAndFlush(wrapOutboundOut(buffer), promise: promise)
    }

    // MARK: Transmission

    private func execute(_ operation: NBDOperation, payload: ByteBuffer?, device: any BlockDevice,
                         machine: NBDTransmissionStateMachine, receivedAt: ContinuousClock.Instant,
                         context: ChannelHandlerContext) {
        let budgetBytes = operation.payloadBytes
        inFlightBytes += budgetBytes
        let job = NBDOperationJob(operation: operation, payload: payload, device: device,
                                  structured: machine.export.structuredReplies,
                                  extentsMax: environment.limits.extentsPerReplyMax,
                                  allocator: context.channel.allocator)
        let pool: NIOThreadPool
        switch operation {
        case .read, .cache, .blockStatus: pool = environment.readPool
        case .write, .flush, .trim, .writeZeroes: pool = environment.writePool
        }
        let promise = context.eventLoop.makePromise(of: MeasuredOutcome.self)
        let run: @Sendable () -> MeasuredOutcome = {
            let started = ContinuousClock.now
            let outcome = job.run()
            return MeasuredOutcome(outcome: outcome, deviceTime: ContinuousClock.now - started)
        }
        // A read the cache can answer, or a small write the store takes at once, is done on the
        // calling thread (an event loop, or whichever thread the scheduler dispatches from): no
        // hop to an I/O thread and back.
        let withoutBlocking: @Sendable () -> MeasuredOutcome? = {
            let started = ContinuousClock.now
            guard let outcome = job.runWithoutBlocking() else { return nil }
            return MeasuredOutcome(outcome: outcome, deviceTime: ContinuousClock.now - started)
        }
        let eventLoop = context.eventLoop
        // Scheduled: the scheduler (or its refusal, a full queue) completes the promise.
        var scheduled = false
        if let session, session.pipeline.schedules {
            let pieces = job.pieceCount
            let tracker = pieces > 1 ? NBDPieceTracker(pieces: pieces) : nil
            let work: @Sendable (Int, @escaping @Sendable () -> Void) -> Void = { piece, finished in
                if tracker == nil, let answered = withoutBlocking() {
                    finished()
                    promise.succeed(answered)
                    return
                }
                // Submitted without an event-loop future: only the piece that completes the request
                // (or an error) wakes the connection's loop, not every piece of a large write.
                NBDWorkChain.submit(to: pool) { state in
                    guard case .active = state else {
                        finished()  // the work never ran: free its slot
                        if let tracker, tracker.pieceDone(error: .gone("server is shutting down"), deviceTime: .zero) == nil {
                            return
                        }
                        promise.fail(NIOThreadPoolError.ThreadPoolInactive())
                        return
                    }
                    guard let tracker else {
                        let measured = run()
                        finished()
                        promise.succeed(measured)
                        return
                    }
                    let started = ContinuousClock.now
                    // After a failed piece the rest only count down: the reply is an error anyway.
                    let error = tracker.hasFailed ? nil : job.runPiece(piece)
                    guard let total = tracker.pieceDone(error: error, deviceTime: ContinuousClock.now - started) else {
                        finished()
                        return  // other pieces are still to run; the last one replies
                    }
                    let finishing = ContinuousClock.now
                    let outcome = job.finishPieces(firstError: total.firstError)
                    finished()
                    promise.succeed(MeasuredOutcome(outcome: outcome,
                                                    deviceTime: total.deviceTime + (ContinuousClock.now - finishing)))
                }
            }
            do {
                scheduled = try session.schedule(IOKind(operation.command) ?? .flush, bytes: operation.rangeBytes,
                                                 pieces: pieces, start: work)
            } catch {
                scheduled = true
                // Every queue is bounded: a domain with more requests waiting than its queue holds
                // gets ENOMEM for the excess instead of growing server memory.
                promise.succeed(MeasuredOutcome(
                    outcome: NBDOperationJob.failure(operation, .noMemory, "\(session.domain) has too many requests queued",
                                                     structured: job.structured, allocator: job.allocator),
                    deviceTime: .zero))
            }
        }
        if !scheduled {
            if let answered = withoutBlocking() {
                promise.succeed(answered)
            } else {
                pool.runIfActive(eventLoop: eventLoop, run).cascade(to: promise)
            }
        }
        let future = promise.futureResult
        let loopBoundContext = NIOLoopBound(context, eventLoop: context.eventLoop)
        let exportName = machine.export.export.name
        let observer = environment.observer
        future.assumeIsolated().whenComplete { result in
            let context = loopBoundContext.value
            let outcome: NBDOperationJob.Outcome
            var deviceTime = Duration.zero
            switch result {
            case .success(let value):
                outcome = value.outcome
                deviceTime = value.deviceTime
            case .failure:
                // The pool is shutting down: answer ESHUTDOWN as the spec suggests.
                outcome = NBDOperationJob.failure(operation, .shutdown, "server is shutting down",
                                                  structured: job.structured, allocator: job.allocator)
            }
            self.charge(operation.command, bytes: operation.rangeBytes, deviceTime: deviceTime,
                        failed: outcome.error != nil, sources: outcome.readSources)
            observer?(NBDRequestRecord(exportName: exportName, command: operation.command,
                                       bytes: operation.rangeBytes, duration: ContinuousClock.now - receivedAt,
                                       errorNumber: outcome.error?.rawValue))
            if let error = outcome.error {
                self.logger.debug("\(operation.command) failed: \(error) \(outcome.message)")
            }
            let written = context.eventLoop.makePromise(of: Void.self)
            self.sendReply(outcome.reply, promise: written, context: context)
            written.futureResult.assumeIsolated().whenComplete { _ in
                self.requestFinished(payloadBytes: budgetBytes, context: loopBoundContext.value)
            }
        }
    }

    /// Sends a transmission reply: inside `processInbound` it joins the batch flushed at the end of
    /// the loop (one write for many cache-hit replies); otherwise it joins the replies completed
    /// in the same pass over the event loop's tasks, flushed by a task queued behind them.
    private func sendReply(_ buffer: ByteBuffer, promise: EventLoopPromise<Void>?, context: ChannelHandlerContext) {
        context.write(wrapOutboundOut(buffer), promise: promise)
        if processingInbound {
            flushPending = true
        } else if !flushScheduled {
            flushScheduled = true
            context.eventLoop.assumeIsolated().execute {
                self.flushScheduled = false
                context.flush()
            }
        }
    }

    /// Whether the connection's lease allows `command` (always, without enforced leases); the
    /// request layer charges and counts a refusal.
    private func leasePermits(_ command: NBDCommand) -> Bool {
        guard let session, let kind = IOKind(command) else { return true }
        return session.permits(kind)
    }

    private func charge(_ command: NBDCommand, bytes: UInt64, deviceTime: Duration, failed: Bool,
                        sources: ReadSources = ReadSources()) {
        guard let session, let kind = IOKind(command) else { return }
        session.completed(kind, bytes: bytes, deviceTime: deviceTime, failed: failed, sources: sources)
    }

    private func requestFinished(payloadBytes: Int, context: ChannelHandlerContext) {
        inFlightBytes -= payloadBytes
        guard case .transmission(var machine, let device) = phase else { return }
        let action = machine.requestCompleted()
        phase = .transmission(machine, device)
        if case .close = action {
            close(context: context)
            return
        }
        resumeIfPossible(context: context)
    }

    // MARK: Closing

    private func beginShutdown(context: ChannelHandlerContext) {
        shuttingDown = true
        switch phase {
        case .closed:
            return
        case .handshake:
            // No request can be in flight yet; an export lookup that returns later finds the channel closed.
            close(context: context)
        case .transmission(var machine, let device):
            // Behave as if the client had sent NBD_CMD_DISC: requests in flight finish, then close.
            let action = machine.disconnectRequested()
            phase = .transmission(machine, device)
            if case .close = action { close(context: context) }
        }
    }

    /// Ends the connection because its input broke the protocol; logged with the peer.
    private func abort(_ reason: NBDProtocolError, context: ChannelHandlerContext) {
        logger.info("closing connection: \(reason)")
        close(context: context)
    }

    private func close(context: ChannelHandlerContext) {
        handshakeTimeout?.cancel()
        cancelDeadlines()
        phase = .closed
        inbound = nil
        context.close(promise: nil)
    }
}

/// A job's outcome and the time its device call took (charged to the domain).
struct MeasuredOutcome: Sendable {
    var outcome: NBDOperationJob.Outcome
    var deviceTime: Duration
}

/// Carries a device out of the thread pool (existentials of a Sendable protocol are Sendable, but
/// `Result` needs a concrete type).
struct DeviceBox: Sendable {
    var device: any BlockDevice
}

extension NBDOperation {
    /// The byte range the request covers, for accounting.
    var rangeBytes: UInt64 {
        switch self {
        case .read(_, _, let length, _), .write(_, _, let length, _), .trim(_, _, let length, _),
             .writeZeroes(_, _, let length, _, _, _), .cache(_, _, let length),
             .blockStatus(_, _, let length, _, _):
            return UInt64(length)
        case .flush:
            return 0
        }
    }
}
