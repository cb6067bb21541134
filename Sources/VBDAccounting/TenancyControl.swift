import Foundation

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
    public func handle(_ request: TenancyRequest, actor: String) throws -> TenancyResponse {
        switch request {
        case .stats:
            return .stats(statistics())
        case .leaseGrant(let volume, let domain, let mode, let seconds):
            return .lease(try grantLease(volume: volume, domain: DomainID(domain), mode: mode,
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
            try bind(export: export, to: DomainID(domain), actor: actor)
            return .done
        case .topUp(let domain, let amount):
            try topUp(DomainID(domain), amount: amount, actor: actor)
            return .done
        case .setOverdraft(let domain, let limit):
            try setOverdraftLimit(DomainID(domain), limit: limit, actor: actor)
            return .done
        }
    }

    /// Every known domain (from usage, accounts and policies), sorted by name.
    public func statistics() -> TenancyStatistics {
        let snapshot = snapshot()
        let names = Set(snapshot.ledger.domains.keys).union(snapshot.credits.accounts.keys).union(snapshot.policies.keys)
        let rows = names.sorted().map { domain in
            DomainStatistics(domain: domain.name, usage: snapshot.ledger.usage(of: domain),
                             account: snapshot.credits.account(domain),
                             policy: snapshot.policies[domain] ?? snapshot.defaultPolicy)
        }
        return TenancyStatistics(domains: rows, utilisation: snapshot.utilisation, price: snapshot.price,
                                 totalCharged: snapshot.credits.totalCharged)
    }
}
