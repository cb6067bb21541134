import Foundation
import Synchronization

/// Everything the server and the control interface share about tenants: who a connection belongs
/// to, what each domain used and was charged, its credit, its scheduling policy, its leases, and the
/// audit log of every change. The pure values (``Ledger``, ``CreditBook``, ``LeaseTable``,
/// ``AuditLog``) live behind one lock here.
///
/// ### Concurrency
/// All methods may be called from any thread. Lease-end observers are called after the lock is
/// released, on the caller's thread.
///
/// ### Persistence
/// Balances, charges, usage, leases, policies and bindings are written to ``StateStorage`` by
/// ``persist()`` (the server calls it periodically and on stop) and after every control change.
public final class TenancyService: Sendable {
    public struct Configuration: Sendable {
        public var resolver: DomainResolver
        public var defaultPolicy: SchedulingPolicy
        public var policies: [DomainID: SchedulingPolicy]
        public var credits: CreditBook
        /// When true, a domain may open a volume only while it holds a lease on it.
        public var leasesEnforced: Bool
        /// Requests the device serves at once, for utilisation. The NBD server sets it to its
        /// scheduler's dispatch slots when it starts (``setDeviceParallelism(_:)``), so the price and
        /// the scheduler agree on what "saturated" means.
        public var deviceParallelism: Int

        public init(resolver: DomainResolver = .init(), defaultPolicy: SchedulingPolicy = .init(),
                    policies: [DomainID: SchedulingPolicy] = [:], credits: CreditBook = .init(),
                    leasesEnforced: Bool = false,
                    deviceParallelism: Int = TenancyService.defaultDeviceParallelism) {
            self.resolver = resolver
            self.defaultPolicy = defaultPolicy
            self.policies = policies
            self.credits = credits
            self.leasesEnforced = leasesEnforced
            self.deviceParallelism = deviceParallelism
        }
    }

    /// What is persisted.
    struct PersistentState: Codable {
        var version = 1
        var bindings: [String: ExportBinding]
        var policies: [DomainID: SchedulingPolicy]
        var credits: CreditBook
        var leases: LeaseTable
        var ledger: Ledger
    }

    /// A consistent copy of the figures, for `vbdtool stats` and the metrics endpoint.
    public struct Snapshot: Sendable {
        public var ledger: Ledger
        public var credits: CreditBook
        public var leases: LeaseTable
        public var policies: [DomainID: SchedulingPolicy]
        public var defaultPolicy: SchedulingPolicy
        public var bindings: [String: ExportBinding]
        public var utilisation: Double
        public var price: Double
    }

    private struct State {
        var resolver: DomainResolver
        var defaultPolicy: SchedulingPolicy
        var policies: [DomainID: SchedulingPolicy]
        var credits: CreditBook
        var leases: LeaseTable
        var ledger: Ledger
        var meter: UtilisationMeter
        var leasesEnforced: Bool
        var observers: [@Sendable (Lease, LeaseEnd) -> Void] = []
    }

    private let state: Mutex<State>
    /// Separate from `state` so that appending (an fsync) never blocks request accounting.
    private let audit: Mutex<AuditLog?>
    private let stateStorage: (any StateStorage)?
    /// Held by `persist` from its snapshot of `state` to the stored file (lock order: `persisting`, then `state`).
    private let persisting = Mutex(())
    private let clock: @Sendable () -> WallTime
    private let monotonic: @Sendable () -> Duration
    public let leasesEnforced: Bool

    /// - Parameters:
    ///   - clock: wall time for leases and audit records (injected for tests).
    ///   - monotonic: time since any fixed origin, for the utilisation meter.
    public init(configuration: Configuration, stateStorage: (any StateStorage)? = nil,
                auditStorage: (any AuditStorage)? = nil,
                clock: @escaping @Sendable () -> WallTime = { WallTime.now() },
                monotonic: @escaping @Sendable () -> Duration = {
                    ContinuousClock.now - ContinuousClock.Instant.processStart
                }) throws {
        configuration.defaultPolicy.validate()
        var resolver = configuration.resolver
        var policies = configuration.policies
        var credits = configuration.credits
        var leases = LeaseTable()
        var ledger = Ledger()
        if let stateStorage, let bytes = try stateStorage.read() {
            let saved = try JSONDecoder().decode(PersistentState.self, from: Data(bytes))
            for (domain, policy) in saved.policies {
                if let problem = policy.problem {
                    throw SchedulerError.invalidPolicy("the saved policy of \(domain) is unusable: \(problem)")
                }
            }
            resolver.bindings.merge(saved.bindings) { configured, _ in configured }
            policies.merge(saved.policies) { configured, _ in configured }
            credits = saved.credits
            leases = saved.leases
            ledger = saved.ledger
        }
        let audit = try auditStorage.map { storage throws(AuditLogError) in try AuditLog(storage: storage) }
        self.state = Mutex(State(resolver: resolver, defaultPolicy: configuration.defaultPolicy, policies: policies,
                                 credits: credits, leases: leases, ledger: ledger,
                                 meter: UtilisationMeter(parallelism: configuration.deviceParallelism,
                                                         start: monotonic()),
                                 leasesEnforced: configuration.leasesEnforced))
        self.audit = Mutex(audit)
        self.stateStorage = stateStorage
        self.clock = clock
        self.monotonic = monotonic
        self.leasesEnforced = configuration.leasesEnforced
    }

    /// One slot per core, at least two: store requests are CPU-bound (hash, compress, verify), so
    /// more requests than cores only time-slice.
    public static var defaultDeviceParallelism: Int { max(2, ProcessInfo.processInfo.activeProcessorCount) }

    /// The parallelism utilisation is measured against (see ``Configuration/deviceParallelism``).
    public var deviceParallelism: Int { state.withLock { $0.meter.parallelism } }

    /// Measures utilisation against `parallelism` slots from now on (the smoothed level is kept).
    public func setDeviceParallelism(_ parallelism: Int) {
        precondition(parallelism > 0, "a device serves at least one request at a time")
        state.withLock { $0.meter.setParallelism(parallelism) }
    }

    // MARK: Requests

    /// Whether a client that proved `identity` may open `export` (the image `imageID`), and as which
    /// domain (see ``DomainResolver/admission(export:imageID:identity:authenticationRequired:)``).
    /// With leases enforced, a client that proved nothing is refused.
    public func admission(export: String, imageID: UInt64?, identity: PeerIdentity) -> DomainAdmission {
        state.withLock { state in
            state.resolver.admission(export: export, imageID: imageID, identity: identity,
                                     authenticationRequired: state.leasesEnforced)
        }
    }

    /// Whether `domain` may use `volume` (the image `imageID`) now (always true when leases are not
    /// enforced). A lease on an earlier image of the same name does not count.
    public func admits(volume: String, imageID: UInt64? = nil, domain: DomainID, write: Bool) -> Bool {
        let now = clock()
        return state.withLock { state in
            !state.leasesEnforced
                || state.leases.permits(volume: volume, imageID: imageID, domain: domain, write: write, now: now)
        }
    }

    public func policy(for domain: DomainID) -> SchedulingPolicy {
        state.withLock { $0.policies[domain] ?? $0.defaultPolicy }
    }

    public func isOverdrawn(_ domain: DomainID) -> Bool {
        state.withLock { $0.credits.account(domain).isOverdrawn }
    }

    /// Charges and counts one completed request; returns the charge.
    @discardableResult
    public func requestCompleted(domain: DomainID, kind: IOKind, bytes: UInt64, deviceTime: Duration,
                                 failed: Bool, cacheHits: UInt64 = 0, lastChanceHits: UInt64 = 0) -> Charge {
        let now = monotonic()
        return state.withLock { state in
            state.meter.record(busy: deviceTime, now: now)
            let units = IOCost.units(kind: kind, bytes: bytes)
            let charge = state.credits.charge(domain, units: units, utilisation: state.meter.utilisation)
            state.ledger.record(UsageRecord(domain: domain, kind: kind, bytes: bytes, deviceTime: deviceTime,
                                            failed: failed, ioUnits: units, charge: charge.amount,
                                            cacheHits: cacheHits, lastChanceHits: lastChanceHits))
            return charge
        }
    }

    public func snapshot() -> Snapshot {
        let now = monotonic()
        return state.withLock { state in
            state.meter.advance(to: now)
            return Snapshot(ledger: state.ledger, credits: state.credits, leases: state.leases,
                            policies: state.policies, defaultPolicy: state.defaultPolicy,
                            bindings: state.resolver.bindings, utilisation: state.meter.utilisation,
                            price: state.credits.priceFunction.price(utilisation: state.meter.utilisation))
        }
    }

    // MARK: Leases

    /// Called with every lease that ends (expired, revoked, released), to close its connections.
    public func addLeaseEndObserver(_ observer: @escaping @Sendable (Lease, LeaseEnd) -> Void) {
        state.withLock { $0.observers.append(observer) }
    }

    @discardableResult
    public func grantLease(volume: String, imageID: UInt64? = nil, domain: DomainID, mode: LeaseMode,
                           duration: Duration, actor: String) throws -> Lease {
        try changeLease(volume: volume, actor: actor, operation: AuditOperation.leaseGrant) { leases, now in
            try leases.grant(volume: volume, imageID: imageID, domain: domain, mode: mode, duration: duration, now: now)
        }
    }

    @discardableResult
    public func renewLease(volume: String, domain: DomainID, duration: Duration, actor: String) throws -> Lease {
        try changeLease(volume: volume, actor: actor, operation: AuditOperation.leaseRenew) { leases, now in
            try leases.renew(volume: volume, domain: domain, duration: duration, now: now)
        }
    }

    /// A grant or renewal: expires what is due first and logs it even if `change` then fails, so
    /// no expiry goes unrecorded; a successful change is logged as `operation`.
    private func changeLease(volume: String, actor: String, operation: String,
                             _ change: (inout LeaseTable, WallTime) throws -> Lease) throws -> Lease {
        let (result, expired, observers) = try control { state, now in
            let expired = state.leases.expire(now: now)
            var records = expired.map(Self.expiryRecord)
            let result = Result<Lease, any Error> { try change(&state.leases, now) }
            if case .success(let lease) = result {
                records.append(PendingRecord(actor: actor, operation: operation, target: volume,
                                             details: Self.details(lease)))
            }
            return ((result, expired, state.observers), records)
        }
        notify(observers, expired, .expired)
        let lease = try result.get()
        try persist()
        return lease
    }

    /// Ends a lease now; `release` is the holder giving it up, otherwise an operator revoke.
    @discardableResult
    public func revokeLease(volume: String, domain: DomainID, actor: String, release: Bool = false) throws -> Lease {
        let (lease, observers) = try control { state, now in
            let lease = try state.leases.revoke(volume: volume, domain: domain)
            var details = Self.details(lease)
            details["expiresAt"] = String(now.nanoseconds)
            let record = PendingRecord(actor: actor,
                                       operation: release ? AuditOperation.leaseRelease : AuditOperation.leaseRevoke,
                                       target: volume, details: details)
            return ((lease, state.observers), [record])
        }
        notify(observers, [lease], release ? .released : .revoked)
        try persist()
        return lease
    }

    /// Ends every lease past its expiry (the server calls this on a timer); returns them.
    @discardableResult
    public func expireLeases() throws -> [Lease] {
        let (ended, observers) = try control { state, now in
            let expired = state.leases.expire(now: now)
            return ((expired, state.observers), expired.map(Self.expiryRecord))
        }
        notify(observers, ended, .expired)
        if !ended.isEmpty { try persist() }
        return ended
    }

    public var nextLeaseExpiry: WallTime? { state.withLock { $0.leases.nextExpiry } }

    /// The images `names` were deleted: their leases end (connections to them close) and their
    /// bindings go, so a later image of the same name starts with neither. Audited.
    public func imagesDeleted(_ names: [String], actor: String) throws {
        let (dropped, observers) = try control { state, now in
            var dropped: [Lease] = []
            var records: [PendingRecord] = []
            for name in names {
                for lease in state.leases.drop(volume: name) {
                    dropped.append(lease)
                    var details = Self.details(lease)
                    details["expiresAt"] = String(now.nanoseconds)
                    records.append(PendingRecord(actor: actor, operation: AuditOperation.leaseDrop, target: name,
                                                 details: details))
                }
                if let binding = state.resolver.bindings.removeValue(forKey: name) {
                    records.append(PendingRecord(actor: actor, operation: AuditOperation.bindingDrop, target: name,
                                                 details: ["domain": binding.domain.name]))
                }
            }
            return ((dropped, state.observers), records)
        }
        notify(observers, dropped, .deleted)
        if !dropped.isEmpty || !names.isEmpty { try persist() }
    }

    // MARK: Policy and credit (control operations, all audited)

    public func setPolicy(_ policy: SchedulingPolicy, for domain: DomainID, actor: String) throws {
        if let problem = policy.problem { throw SchedulerError.invalidPolicy(problem) }
        try control { state, _ in
            state.policies[domain] = policy
            return ((), [PendingRecord(actor: actor, operation: AuditOperation.policySet, target: domain.name, details: [
                "reservation": "\(policy.reservation)", "limit": policy.limit.map { "\($0)" } ?? "none",
                "weight": "\(policy.weight)", "burstUnits": "\(policy.burstUnits)",
            ])])
        }
        try persist()
    }

    /// Only `domain` may open `export` from now on (the image `imageID`; see ``ExportBinding``).
    public func bind(export: String, to domain: DomainID, imageID: UInt64? = nil, actor: String) throws {
        guard !domain.name.isEmpty else { throw LeaseError.emptyDomain }
        try control { state, _ in
            state.resolver.bindings[export] = ExportBinding(domain: domain, imageID: imageID)
            var details = ["domain": domain.name]
            if let imageID { details["imageID"] = String(imageID) }
            return ((), [PendingRecord(actor: actor, operation: AuditOperation.bindingSet, target: export,
                                       details: details)])
        }
        try persist()
    }

    public func topUp(_ domain: DomainID, amount: Double, actor: String) throws {
        try control { state, _ in
            state.credits.topUp(domain, amount: amount)
            return ((), [PendingRecord(actor: actor, operation: AuditOperation.creditTopUp, target: domain.name,
                                       details: ["amount": "\(amount)",
                                                 "balance": "\(state.credits.account(domain).balance)"])])
        }
        try persist()
    }

    public func setOverdraftLimit(_ domain: DomainID, limit: Double, actor: String) throws {
        try control { state, _ in
            state.credits.setOverdraftLimit(domain, limit: limit)
            return ((), [PendingRecord(actor: actor, operation: AuditOperation.overdraftSet, target: domain.name,
                                       details: ["limit": "\(limit)"])])
        }
        try persist()
    }

    // MARK: Audit

    /// Appends a record for a control operation done elsewhere (create, snapshot, share, delete,
    /// resize, gc). Returns nil without an audit log.
    @discardableResult
    public func audit(actor: String, operation: String, target: String,
                      details: [String: String] = [:]) throws -> AuditRecord? {
        try audit.withLock { log throws -> AuditRecord? in
            try log?.append(actor: actor, operation: operation, target: target, details: details, time: clock())
        }
    }

    public func auditRecords() throws -> [AuditRecord] {
        try audit.withLock { log throws in try log?.records() ?? [] }
    }

    public func verifyAudit(anchor: AuditAnchor? = nil) throws -> AuditVerification? {
        try audit.withLock { log throws in try log?.verify(anchor: anchor) }
    }

    /// A record a control operation produced, appended after the state lock is released.
    private struct PendingRecord: Sendable {
        var actor: String
        var operation: String
        var target: String
        var details: [String: String]
    }

    /// Runs a control operation. Lock order: audit, then state. `change` mutates the state under
    /// the state lock (short); its records are appended and fsynced holding only the audit lock, so
    /// request accounting (state lock only) never waits for an fsync, while control operations stay
    /// serialised and the log's order is the order the changes were applied in.
    @discardableResult
    private func control<Value: Sendable>(
        _ change: (inout State, WallTime) throws -> (Value, [PendingRecord])
    ) throws -> Value {
        try audit.withLock { log throws -> Value in
            let now = clock()
            let (value, records) = try state.withLock { state throws -> (Value, [PendingRecord]) in
                try change(&state, now)
            }
            for record in records {
                try log?.append(actor: record.actor, operation: record.operation, target: record.target,
                                details: record.details, time: now)
            }
            return value
        }
    }

    // MARK: Persistence

    public func persist() throws {
        guard let stateStorage else { return }
        // The periodic persist and a control change's may run at once: the snapshot is taken
        // inside `persisting`, so the state written last is the newest.
        try persisting.withLock { _ in
            let saved = state.withLock { state in
                PersistentState(bindings: state.resolver.bindings, policies: state.policies, credits: state.credits,
                                leases: state.leases, ledger: state.ledger)
            }
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .prettyPrinted]
            try stateStorage.replace(with: Array(try encoder.encode(saved)))
        }
    }

    // MARK: Private

    private static func expiryRecord(_ lease: Lease) -> PendingRecord {
        PendingRecord(actor: "server", operation: AuditOperation.leaseExpire, target: lease.volume,
                      details: details(lease))
    }

    private static func details(_ lease: Lease) -> [String: String] {
        var details = ["domain": lease.domain.name, "mode": lease.mode.rawValue,
                       "expiresAt": String(lease.expiresAt.nanoseconds)]
        if let imageID = lease.imageID { details["imageID"] = String(imageID) }
        return details
    }

    private func notify(_ observers: [@Sendable (Lease, LeaseEnd) -> Void], _ leases: [Lease], _ end: LeaseEnd) {
        for lease in leases {
            for observer in observers { observer(lease, end) }
        }
    }
}

extension ContinuousClock.Instant {
    /// A fixed origin for turning instants into durations (the first use in this process).
    public static let processStart = ContinuousClock.now
}
