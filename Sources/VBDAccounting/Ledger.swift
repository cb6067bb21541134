/// The kind of a block request, as the ledger counts it. Mirrors the NBD commands without
/// depending on NBDProtocol, so the ledger can also count requests from other front ends.
public enum IOKind: String, CaseIterable, Sendable, Codable, Hashable {
    case read, write, flush, trim, writeZeroes, cache, blockStatus

    /// Whether the request changes the volume's contents (needs a write lease). FLUSH does not:
    /// it only makes earlier writes durable, and a read-lease holder may send it harmlessly.
    public var modifies: Bool {
        switch self {
        case .write, .trim, .writeZeroes: return true
        case .read, .cache, .blockStatus, .flush: return false
        }
    }
}

/// Everything one domain has used, as counters that only grow.
public struct DomainUsage: Equatable, Sendable, Codable {
    /// Completed requests by kind (successful or not: a failed request still used the server).
    public var operations: [IOKind: UInt64] = [:]
    /// Requests that ended in an error reply.
    public var failedOperations: UInt64 = 0
    public var bytesRead: UInt64 = 0
    public var bytesWritten: UInt64 = 0
    /// Range bytes of TRIM / WRITE_ZEROES: no payload crosses the wire but the map changes.
    public var bytesDiscarded: UInt64 = 0
    /// Blocks of the domain's reads served from the universal buffer cache.
    public var cacheHits: UInt64 = 0
    /// Blocks of the domain's reads served from the compressed last-chance tier.
    public var lastChanceHits: UInt64 = 0
    /// Time I/O threads spent in device calls for this domain.
    public var deviceTime: Duration = .zero
    /// I/O units (see ``IOCost``) the domain's requests cost.
    public var ioUnits: Double = 0
    /// Credits charged under congestion pricing.
    public var creditsCharged: Double = 0

    public init() {}

    public var operationCount: UInt64 { operations.values.reduce(0, +) }
}

/// One completed request, as the server reports it to the ledger.
public struct UsageRecord: Sendable, Equatable {
    public var domain: DomainID
    public var kind: IOKind
    public var bytes: UInt64
    public var deviceTime: Duration
    public var failed: Bool
    public var ioUnits: Double
    public var charge: Double
    /// Blocks of a read served from the cache's main and last-chance tiers.
    public var cacheHits: UInt64
    public var lastChanceHits: UInt64

    public init(domain: DomainID, kind: IOKind, bytes: UInt64, deviceTime: Duration, failed: Bool = false,
                ioUnits: Double? = nil, charge: Double = 0, cacheHits: UInt64 = 0, lastChanceHits: UInt64 = 0) {
        self.domain = domain
        self.kind = kind
        self.bytes = bytes
        self.deviceTime = deviceTime
        self.failed = failed
        self.ioUnits = ioUnits ?? IOCost.units(kind: kind, bytes: bytes)
        self.charge = charge
        self.cacheHits = cacheHits
        self.lastChanceHits = lastChanceHits
    }
}

/// Per-domain usage counters. A plain value: the server keeps one behind a lock.
///
/// ### Invariants
/// - Each record lands in exactly one domain, so the sum over domains of any counter equals the
///   sum over records (tested).
/// - The number of domains is bounded by ``domainsMax``; records beyond it are charged to
///   ``overflowDomain`` rather than growing the table (a client picking fresh certificate subjects
///   cannot grow server memory without bound).
public struct Ledger: Equatable, Sendable, Codable {
    public private(set) var domains: [DomainID: DomainUsage] = [:]
    public let domainsMax: Int
    public static let overflowDomain = DomainID("overflow")

    public init(domainsMax: Int = 4096) {
        precondition(domainsMax >= 2, "one slot stays free for the overflow domain")
        self.domainsMax = domainsMax
    }

    public mutating func record(_ record: UsageRecord) {
        let key = account(for: record.domain)
        var usage = domains[key] ?? DomainUsage()
        usage.operations[record.kind, default: 0] += 1
        if record.failed { usage.failedOperations += 1 }
        if !record.failed {
            switch record.kind {
            case .read: usage.bytesRead += record.bytes
            case .write: usage.bytesWritten += record.bytes
            case .trim, .writeZeroes: usage.bytesDiscarded += record.bytes
            case .flush, .cache, .blockStatus: break
            }
        }
        usage.deviceTime += record.deviceTime
        usage.ioUnits += record.ioUnits
        usage.creditsCharged += record.charge
        usage.cacheHits += record.cacheHits
        usage.lastChanceHits += record.lastChanceHits
        domains[key] = usage
    }

    public func usage(of domain: DomainID) -> DomainUsage { domains[domain] ?? DomainUsage() }

    /// Sum over all domains.
    public var total: DomainUsage {
        var sum = DomainUsage()
        for usage in domains.values {
            for (kind, count) in usage.operations { sum.operations[kind, default: 0] += count }
            sum.failedOperations += usage.failedOperations
            sum.bytesRead += usage.bytesRead
            sum.bytesWritten += usage.bytesWritten
            sum.bytesDiscarded += usage.bytesDiscarded
            sum.cacheHits += usage.cacheHits
            sum.lastChanceHits += usage.lastChanceHits
            sum.deviceTime += usage.deviceTime
            sum.ioUnits += usage.ioUnits
            sum.creditsCharged += usage.creditsCharged
        }
        return sum
    }

    private func account(for domain: DomainID) -> DomainID {
        if domains[domain] != nil || domains.count < domainsMax - 1 { return domain }
        return Self.overflowDomain
    }
}

/// What a request costs the device, in I/O units: one unit per request plus one per 64 KiB moved.
///
/// A 4 KiB read costs 1.06 units and a 1 MiB write 17: per-request overhead (seek, metadata,
/// syscalls) dominates small I/O and bytes dominate large I/O, so a tenant cannot beat an IOPS
/// reservation by making each request huge. FLUSH costs 4 units: it waits for a device barrier.
public enum IOCost {
    public static let unitBytes: Double = 64 * 1024

    public static func units(kind: IOKind, bytes: UInt64) -> Double {
        switch kind {
        case .read, .write: return 1 + Double(bytes) / unitBytes
        // TRIM and WRITE_ZEROES touch map entries, not data: a map update per 64 KiB is generous.
        case .trim, .writeZeroes: return 1 + Double(bytes) / (unitBytes * 16)
        case .flush: return 4
        case .cache: return 1 + Double(bytes) / unitBytes
        case .blockStatus: return 1
        }
    }
}
