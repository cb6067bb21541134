import Logging
import NBDProtocol
import NIOCore
import VBDAccounting
import VBDCore

/// One completed transmission-phase request, reported to ``NBDServer/Configuration/observer``.
public struct NBDRequestRecord: Sendable, Equatable {
    public var exportName: String
    public var command: NBDCommand
    /// Payload bytes moved (READ and WRITE) or the range length (TRIM, WRITE_ZEROES, CACHE, BLOCK_STATUS).
    public var bytes: UInt64
    /// From the request being read off the socket to its reply being handed to the socket.
    public var duration: Duration
    /// The NBD error the client received, nil on success.
    public var errorNumber: UInt32?

    public init(exportName: String, command: NBDCommand, bytes: UInt64, duration: Duration, errorNumber: UInt32?) {
        self.exportName = exportName
        self.command = command
        self.bytes = bytes
        self.duration = duration
        self.errorNumber = errorNumber
    }
}

/// Called on an event-loop thread once per completed request. Keep it cheap: it runs inline with
/// reply processing (copy the record into a lock-protected counter or a bounded queue).
public typealias NBDRequestObserver = @Sendable (NBDRequestRecord) -> Void

extension NBDServer {
    /// How the server treats TLS (proto.md, "TLS support").
    public enum TLSMode: Sendable, Equatable {
        /// NOTLS: STARTTLS is refused with NBD_REP_ERR_POLICY.
        case off
        /// Clients may upgrade with STARTTLS; plain clients are served too.
        case optional(certificatePath: String, keyPath: String, caPath: String? = nil)
        /// FORCEDTLS: plain clients get NBD_REP_ERR_TLS_REQD. With `caPath`, client certificates
        /// signed by that CA are required as well.
        case required(certificatePath: String, keyPath: String, caPath: String? = nil)

        /// The CA client certificates are verified against; only a verified certificate is an identity.
        var caPath: String? {
            switch self {
            case .off: return nil
            case .optional(_, _, let ca), .required(_, _, let ca): return ca
            }
        }
    }

    /// Per-server and per-connection limits. The defaults come from ``VBDCore/Limits``; each one is
    /// explained there and in docs/NBD.md.
    public struct ServerLimits: Sendable, Equatable {
        /// Largest READ/WRITE payload (advertised as the maximum block size).
        public var requestBytesMax = Limits.nbdRequestBytesMax
        /// Requests executing or awaiting their reply on one connection.
        public var inFlightRequestsMax = Limits.nbdInFlightRequestsMax
        /// Payload bytes (WRITE data held, READ replies being built or queued) on one connection.
        /// Reading from the socket pauses above it: with the 32 MiB request limit this caps a
        /// connection near 64 MiB + one request, instead of inFlightRequestsMax x 32 MiB = 2 GiB.
        public var inFlightBytesMax = 2 * Limits.nbdRequestBytesMax
        public var connectionsMax = Limits.nbdConnectionsMax
        public var handshakeOptionsMax = Limits.nbdHandshakeOptionsMax
        public var optionBytesMax = Limits.nbdOptionBytesMax
        /// Extents asked of the device for one BLOCK_STATUS or READ plan.
        public var extentsPerReplyMax = Limits.nbdExtentsPerReplyMax
        /// A client must finish the handshake in this time, so idle sockets cannot hold connection slots.
        public var handshakeTimeout: Duration = .seconds(30)
        /// How long ``NBDServer/stop()`` waits for in-flight requests before closing connections
        /// (all connections together, not one after another).
        public var shutdownGracePeriod: Duration = .seconds(10)
        /// A request the client has begun (header or WRITE payload) must arrive whole within this
        /// while the server reads, so a half-sent 32 MiB WRITE cannot hold its buffer forever. At
        /// the 32 MiB request limit, 30 s admits clients down to about 1 MiB/s.
        public var messageTimeout: Duration = .seconds(30)
        /// Closes a connection with nothing in flight for this long; nil (the default) keeps idle
        /// connections, because a hypervisor's disk may be idle for hours and QEMU does not
        /// reconnect by default (its guest would see I/O errors).
        public var idleTimeout: Duration?
        /// Connections one peer may hold at once (one IP address over TCP, one uid over a unix
        /// socket), so one client cannot take every slot of ``connectionsMax``.
        public var connectionsPerPeerMax = Limits.nbdConnectionsPerPeerMax

        public init() {}

        /// Checks the relationships between limits: a budget must admit one maximal request.
        public func validate() {
            precondition(requestBytesMax > 0 && requestBytesMax <= Int(UInt32.max) - 8)
            precondition(inFlightBytesMax >= requestBytesMax, "in-flight budget must admit one maximal request")
            precondition(inFlightRequestsMax > 0 && connectionsMax > 0 && handshakeOptionsMax > 0)
            precondition(optionBytesMax >= 4 + NBDWireSize.stringBytesMax + 2, "an option must fit a maximal export name")
            precondition(extentsPerReplyMax > 0)
            precondition(messageTimeout > .zero && (idleTimeout ?? .seconds(1)) > .zero && connectionsPerPeerMax > 0)
        }
    }

    public struct Configuration: Sendable {
        public var exports: any ExportProvider
        /// TCP listen address, e.g. ("127.0.0.1", 10809); port 0 picks a free port (see ``NBDServer/tcpPort``).
        public var tcp: (host: String, port: Int)?
        /// Unix socket path; an existing socket file there is replaced.
        public var unixSocketPath: String?
        public var tls: TLSMode
        public var logger: Logger
        public var limits: ServerLimits
        /// Threads running device calls for reads, CACHE and BLOCK_STATUS. Writes have their own pool
        /// of the same size so that a read never queues behind slow writes.
        public var ioThreadsPerPool: Int
        /// Event-loop threads.
        public var eventLoopThreads: Int
        public var observer: NBDRequestObserver?
        /// Accounting, scheduling and leases; nil serves every client alike, uncharged and unscheduled.
        public var tenancy: Tenancy?

        public init(exports: any ExportProvider, tcp: (host: String, port: Int)? = nil, unixSocketPath: String? = nil,
                    tls: TLSMode = .off, logger: Logger = Logger(label: "vbd.nbd"), limits: ServerLimits = .init(),
                    ioThreadsPerPool: Int = 8, eventLoopThreads: Int = System.coreCount,
                    observer: NBDRequestObserver? = nil, tenancy: Tenancy? = nil) {
            self.exports = exports
            self.tcp = tcp
            self.unixSocketPath = unixSocketPath
            self.tls = tls
            self.logger = logger
            self.limits = limits
            self.ioThreadsPerPool = ioThreadsPerPool
            self.eventLoopThreads = eventLoopThreads
            self.observer = observer
            self.tenancy = tenancy
        }
    }

    /// How the server charges, schedules and admits tenants (docs/ACCOUNTING.md).
    public struct Tenancy: Sendable {
        /// Domains, ledger, credit, policies, leases and audit log; shared with the control interface.
        public var service: TenancyService { pipeline.tenancy }
        /// The request layer this server's connections go through (admission, leases, the
        /// scheduler, charges); other doors (vhost-user-blk) share it to be treated alike.
        public var pipeline: RequestPipeline
        /// Put the mClock scheduler in front of the I/O pools. Without it requests are still
        /// charged and leases still enforced, but run in arrival order.
        public var scheduling: Bool
        /// Requests on the device at once when scheduling. Fewer slots give the scheduler more say
        /// (and the device less parallelism). Default: the number of cores (at least 2, at most
        /// `ioThreadsPerPool`): the store's hashing and compression make requests CPU-bound, and
        /// more concurrent requests than cores only time-slice a reserved tenant's request with
        /// the others' (Benchmarks/hostile.sh: victim p99 4.7 ms with 8 slots, 2.3-3.5 ms with 2).
        public var deviceSlots: Int?
        /// Slots only reservation-phase requests may use, so a reserved tenant never waits behind
        /// requests served by weight (see ``NBDIOScheduler``). Clamped to deviceSlots - 1.
        public var reservedSlots: Int
        /// How often the server looks for expired leases.
        public var leaseCheckInterval: Duration
        /// How often balances, charges and usage are written to the state file.
        public var persistInterval: Duration

        public init(service: TenancyService, pipeline: RequestPipeline? = nil, scheduling: Bool = true, deviceSlots: Int? = nil,
                    reservedSlots: Int = 1, leaseCheckInterval: Duration = .milliseconds(200), persistInterval: Duration = .seconds(5)) {
            precondition(pipeline == nil || pipeline!.tenancy === service, "the pipeline must charge the same tenancy")
            self.pipeline = pipeline ?? RequestPipeline(tenancy: service)
            self.scheduling = scheduling
            self.deviceSlots = deviceSlots
            self.reservedSlots = reservedSlots
            self.leaseCheckInterval = leaseCheckInterval
            self.persistInterval = persistInterval
        }
    }
}
