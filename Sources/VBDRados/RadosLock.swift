import CRados
import Dispatch
import Logging
import Synchronization
import VBDCore
#if canImport(Glibc)
import Glibc
#endif

/// A client holding a RADOS lock, as `rados_list_lockers` reports it.
public struct RadosLockHolder: Sendable, Equatable {
    /// `client.N`: the holder's global id.
    public var client: String
    public var cookie: String
    /// The holder's address, e.g. `127.0.0.1:0/2749102874`.
    public var address: String
}

/// A lock on one object (`cls_lock` in the OSD) with an expiry: a holder that stops renewing it
/// loses it after `durationSeconds`, and the next `acquire` by anyone succeeds.
///
/// Expiry alone does not stop a holder that is merely slow or cut off: its writes already sent may
/// still land. ``takeOver(waitingUpTo:force:)`` therefore blocklists the previous holder's client
/// instances before it returns (fencing, as RBD's exclusive lock does), after which the OSDs refuse
/// their operations. The holder's addresses are kept in an attribute of the lock object (the holder
/// record), because an expired lock no longer lists its holder.
///
/// The lock is taken and renewed through `pool`'s client; the holder writes its data through the
/// `dataClients`, other instances, so that a renewal never queues behind data writes (in
/// librados' in-flight throttle, its OSD session, the OSD's queue for that client). The holder record
/// names every one of them, and a takeover fences them all.
public final class RadosLock: Sendable {
    /// The pool (and client instance) the lock is taken and renewed through.
    public let pool: RadosPool
    /// The holder's other client instances, which write its data: fenced together with `pool`'s.
    public let dataClients: [RadosConnection]
    public let object: String
    public let lockName: String
    /// Names this holder (one per process and lock; a renewal must present the same cookie).
    public let cookie: String
    public let durationSeconds: Int
    public let exclusive: Bool

    static let holderAttribute = "vbd.lock-holder"
    /// LIBRADOS_LOCK_FLAG_MUST_RENEW (a macro Swift does not import): renew, or fail if not held.
    static let mustRenewFlag: UInt8 = 1 << 1
    /// The `tag` all shared holders of a lock present (cls_lock requires one tag per shared lock).
    static let sharedTag = "vbd.readers"

    /// The name of the lock vbd takes on a family's lock object (cls_lock keeps locks by name).
    public static let ownerLockName = "vbd.owner"

    public init(pool: RadosPool, object: String, lockName: String = RadosLock.ownerLockName, exclusive: Bool,
                durationSeconds: Int, dataClients: [RadosConnection] = []) throws(RadosError) {
        precondition(durationSeconds > 0, "a lock without expiry cannot be taken over")
        self.pool = pool
        self.dataClients = dataClients
        self.object = object
        self.lockName = lockName
        self.exclusive = exclusive
        self.durationSeconds = durationSeconds
        var random = SystemRandomNumberGenerator()
        let instance = try pool.connection.instanceID()
        self.cookie = "\(instance)-\(String(random.next() as UInt64, radix: 16))"
    }

    /// When the last successful lock or renewal call was sent (monotonic seconds): the OSD counts
    /// the duration from when it ran the call, which is later, so the lock lasts at least until
    /// this plus the duration.
    private let sentAtLastSuccess = Mutex<Double>(0)
    public var confirmedAt: Double { sentAtLastSuccess.withLock { $0 } }

    private func lock(flags: UInt8, operation: String) throws(RadosError) {
        let ioctx = try pool.handle("\(operation) \(pool.describe(object))")
        let sentAt = monotonicSeconds()
        var duration = timeval(tv_sec: durationSeconds, tv_usec: 0)
        let description = "vbd " + (exclusive ? "owner" : "reader")
        let rc: Int32
        if exclusive {
            rc = rados_lock_exclusive(ioctx, object, lockName, cookie, description, &duration, flags)
        } else {
            rc = rados_lock_shared(ioctx, object, lockName, cookie, Self.sharedTag, description, &duration, flags)
        }
        if rc != 0 { throw RadosError("\(operation) \(pool.describe(object))", code: rc) }
        sentAtLastSuccess.withLock { $0 = max($0, sentAt) }
    }

    /// Takes the lock; EBUSY when someone else holds it.
    public func acquire() throws(RadosError) {
        try lock(flags: 0, operation: exclusive ? "lock exclusive" : "lock shared")
        if exclusive { try recordHolder() }
    }

    /// Extends the lock by its duration from now. Fails (ENOENT) when the lock is no longer ours:
    /// it expired and someone else took it, or it was broken.
    public func renew() throws(RadosError) {
        try lock(flags: Self.mustRenewFlag, operation: "renew lock")
    }

    /// Gives the lock up (a lock that is no longer ours is not an error).
    ///
    /// An exclusive holder first erases its record from the lock object (only if it is still its
    /// own): it has stopped writing, so whoever takes the lock next has nobody to fence, and must not
    /// blocklist a client that may go on serving other objects.
    public func release() {
        guard let ioctx = try? pool.handle("unlock") else { return }
        if exclusive, let record = recordedHolder.withLock({ $0 }) {
            try? pool.operate(object) { op in
                op.assertAttribute(Self.holderAttribute, equals: Array(record.utf8))
                op.removeAttribute(Self.holderAttribute)
            }
        }
        _ = rados_unlock(ioctx, object, lockName, cookie)
    }

    /// Who holds the lock now (expired holders are not listed).
    public func holders() throws(RadosError) -> [RadosLockHolder] {
        try Self.holders(pool: pool, object: object, lockName: lockName)
    }

    static func holders(pool: RadosPool, object: String, lockName: String) throws(RadosError) -> [RadosLockHolder] {
        let ioctx = try pool.handle("list lockers \(pool.describe(object))")
        var capacity = 1024
        while true {
            var exclusive: Int32 = 0
            var tag = [CChar](repeating: 0, count: capacity)
            var clients = tag
            var cookies = tag
            var addresses = tag
            var tagLength = capacity, clientsLength = capacity, cookiesLength = capacity, addressesLength = capacity
            let count = rados_list_lockers(ioctx, object, lockName, &exclusive, &tag, &tagLength, &clients, &clientsLength,
                                           &cookies, &cookiesLength, &addresses, &addressesLength)
            if count == -Int(ERANGE) && capacity < 1 << 20 { capacity *= 8; continue }
            if count == -Int(ENOENT) { return [] }
            if count < 0 { throw RadosError("list lockers \(pool.describe(object))", code: Int32(count)) }
            // Each list is `count` NUL-terminated strings back to back.
            func split(_ buffer: [CChar], _ length: Int) -> [String] {
                buffer[..<min(length, buffer.count)].split(separator: 0, omittingEmptySubsequences: false)
                    .prefix(count).map { String(decoding: $0.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
            }
            let c = split(clients, clientsLength), k = split(cookies, cookiesLength), a = split(addresses, addressesLength)
            return (0..<min(c.count, k.count, a.count)).map { RadosLockHolder(client: c[$0], cookie: k[$0], address: a[$0]) }
        }
    }

    /// The addresses of this holder's client instances: the lock's own first, then the data clients'.
    public func ownAddresses() throws(RadosError) -> [String] {
        var addresses = [try pool.connection.clientAddress()]
        for client in dataClients { addresses.append(try client.clientAddress()) }
        return addresses
    }

    /// Notes this holder's client addresses on the lock object (one per line), so that whoever
    /// takes the lock over after it expired knows which clients to fence.
    private func recordHolder() throws(RadosError) {
        let record = try ownAddresses().joined(separator: "\n")
        try pool.setAttribute(object, Self.holderAttribute, Array(record.utf8))
        recordedHolder.withLock { $0 = record }
    }

    /// The record this holder wrote into the lock object, if it did.
    private let recordedHolder = Mutex<String?>(nil)

    /// The addresses in a holder record (a record written before the data had instances of their
    /// own holds one address).
    static func addresses(inRecord record: [UInt8]) -> [String] {
        String(decoding: record, as: UTF8.self).split(separator: "\n").map(String.init).filter { !$0.isEmpty }
    }

    /// Takes an exclusive lock that another client may hold, and fences that client.
    ///
    /// Without `force` it waits (up to `waitingUpTo` seconds) for the holder to hand the lock over
    /// (release it) or for its lock to expire, which happens only if the holder stopped renewing it;
    /// a live holder keeps it and this throws EBUSY. With `force` the holder is declared dead now:
    /// it is blocklisted first and its lock broken.
    /// Once the lock is ours, the holder recorded in the lock object is blocklisted for
    /// `blocklistSeconds`: a holder that released cleanly erased its record, so only one that lost
    /// the lock without handing it over is fenced (a holder seen while waiting that then released
    /// is not). The record names all the holder's client instances (the one that renewed the lock
    /// and the ones that wrote its data), and all are fenced. This holder's instances wait for the
    /// OSD map that carries the blocklist before returning, so that their first operation on an
    /// object brings the entry to its placement group and the old holder's writes are refused from
    /// then on. Returns the addresses it blocklisted.
    /// `whileWaiting` is called once, with the holders, when the lock is first found taken.
    @discardableResult
    public func takeOver(waitingUpTo seconds: Double, force: Bool = false, blocklistSeconds: UInt32 = 3600,
                         whileWaiting: ([RadosLockHolder]) -> Void = { _ in }) throws(RadosError) -> [String] {
        precondition(exclusive, "only an exclusive lock is taken over")
        let own = try ownAddresses()
        var fenced: [String] = []
        func fence(_ addresses: [String]) throws(RadosError) {
            var added = false
            for address in addresses where !address.isEmpty && !own.contains(where: { Self.sameClient($0, address) })
                && !fenced.contains(where: { Self.sameClient($0, address) }) {
                try pool.connection.blocklist(address: address, seconds: blocklistSeconds)
                fenced.append(address)
                added = true
            }
            if added {
                try pool.connection.waitForLatestMap()
                for client in dataClients { try client.waitForLatestMap() }
            }
        }
        let deadline = monotonicSeconds() + seconds
        var reportedWaiting = false
        while true {
            let current = try holders()
            if force && !current.isEmpty {
                try fence(current.map(\.address))
                let ioctx = try pool.handle("break lock \(pool.describe(object))")
                for holder in current where holder.cookie != cookie {
                    let rc = rados_break_lock(ioctx, object, lockName, holder.client, holder.cookie)
                    if rc != 0 && rc != -ENOENT { throw RadosError("break lock of \(holder.client) on \(pool.describe(object))", code: rc) }
                }
            }
            do {
                try lock(flags: 0, operation: "lock exclusive")
                break
            } catch where error.code == EBUSY {
                if !reportedWaiting {
                    reportedWaiting = true
                    whileWaiting(current)
                }
                if monotonicSeconds() >= deadline { throw error }
                // A handover frees the lock at any moment and the client waits meanwhile: poll often
                // (two small operations each time), and at least ten times per lock duration.
                usleep(UInt32(min(Double(durationSeconds) / 10, 0.1) * 1_000_000))
            }
        }
        // Read only now that the lock is ours: a holder that handed over while we waited has erased it.
        if let recorded = try pool.attribute(object, Self.holderAttribute) {
            try fence(Self.addresses(inRecord: recorded))
        }
        try recordHolder()
        return fenced
    }

    /// Addresses name the same client when they differ only in the protocol prefix (`v2:`).
    static func sameClient(_ a: String, _ b: String) -> Bool {
        func strip(_ s: String) -> Substring {
            var t = Substring(s)
            if t.hasPrefix("[") { t = t.dropFirst() }
            if t.hasSuffix("]") { t = t.dropLast() }
            for prefix in ["v2:", "v1:", "any:"] where t.hasPrefix(prefix) { t = t.dropFirst(prefix.count) }
            return t
        }
        return strip(a) == strip(b)
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Renews a ``RadosLock`` in the background, at a third of its duration, and says when it can no
/// longer vouch for it: a renewal was refused (the lock was broken or taken over), or none
/// succeeded for longer than the lock lasts (the cluster was unreachable, so another server may have
/// taken the lock after its expiry). From then on ``isHeld`` is false for good, and `onLost` has
/// been called once (from a background queue) with the reason.
///
/// Every renewal's round trip is traced: logged at debug level, and as a warning when it took more
/// than a third of the duration (the interval between renewals), since three times that loses the lock.
public final class RadosLockKeeper: @unchecked Sendable {
    public let lock: RadosLock
    private let logger: Logger
    private struct State {
        var lastConfirmed: Double
        var lostReason: String?
        var stopped = false
        var renewals = 0
        var longestRoundTrip = 0.0
    }
    private let state: Mutex<State>
    private let queue: DispatchQueue
    private let timer: DispatchSourceTimer
    /// Checks the lock's validity on a queue of its own: a renewal can block for the whole
    /// operation timeout when the cluster does not answer, and the loss must be reported when the
    /// lock's time runs out, not when that call finally returns.
    private let expiryQueue: DispatchQueue
    private let expiryTimer: DispatchSourceTimer
    private let onLost: @Sendable (String) -> Void

    /// Starts renewing `lock`, which the caller has just acquired (its validity counts from the
    /// moment the acquiring call was sent).
    public init(lock: RadosLock, logger: Logger = Logger(label: "vbd.rados.lock"),
                onLost: @escaping @Sendable (String) -> Void = { _ in }) {
        self.lock = lock
        self.logger = logger
        self.onLost = onLost
        self.state = Mutex(State(lastConfirmed: lock.confirmedAt))
        self.queue = DispatchQueue(label: "vbd.rados.lock-keeper")
        self.timer = DispatchSource.makeTimerSource(queue: queue)
        let interval = Double(lock.durationSeconds) / 3
        timer.schedule(deadline: .now() + interval, repeating: interval)
        self.expiryQueue = DispatchQueue(label: "vbd.rados.lock-expiry")
        self.expiryTimer = DispatchSource.makeTimerSource(queue: expiryQueue)
        timer.setEventHandler { [weak self] in self?.renewNow() }
        let check = max(Double(lock.durationSeconds) / 10, 0.05)
        expiryTimer.schedule(deadline: .now() + check, repeating: check)
        expiryTimer.setEventHandler { [weak self] in
            guard let self, !self.state.withLock({ $0.stopped }) else { return }
            _ = self.lostReason
        }
        timer.resume()
        expiryTimer.resume()
    }

    deinit {
        timer.cancel()
        expiryTimer.cancel()
    }

    /// Renews at once (also what the timer does).
    func renewNow() {
        if state.withLock({ $0.stopped || $0.lostReason != nil }) { return }
        let sentAt = monotonicSeconds()
        do {
            try lock.renew()
        } catch {
            let roundTrip = monotonicSeconds() - sentAt
            markLost("renewing the lock on \(lock.pool.describe(lock.object)) failed after \(Self.format(roundTrip)) s: \(error)")
            return
        }
        let roundTrip = monotonicSeconds() - sentAt
        let confirmed = lock.confirmedAt
        state.withLock {
            $0.lastConfirmed = max($0.lastConfirmed, confirmed)
            $0.renewals += 1
            $0.longestRoundTrip = max($0.longestRoundTrip, roundTrip)
        }
        let metadata: Logger.Metadata = ["lock": "\(lock.pool.describe(lock.object))", "round-trip": "\(Self.format(roundTrip)) s",
                                         "duration": "\(lock.durationSeconds) s"]
        if roundTrip > Double(lock.durationSeconds) / 3 {
            logger.warning("renewing the lock took more than a third of its duration", metadata: metadata)
        } else {
            logger.debug("renewed the lock", metadata: metadata)
        }
    }

    /// Renewals that succeeded, and the longest round trip among them (seconds).
    public var renewalStatistics: (count: Int, longestRoundTrip: Double) {
        state.withLock { ($0.renewals, $0.longestRoundTrip) }
    }

    static func format(_ seconds: Double) -> String {
        fixedPointText(UInt64(max(0, (seconds * 1000).rounded())), decimals: 3)
    }

    private func markLost(_ reason: String) {
        let first = state.withLock { s -> Bool in
            guard s.lostReason == nil else { return false }
            s.lostReason = reason
            return true
        }
        if first { onLost(reason) }
    }

    /// Why the lock can no longer be vouched for, or nil while it is held. A margin of a tenth of
    /// the duration allows for the holder's and the OSD's clocks running at slightly different rates.
    public var lostReason: String? {
        let (reason, confirmed) = state.withLock { ($0.lostReason, $0.lastConfirmed) }
        if let reason { return reason }
        let validFor = Double(lock.durationSeconds) * 0.9
        if monotonicSeconds() - confirmed > validFor {
            let reason = "no renewal of the lock on \(lock.pool.describe(lock.object)) succeeded for \(lock.durationSeconds) s"
            markLost(reason)
            return reason
        }
        return nil
    }

    public var isHeld: Bool { lostReason == nil }

    /// Stops renewing (the lock then expires unless released) and waits for a running renewal.
    /// A lost lock's renewal may still be blocked in librados (an unreachable cluster) and can no
    /// longer succeed (MUST_RENEW of an expired lock fails): then this does not wait for it.
    public func stop() {
        let lost = state.withLock { s -> Bool in
            s.stopped = true
            return s.lostReason != nil
        }
        timer.cancel()
        expiryTimer.cancel()
        if !lost { queue.sync {} }
    }
}
