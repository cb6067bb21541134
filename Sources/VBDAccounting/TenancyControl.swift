import Foundation
import VBDCore

/// The control operations of issue 6 as Codable values, so the control socket can carry them
/// with one message case (`.tenancy(TenancyRequest)`) and `vbdtool stats | lease | audit | policy
/// | credit` can map onto them one to one. ``TenancyService/handle(_:actor:)`` performs them.
public enum TenancyRequest: Codable, Sendable, Equatable {
    case stats
    case leaseGrant(volume: String, domain: String, mode: LeaseMode, seconds: Int64)
    case leaseRenew(volume: String, domain: String, seconds: Int64)
    case leaseRevoke(volume: String, domain: String)
    case leaseList
    case auditList
    case auditVerify(anchorSequence: UInt64?, anchorHash: String?)
    case setPolicy(domain: String, policy: SchedulingPolicy)
    case bind(export: String, domain: String)
    case topUp(domain: String, amount: Double)
    case setOverdraft(domain: String, limit: Double)
}

/// One domain's row of `vbdtool stats`.
public struct DomainStatistics: Codable, Sendable, Equatable {
    public var domain: String
    public var usage: DomainUsage
    public var account: CreditAccount
    public var policy: SchedulingPolicy
    /// The domain's share of the bytes stored (nil where the caller had no store figures).
    public var storage: StorageShare?
}

public struct TenancyStatistics: Codable, Sendable, Equatable {
    public var domains: [DomainStatistics]
    public var utilisation: Double
    /// Credits per I/O unit right now.
    public var price: Double
    public var totalCharged: Double
}

public enum TenancyResponse: Codable, Sendable, Equatable {
    case done
    case stats(TenancyStatistics)
    case lease(Lease)
    case leases([Lease])
    case audit([AuditRecord])
    case verification(problems: [String], recordCount: Int, head: AuditAnchor?)
}

extension TenancyService {
    /// Performs a control request on behalf of `actor` (audited where it changes state).
    /// `imageID` is the store's id of the image a lease grant or a binding names (the control
    /// service looks it up), so the lease or binding never applies to a later image of that name.
    public func handle(_ request: TenancyRequest, actor: String, imageID: UInt64? = nil) throws -> TenancyResponse {
        switch request {
        case .stats:
            return .stats(statistics())
        case .leaseGrant(let volume, let domain, let mode, let seconds):
            return .lease(try grantLease(volume: volume, imageID: imageID, domain: DomainID(domain), mode: mode,
                                         duration: .seconds(seconds), actor: actor))
        case .leaseRenew(let volume, let domain, let seconds):
            return .lease(try renewLease(volume: volume, domain: DomainID(domain), duration: .seconds(seconds),
                                         actor: actor))
        case .leaseRevoke(let volume, let domain):
            return .lease(try revokeLease(volume: volume, domain: DomainID(domain), actor: actor))
        case .leaseList:
            try expireLeases()
            return .leases(snapshot().leases.leases.values.flatMap { $0 }.sorted { ($0.volume, $0.domain) < ($1.volume, $1.domain) })
        case .auditList:
            return .audit(try auditRecords())
        case .auditVerify(let sequence, let hash):
            let anchor = sequence.flatMap { sequence in hash.map { AuditAnchor(sequence: sequence, hash: $0) } }
            guard let result = try verifyAudit(anchor: anchor) else {
                return .verification(problems: ["no audit log is configured"], recordCount: 0, head: nil)
            }
            return .verification(problems: result.problems.map(\.description), recordCount: result.recordCount,
                                 head: result.head)
        case .setPolicy(let domain, let policy):
            try setPolicy(policy, for: DomainID(domain), actor: actor)
            return .done
        case .bind(let export, let domain):
            try bind(export: export, to: DomainID(domain), imageID: imageID, actor: actor)
            return .done
        case .topUp(let domain, let amount):
            try topUp(DomainID(domain), amount: amount, actor: actor)
            return .done
        case .setOverdraft(let domain, let limit):
            try setOverdraftLimit(DomainID(domain), limit: limit, actor: actor)
            return .done
        }
    }

    /// Every known domain (from usage, accounts, policies and stored bytes), sorted by name.
    /// `storage` (from ``storageShares(images:)``) fills each row's storage charge; with it, a
    /// domain that stores data but has not sent a request yet still has a row.
    public func statistics(storage: [DomainID: StorageShare]? = nil) -> TenancyStatistics {
        let snapshot = snapshot()
        let names = Set(snapshot.ledger.domains.keys).union(snapshot.credits.accounts.keys)
            .union(snapshot.policies.keys).union(storage.map { Array($0.keys) } ?? [])
        let rows = names.sorted().map { domain in
            DomainStatistics(domain: domain.name, usage: snapshot.ledger.usage(of: domain),
                             account: snapshot.credits.account(domain),
                             policy: snapshot.policies[domain] ?? snapshot.defaultPolicy,
                             storage: storage.map { $0[domain] ?? StorageShare() })
        }
        return TenancyStatistics(domains: rows, utilisation: snapshot.utilisation, price: snapshot.price,
                                 totalCharged: snapshot.credits.totalCharged)
    }
}

/// One figure for the metrics endpoint, neutral of any metrics library: the serve command feeds
/// these to `StoreMetrics.addSource` (`sink.counter` / `sink.gauge`).
public struct TenancyMetric: Equatable, Sendable {
    public enum Kind: Sendable { case counter, gauge }
    public var name: String
    public var labels: [String: String]
    public var value: Double
    public var kind: Kind
    public var help: String
}

extension TenancyStatistics {
    /// Per-domain counters and levels, Prometheus-style names (`vbd_domain_*`).
    public var metrics: [TenancyMetric] {
        var result: [TenancyMetric] = [
            .init(name: "vbd_device_utilisation", labels: [:], value: utilisation, kind: .gauge,
                  help: "Device busy time over wall time and device slots, smoothed"),
            .init(name: "vbd_io_unit_price", labels: [:], value: price, kind: .gauge,
                  help: "Credits charged per I/O unit at the current utilisation"),
        ]
        for row in domains {
            let domain = ["domain": row.domain]
            for (kind, count) in row.usage.operations.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
                result.append(.init(name: "vbd_domain_operations_total", labels: ["domain": row.domain, "command": kind.rawValue],
                                    value: Double(count), kind: .counter, help: "Requests completed, by command"))
            }
            result += [
                .init(name: "vbd_domain_failed_operations_total", labels: domain, value: Double(row.usage.failedOperations),
                      kind: .counter, help: "Requests answered with an error"),
                .init(name: "vbd_domain_read_bytes_total", labels: domain, value: Double(row.usage.bytesRead),
                      kind: .counter, help: "Bytes read"),
                .init(name: "vbd_domain_written_bytes_total", labels: domain, value: Double(row.usage.bytesWritten),
                      kind: .counter, help: "Bytes written"),
                .init(name: "vbd_domain_device_seconds_total", labels: domain,
                      value: row.usage.deviceTime.inSeconds,
                      kind: .counter, help: "Device time used"),
                .init(name: "vbd_domain_io_units_total", labels: domain, value: row.usage.ioUnits, kind: .counter,
                      help: "I/O units used (1 per request + 1 per 64 KiB)"),
                .init(name: "vbd_domain_credits_charged_total", labels: domain, value: row.usage.creditsCharged,
                      kind: .counter, help: "Credits charged under congestion pricing"),
                .init(name: "vbd_domain_cache_hits_total", labels: ["domain": row.domain, "tier": "main"],
                      value: Double(row.usage.cacheHits), kind: .counter,
                      help: "Blocks of the domain's reads served from memory, by cache tier"),
                .init(name: "vbd_domain_cache_hits_total", labels: ["domain": row.domain, "tier": "last_chance"],
                      value: Double(row.usage.lastChanceHits), kind: .counter,
                      help: "Blocks of the domain's reads served from memory, by cache tier"),
                .init(name: "vbd_domain_credit_balance", labels: domain, value: row.account.balance, kind: .gauge,
                      help: "Credit balance (negative: overdraft)"),
                .init(name: "vbd_domain_overdrawn", labels: domain, value: row.account.isOverdrawn ? 1 : 0, kind: .gauge,
                      help: "1 while the domain is served only within its reservation"),
            ]
            if let storage = row.storage {
                result += [
                    .init(name: "vbd_domain_stored_bytes", labels: domain, value: storage.fairStoredBytes, kind: .gauge,
                          help: "Bytes on disk charged to the domain (shared blocks split among their holders)"),
                    .init(name: "vbd_domain_exclusive_stored_bytes", labels: domain,
                          value: Double(storage.exclusiveStoredBytes), kind: .gauge,
                          help: "Bytes on disk held only by the domain's images"),
                ]
            }
        }
        return result
    }
}

extension TenancyService {
    /// Storage charged per domain from the store's per-image figures: an image belongs to the
    /// domain its name is bound to, a snapshot (`VOLUME@NAME`) to its volume's domain.
    public func storageShares(images: [ImageShareInput]) -> [DomainID: StorageShare] {
        let bindings = snapshot().bindings
        return StorageShares.perDomain(images: images) { name in
            (bindings[name] ?? name.split(separator: "@", maxSplits: 1).first.flatMap { bindings[String($0)] })?.domain
        }
    }
}
