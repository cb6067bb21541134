import Dispatch
import Logging
import NBDProtocol
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization
#if canImport(Glibc)
import Glibc
#endif
import VBDAccounting
import VBDCore

/// Serves ``VBDCore/ExportProvider`` exports over the NBD protocol (fixed newstyle), on TCP and/or a
/// unix socket, optionally with TLS.
///
/// ```swift
/// let server = NBDServer(configuration: .init(exports: provider, unixSocketPath: "/run/vbd.sock"))
/// try await server.start()
/// ...
/// await server.stop()
/// ```
///
/// ### Concurrency
/// `start` and `stop` may be called from any task; each connection lives on one event loop and
/// runs device calls on two I/O thread pools (reads, writes).
public final class NBDServer: Sendable {
    /// The request layer this server's connections go through (nil without tenancy): other doors
    /// (vhost-user-blk) admit, schedule and charge their requests through it too.
    public var requestPipeline: RequestPipeline? { configuration.tenancy?.pipeline }

    public enum ServerError: Error, CustomStringConvertible {
        case noListenAddress
        case alreadyStarted
        case tls(String)

        public var description: String {
            switch self {
            case .noListenAddress: return "no TCP address or unix socket path configured"
            case .alreadyStarted: return "the server was already started"
            case .tls(let detail): return "TLS setup failed: \(detail)"
            }
        }
    }

    private struct Running: @unchecked Sendable {
        // @unchecked: NIOThreadPool and the group are thread-safe classes; the rest are values.
        var group: MultiThreadedEventLoopGroup
        var readPool: NIOThreadPool
        var writePool: NIOThreadPool
        var listeners: [Channel]
        /// Lease expiry and state persistence timers (tenancy only).
        var timers: [RepeatedTask] = []
        /// The thread of the scheduler's eligibility timers and the tenancy timers (tenancy only).
        var tenancyGroup: MultiThreadedEventLoopGroup?
    }

    private struct State {
        var running: Running?
        var stopped = false
        /// From registering `running` until start() has bound its listeners (or failed).
        var starting = false
        /// stop() calls waiting for that.
        var startWaiters: [CheckedContinuation<Void, Never>] = []
        var connections: [ObjectIdentifier: Channel] = [:]
        /// Open connections per peer (``peerKey(_:)``), for ``ServerLimits/connectionsPerPeerMax``.
        var connectionsPerPeer: [String: Int] = [:]
        var nextConnectionNumber = 0
    }

    public let configuration: Configuration
    private let state = Mutex(State())

    public init(configuration: Configuration) {
        configuration.limits.validate()
        self.configuration = configuration
    }

    /// Addresses the server listens on (valid after ``start()``).
    public var localAddresses: [SocketAddress] {
        state.withLock { $0.running?.listeners.compactMap(\.localAddress) ?? [] }
    }

    /// The bound TCP port, useful when the configuration asked for port 0.
    public var tcpPort: Int? {
        localAddresses.lazy.compactMap(\.port).first
    }

    /// Number of open client connections.
    public var connectionCount: Int {
        state.withLock { $0.connections.count }
    }

    /// Binds the configured addresses and starts accepting clients.
    public func start() async throws {
        guard configuration.tcp != nil || configuration.unixSocketPath != nil else { throw ServerError.noListenAddress }
        let sslContext = try makeSSLContext()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoopThreads))
        let readPool = NIOThreadPool(numberOfThreads: max(1, configuration.ioThreadsPerPool))
        let writePool = NIOThreadPool(numberOfThreads: max(1, configuration.ioThreadsPerPool))
        readPool.start()
        writePool.start()
        ServingThreads.prepare(eventLoops: group, shortSlices: true)
        ServingThreads.prepare(pool: readPool, threads: max(1, configuration.ioThreadsPerPool), shortSlices: true)
        ServingThreads.prepare(pool: writePool, threads: max(1, configuration.ioThreadsPerPool), shortSlices: false)
        // Timers get a thread of their own rather than a connection's event loop: a limited
        // domain's requests are released by timer (thousands a second under a flood), and the
        // periodic persistence writes and syncs a file; neither should hold up the requests of
        // whichever connections share that loop. Registered with the rest, so stop() releases it.
        let tenancyGroup = configuration.tenancy.map { _ in MultiThreadedEventLoopGroup(numberOfThreads: 1) }
        if let tenancyGroup { ServingThreads.prepare(eventLoops: tenancyGroup, shortSlices: false) }
        let alreadyStarted = state.withLock { state -> Bool in
            if state.running != nil || state.stopped { return true }
            state.running = Running(group: group, readPool: readPool, writePool: writePool, listeners: [],
                                    tenancyGroup: tenancyGroup)
            state.starting = true
            return false
        }
        if alreadyStarted {
            try? await readPool.shutdownGracefully()
            try? await writePool.shutdownGracefully()
            try? await group.shutdownGracefully()
            try? await tenancyGroup?.shutdownGracefully()
            throw ServerError.alreadyStarted
        }

        let tlsPolicy: NBDHandshakeStateMachine.TLSPolicy
        switch configuration.tls {
        case .off: tlsPolicy = .disabled
        case .optional: tlsPolicy = .optional
        case .required: tlsPolicy = .required
        }
        var scheduler: NBDIOScheduler?
        if let tenancy = configuration.tenancy, let tenancyGroup {
            let tenancyLoop = tenancyGroup.next()
            // One notion of the device's parallelism for the scheduler's slots and the price's
            // utilisation meter (with or without scheduling).
            let slots = tenancy.deviceSlots ?? min(configuration.ioThreadsPerPool, tenancy.service.deviceParallelism)
            tenancy.service.setDeviceParallelism(slots)
            if tenancy.scheduling {
                scheduler = NBDIOScheduler(tenancy: tenancy.service, deviceSlots: slots,
                                           reservedSlots: min(max(0, tenancy.reservedSlots), slots - 1),
                                           timerLoop: tenancyLoop)
            }
            startTenancyTimers(tenancy, scheduler: scheduler, loop: tenancyLoop)
            tenancy.pipeline.attachScheduler(scheduler)
        }
        let environment = NBDConnectionHandler.Environment(
            exports: configuration.exports, limits: configuration.limits, tlsPolicy: tlsPolicy,
            sslContext: sslContext, verifiesClientCertificates: configuration.tls.caPath != nil,
            readPool: readPool, writePool: writePool, observer: configuration.observer,
            pipeline: configuration.tenancy?.pipeline)

        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: true)
            // A client that half-closes still gets the answers to what it sent (the handler
            // ends the connection once they are given).
            .childChannelOption(.allowRemoteHalfClosure, value: true)
            .childChannelInitializer { [self] channel in
                self.initialize(channel, environment: environment)
            }

        do {
            var listeners: [Channel] = []
            if let tcp = configuration.tcp {
                let channel = try await bootstrap
                    .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                    .bind(host: tcp.host, port: tcp.port).get()
                listeners.append(channel)
            }
            if let path = configuration.unixSocketPath {
                listeners.append(try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get())
            }
            state.withLock { $0.running?.listeners = listeners }
            finishStarting()
            configuration.logger.info("NBD server listening",
                                      metadata: ["addresses": "\(listeners.compactMap(\.localAddress))"])
        } catch {
            finishStarting()
            await stop()
            throw error
        }
    }

    /// Ends start()'s setup and lets the stop() calls that waited for it proceed.
    private func finishStarting() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.starting = false
            defer { state.startWaiters = [] }
            return state.startWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Lease expiry closes connections; balances and charges are persisted periodically.
    private func startTenancyTimers(_ tenancy: Tenancy, scheduler: NBDIOScheduler?, loop: any EventLoop) {
        let service = tenancy.service
        let logger = configuration.logger
        service.addLeaseEndObserver { [weak self] lease, end in
            guard let self else { return }
            logger.info("lease \(end.rawValue)", metadata: ["volume": "\(lease.volume)", "domain": "\(lease.domain)"])
            let connections = self.state.withLock { Array($0.connections.values) }
            for connection in connections {
                connection.pipeline.fireUserInboundEventTriggered(
                    NBDConnectionEvent.leaseEnded(volume: lease.volume, domain: lease.domain))
            }
        }
        let expiry = loop.scheduleRepeatedTask(initialDelay: TimeAmount(tenancy.leaseCheckInterval),
                                               delay: TimeAmount(tenancy.leaseCheckInterval)) { _ in
            do { try service.expireLeases() } catch { logger.error("lease expiry failed: \(error)") }
            scheduler?.refresh()
        }
        let persistence = loop.scheduleRepeatedTask(initialDelay: TimeAmount(tenancy.persistInterval),
                                                    delay: TimeAmount(tenancy.persistInterval)) { _ in
            do { try service.persist() } catch { logger.error("cannot persist accounting state: \(error)") }
        }
        state.withLock { $0.running?.timers += [expiry, persistence] }
    }

    /// Starts the server and serves until the calling task is cancelled (for example by the CLI's
    /// SIGINT/SIGTERM handler), then stops gracefully. For `vbdtool serve`.
    public func run() async throws {
        try await start()
        while !Task.isCancelled {
            try? await Task.sleep(for: .seconds(3600))
        }
        await stop()
    }

    /// Stops accepting, lets requests in flight finish (up to the shutdown grace period), closes
    /// every connection and releases the threads. Idempotent.
    public func stop() async {
        // A start() in flight finishes its setup first: shutting the event loops down under a
        // bind in progress leaks NIO promises (a crash in debug builds) and could leave the
        // listener or the tenancy thread unreleased.
        await withCheckedContinuation { (waiter: CheckedContinuation<Void, Never>) in
            let resumeNow = state.withLock { state -> Bool in
                guard state.starting else { return true }
                state.startWaiters.append(waiter)
                return false
            }
            if resumeNow { waiter.resume() }
        }
        let (running, connections) = state.withLock { state -> (Running?, [Channel]) in
            let running = state.running
            state.running = nil
            state.stopped = true
            return (running, Array(state.connections.values))
        }
        guard let running else { return }
        configuration.logger.info("NBD server stopping: no new connections, finishing requests in flight")
        for timer in running.timers { timer.cancel() }
        for listener in running.listeners {
            try? await listener.close()
        }
        for connection in connections {
            connection.pipeline.fireUserInboundEventTriggered(NBDConnectionEvent.shutdown)
        }
        // One grace period for all connections together: every deadline is armed before any
        // is awaited, so stuck connections cost the period once, not once each.
        let grace = TimeAmount(configuration.limits.shutdownGracePeriod)
        let deadlines = connections.map { connection in
            connection.eventLoop.scheduleTask(in: grace) { connection.close(promise: nil) }
        }
        for connection in connections {
            try? await connection.closeFuture.get()
        }
        for deadline in deadlines { deadline.cancel() }
        try? await running.readPool.shutdownGracefully()
        try? await running.writePool.shutdownGracefully()
        try? await running.group.shutdownGracefully()
        try? await running.tenancyGroup?.shutdownGracefully()
        if let tenancy = configuration.tenancy {
            do { try tenancy.service.persist() } catch {
                configuration.logger.error("cannot persist accounting state: \(error)")
            }
        }
        configuration.logger.info("NBD server stopped")
    }

    /// Ends the connections to any of `exports` (and handshakes opening one): each finishes its
    /// requests in flight, answering them, then closes (forced after the shutdown grace period).
    /// Other connections are untouched. The caller stops offering those exports first, so that no
    /// new connection opens one. Returns how many connections were closed.
    @discardableResult
    public func closeConnections(servingAnyOf exports: Set<String>) async -> Int {
        let connections = state.withLock { Array($0.connections.values) }
        var closing: [Channel] = []
        for connection in connections {
            let isServing = connection.eventLoop.makePromise(of: Bool.self)
            connection.pipeline.fireUserInboundEventTriggered(NBDConnectionEvent.exportsWithdrawn(exports, isServing: isServing))
            // A connection that closed meanwhile never sees the event: its promise would leak.
            connection.closeFuture.whenComplete { _ in isServing.succeed(false) }
            if (try? await isServing.futureResult.get()) == true { closing.append(connection) }
        }
        let grace = TimeAmount(configuration.limits.shutdownGracePeriod)
        let deadlines = closing.map { connection in
            connection.eventLoop.scheduleTask(in: grace) { connection.close(promise: nil) }
        }
        for connection in closing { try? await connection.closeFuture.get() }
        for deadline in deadlines { deadline.cancel() }
        return closing.count
    }

    private func initialize(_ channel: Channel, environment: NBDConnectionHandler.Environment) -> EventLoopFuture<Void> {
        let credentials = Self.peerCredentials(channel)
        let peer = Self.peerKey(channel, credentials: credentials)
        let limits = configuration.limits
        let admitted = state.withLock { state -> Result<Int, AdmissionRefusal> in
            guard state.running != nil else { return .failure(.stopping) }
            guard state.connections.count < limits.connectionsMax else { return .failure(.serverFull) }
            guard state.connectionsPerPeer[peer, default: 0] < limits.connectionsPerPeerMax else { return .failure(.peerFull) }
            state.connections[ObjectIdentifier(channel)] = channel
            state.connectionsPerPeer[peer, default: 0] += 1
            state.nextConnectionNumber += 1
            return .success(state.nextConnectionNumber)
        }
        let number: Int
        switch admitted {
        case .success(let admittedNumber):
            number = admittedNumber
        case .failure(let refusal):
            switch refusal {
            case .stopping: break
            case .serverFull:
                configuration.logger.warning("refusing connection: \(limits.connectionsMax) connections open")
            case .peerFull:
                configuration.logger.warning("refusing connection: \(peer) holds \(limits.connectionsPerPeerMax) connections")
            }
            channel.close(promise: nil)
            return channel.eventLoop.makeSucceededVoidFuture()
        }
        channel.closeFuture.whenComplete { [self] _ in
            state.withLock { state in
                state.connections.removeValue(forKey: ObjectIdentifier(channel))
                state.connectionsPerPeer[peer, default: 1] -= 1
                if state.connectionsPerPeer[peer] == 0 { state.connectionsPerPeer.removeValue(forKey: peer) }
            }
            configuration.logger.debug("connection closed", metadata: ["connection": "\(number)"])
        }
        var logger = configuration.logger
        logger[metadataKey: "connection"] = "\(number)"
        logger[metadataKey: "peer"] = "\(channel.remoteAddress.map { "\($0)" } ?? "unix")"
        let handler = NBDConnectionHandler(environment: environment, unixCredentials: credentials, logger: logger)
        return channel.eventLoop.makeCompletedFuture {
            try channel.pipeline.syncOperations.addHandler(handler)
        }
    }

    private enum AdmissionRefusal: Error {
        case stopping, serverFull, peerFull
    }

    /// Who a connection's per-peer limit counts against: its IP address over TCP, the uid of the
    /// connecting process over a unix socket (SO_PEERCRED).
    static func peerKey(_ channel: Channel, credentials: UnixPeerCredentials?) -> String {
        if let address = channel.remoteAddress, let ip = address.ipAddress { return "ip \(ip)" }
        if let credentials { return "uid \(credentials.uid)" }
        return "unix"
    }

    /// What the kernel says about the process at the other end of a unix-socket channel
    /// (SO_PEERCRED: fixed when it connected, so it cannot be forged by the peer), nil elsewhere.
    static func peerCredentials(_ channel: Channel) -> UnixPeerCredentials? {
        guard let provider = channel as? SocketOptionProvider, channel.eventLoop.inEventLoop,
              case .unixDomainSocket = channel.localAddress else { return nil }
        let future: EventLoopFuture<UnixPeerCredentials> = provider.unsafeGetSocketOption(
            level: .init(SOL_SOCKET), name: .init(SO_PEERCRED))
        // On the channel's own loop the option is read at once; the future is already complete.
        var credentials: UnixPeerCredentials?
        future.whenSuccess { credentials = $0 }
        return credentials
    }

    private func makeSSLContext() throws -> NIOSSLContext? {
        let certificatePath: String, keyPath: String, caPath: String?
        switch configuration.tls {
        case .off:
            return nil
        case .optional(let cert, let key, let ca), .required(let cert, let key, let ca):
            (certificatePath, keyPath, caPath) = (cert, key, ca)
        }
        do {
            let chain = try NIOSSLCertificate.fromPEMFile(certificatePath).map { NIOSSLCertificateSource.certificate($0) }
            let key = try NIOSSLPrivateKey(file: keyPath, format: .pem)
            var tls = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key))
            tls.minimumTLSVersion = .tlsv12  // proto.md, "TLS versions"
            if let caPath {
                tls.trustRoots = .file(caPath)
                tls.certificateVerification = .noHostnameVerification
            }
            return try NIOSSLContext(configuration: tls)
        } catch {
            throw ServerError.tls("\(error)")
        }
    }
}
