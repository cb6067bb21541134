// MARK: - Notes on the design
//
// A lease gives one domain the right to use one volume until a wall-clock expiry. Read leases are
// shared; a write lease is exclusive: while a domain holds a write lease on a volume, no other
// domain holds any lease on it, and while other domains hold read leases, nobody gets a write
// lease. (The issue requires only "two domains never hold a write lease on one volume at once";
// excluding readers too keeps a reader from seeing a volume change under it, the usual
// readers-writer rule.) A domain holds at most one lease per volume; re-granting replaces its mode.
//
// Invariants (checked by `checkInvariants`, run after every change in the tests):
// 1. Per volume: at most one domain holds a write lease, and if one does, it is the only holder.
// 2. No lease in the table has expired as of the last `expire(now:)` call's time, once called.
// 3. At most `leasesMax` leases in total.
//
// The table never reads a clock; every operation takes `now`. The server calls `expire(now:)`
// periodically and closes the connections of each lease it returns.

public enum LeaseMode: String, Sendable, Codable, Equatable {
    case read, write
}

public struct Lease: Sendable, Equatable, Codable {
    public var volume: String
    /// The store's internal id of the image leased (nil in leases saved before ids were recorded):
    /// a lease never applies to a later image that took the same name.
    public var imageID: UInt64?
    public var domain: DomainID
    public var mode: LeaseMode
    public var grantedAt: WallTime
    public var expiresAt: WallTime

    public init(volume: String, imageID: UInt64? = nil, domain: DomainID, mode: LeaseMode, grantedAt: WallTime,
                expiresAt: WallTime) {
        self.volume = volume
        self.imageID = imageID
        self.domain = domain
        self.mode = mode
        self.grantedAt = grantedAt
        self.expiresAt = expiresAt
    }
}

public enum LeaseError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Another domain's lease conflicts with the one asked for.
    case conflict(volume: String, holder: DomainID, mode: LeaseMode)
    case notHeld(volume: String, domain: DomainID)
    case invalidDuration
    case tableFull
    /// A lease or binding names the empty domain (a script's unset variable, most likely).
    case emptyDomain

    public var description: String {
        switch self {
        case .conflict(let volume, let holder, let mode):
            return "volume \(volume) is leased to \(holder) (\(mode.rawValue))"
        case .notHeld(let volume, let domain): return "\(domain) holds no lease on \(volume)"
        case .invalidDuration: return "lease duration must be positive and at most \(LeaseTable.durationMax)"
        case .tableFull: return "lease table is full (\(LeaseTable.leasesMax) leases)"
        case .emptyDomain: return "a domain name must not be empty"
        }
    }
}

/// Why a lease ended, for the server (close connections) and the audit log.
public enum LeaseEnd: String, Sendable, Codable, Equatable {
    case expired, revoked, released
    /// The image was deleted.
    case deleted
}

public struct LeaseTable: Sendable, Equatable, Codable {
    public static let leasesMax = 65_536
    /// Leases are meant to be renewed; a year-long lease is a mistake, not a policy.
    public static let durationMax: Duration = .seconds(30 * 24 * 3600)

    /// volume -> holders (a handful per volume).
    public private(set) var leases: [String: [Lease]] = [:]
    public private(set) var count = 0

    public init() {}

    public func leases(on volume: String) -> [Lease] { leases[volume] ?? [] }

    public func lease(on volume: String, domain: DomainID) -> Lease? {
        leases[volume]?.first { $0.domain == domain }
    }

    /// Whether `domain` may use `volume` (the image `imageID`) at `now`, for writing when `write`
    /// is true. A lease granted on another image of the same name permits nothing.
    public func permits(volume: String, imageID: UInt64? = nil, domain: DomainID, write: Bool, now: WallTime) -> Bool {
        guard let lease = lease(on: volume, domain: domain), lease.expiresAt > now else { return false }
        if let leased = lease.imageID, let imageID, leased != imageID { return false }
        return !write || lease.mode == .write
    }

    /// Grants (or changes the mode of) `domain`'s lease on `volume` for `duration` from `now`.
    /// Leases of other domains that expired before `now` do not block it.
    @discardableResult
    public mutating func grant(volume: String, imageID: UInt64? = nil, domain: DomainID, mode: LeaseMode,
                               duration: Duration, now: WallTime) throws(LeaseError) -> Lease {
        guard duration > .zero, duration <= Self.durationMax else { throw .invalidDuration }
        guard !domain.name.isEmpty else { throw .emptyDomain }
        for other in leases(on: volume) where other.domain != domain && other.expiresAt > now {
            if mode == .write || other.mode == .write {
                throw .conflict(volume: volume, holder: other.domain, mode: other.mode)
            }
        }
        var holders = leases(on: volume).filter { $0.domain != domain && $0.expiresAt > now }
        let removed = leases(on: volume).count - holders.count
        guard count - removed + 1 <= Self.leasesMax else { throw .tableFull }
        let lease = Lease(volume: volume, imageID: imageID, domain: domain, mode: mode, grantedAt: now,
                          expiresAt: now + duration)
        holders.append(lease)
        leases[volume] = holders
        count += 1 - removed
        return lease
    }

    /// Extends `domain`'s unexpired lease to `now + duration` (never shortens it).
    @discardableResult
    public mutating func renew(volume: String, domain: DomainID, duration: Duration,
                               now: WallTime) throws(LeaseError) -> Lease {
        guard duration > .zero, duration <= Self.durationMax else { throw .invalidDuration }
        guard var holders = leases[volume], let index = holders.firstIndex(where: { $0.domain == domain }),
              holders[index].expiresAt > now else {
            throw .notHeld(volume: volume, domain: domain)
        }
        holders[index].expiresAt = max(holders[index].expiresAt, now + duration)
        leases[volume] = holders
        return holders[index]
    }

    /// Ends `domain`'s lease on `volume` now (operator revoke or the holder's release).
    @discardableResult
    public mutating func revoke(volume: String, domain: DomainID) throws(LeaseError) -> Lease {
        guard var holders = leases[volume], let index = holders.firstIndex(where: { $0.domain == domain }) else {
            throw .notHeld(volume: volume, domain: domain)
        }
        let lease = holders.remove(at: index)
        leases[volume] = holders.isEmpty ? nil : holders
        count -= 1
        return lease
    }

    /// Removes and returns every lease on `volume` (its image was deleted).
    public mutating func drop(volume: String) -> [Lease] {
        let dropped = leases.removeValue(forKey: volume) ?? []
        count -= dropped.count
        return dropped.sorted { $0.domain < $1.domain }
    }

    /// Removes and returns every lease whose expiry is at or before `now`.
    public mutating func expire(now: WallTime) -> [Lease] {
        var expired: [Lease] = []
        for (volume, holders) in leases {
            let alive = holders.filter { $0.expiresAt > now }
            guard alive.count != holders.count else { continue }
            expired += holders.filter { $0.expiresAt <= now }
            leases[volume] = alive.isEmpty ? nil : alive
        }
        count -= expired.count
        return expired.sorted { ($0.expiresAt, $0.volume, $0.domain) < ($1.expiresAt, $1.volume, $1.domain) }
    }

    /// The earliest expiry in the table (when the server should next call `expire`).
    public var nextExpiry: WallTime? {
        leases.values.lazy.flatMap { $0 }.map(\.expiresAt).min()
    }

    /// Invariants 1 and 3; returns a description of the first violation.
    public func invariantViolation() -> String? {
        var total = 0
        for (volume, holders) in leases {
            total += holders.count
            let writers = holders.filter { $0.mode == .write }
            if writers.count > 1 { return "\(volume): \(writers.count) write leases" }
            if writers.count == 1 && holders.count > 1 { return "\(volume): a write lease beside other holders" }
            if Set(holders.map(\.domain)).count != holders.count { return "\(volume): a domain holds two leases" }
        }
        if total != count { return "count \(count) but \(total) leases" }
        if total > Self.leasesMax { return "\(total) leases exceed the table's limit" }
        return nil
    }
}
