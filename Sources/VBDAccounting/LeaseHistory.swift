/// Forensics: who held a volume when, reconstructed from the audit log's lease records.
///
/// Reads only records whose target is the volume and whose operation is a lease operation; their
/// details name the domain, the mode and the expiry. What changed between two points in time is
/// the snapshot diff's job (`Store.diff(from:to:)`), with the snapshots the log names.
public struct LeaseHolding: Equatable, Sendable {
    public var domain: DomainID
    public var mode: LeaseMode
    public var from: WallTime
    /// When the holding ended; nil while still held as far as the log knows (check `expiresAt`).
    public var until: WallTime?
    public var end: LeaseEnd?
    /// The last expiry the log recorded for the holding.
    public var expiresAt: WallTime
    /// Audit sequence numbers of the records that make up this holding.
    public var records: [UInt64]
}

public enum LeaseHistory {
    public static func holdings(of volume: String, in records: [AuditRecord]) -> [LeaseHolding] {
        var open: [DomainID: LeaseHolding] = [:]
        var closed: [LeaseHolding] = []
        for record in records where record.target == volume && record.operation.hasPrefix("lease.") {
            guard let domainName = record.details["domain"] else { continue }
            let domain = DomainID(domainName)
            let expiresAt = record.details["expiresAt"].flatMap(Int64.init).map(WallTime.init(nanoseconds:))
            switch record.operation {
            case AuditOperation.leaseGrant:
                if var previous = open.removeValue(forKey: domain) {
                    previous.until = record.time
                    previous.end = .released
                    closed.append(previous)
                }
                let mode = record.details["mode"].flatMap(LeaseMode.init(rawValue:)) ?? .read
                open[domain] = LeaseHolding(domain: domain, mode: mode, from: record.time, until: nil, end: nil,
                                            expiresAt: expiresAt ?? record.time, records: [record.sequence])
            case AuditOperation.leaseRenew:
                guard var holding = open[domain] else { continue }
                holding.expiresAt = expiresAt ?? holding.expiresAt
                holding.records.append(record.sequence)
                open[domain] = holding
            case AuditOperation.leaseRevoke, AuditOperation.leaseExpire, AuditOperation.leaseRelease,
                 AuditOperation.leaseDrop:
                guard var holding = open.removeValue(forKey: domain) else { continue }
                let end: LeaseEnd = switch record.operation {
                case AuditOperation.leaseExpire: .expired
                case AuditOperation.leaseRevoke: .revoked
                case AuditOperation.leaseDrop: .deleted
                default: .released
                }
                // An expiry took effect at the lease's expiry time, not when the server noticed it.
                holding.until = end == .expired ? holding.expiresAt : record.time
                holding.end = end
                holding.records.append(record.sequence)
                closed.append(holding)
            default:
                continue
            }
        }
        return (closed + open.values).sorted { ($0.from, $0.domain) < ($1.from, $1.domain) }
    }

    /// The domains holding `volume` at `time`, per the log.
    public static func holders(of volume: String, at time: WallTime, in records: [AuditRecord]) -> [LeaseHolding] {
        holdings(of: volume, in: records).filter { holding in
            holding.from <= time && time < (holding.until ?? holding.expiresAt)
        }
    }
}

/// Operation names used in audit records (the control interface adds its own: create, snapshot,...).
public enum AuditOperation {
    public static let leaseGrant = "lease.grant"
    public static let leaseRenew = "lease.renew"
    public static let leaseRevoke = "lease.revoke"
    public static let leaseExpire = "lease.expire"
    public static let leaseRelease = "lease.release"
    public static let policySet = "policy.set"
    public static let creditTopUp = "credit.topup"
    public static let overdraftSet = "credit.overdraft"
    public static let bindingSet = "binding.set"
    /// A lease or binding that ended because its image was deleted.
    public static let leaseDrop = "lease.drop"
    public static let bindingDrop = "binding.drop"
}

/// Forensics for one volume between two points in time: which snapshots bound the interval, which
/// byte ranges changed between them (the store's map diff, injected so this module stays free of
/// the store), and which domains held the volume meanwhile.
public struct VolumeForensics: Equatable, Sendable {
    /// The last snapshot taken at or before `from` (nil: none, compare from the volume's creation).
    public var fromSnapshot: String?
    /// The first snapshot taken at or after `to`... or the last before it when none is later.
    public var toSnapshot: String?
    public var changedRanges: [Range<UInt64>]
    /// Holdings that overlap [from, to].
    public var holders: [LeaseHolding]

    /// Snapshots of `volume` named by the log: `snapshot.create` records whose target is the volume
    /// and whose `snapshot` detail is the snapshot's full name (`VOLUME@NAME`).
    public static func snapshots(of volume: String, in records: [AuditRecord]) -> [(name: String, time: WallTime)] {
        records.compactMap { record in
            guard record.operation == AuditOperation.snapshotCreate, record.target == volume,
                  let name = record.details["snapshot"] else { return nil }
            return (name, record.time)
        }
    }

    /// - Parameter diff: byte ranges that differ between two images (`Store.diff(from:to:)`).
    public static func investigate(volume: String, from: WallTime, to: WallTime, records: [AuditRecord],
                                   diff: (String, String) throws -> [Range<UInt64>]) throws -> VolumeForensics {
        precondition(from <= to)
        let snapshots = snapshots(of: volume, in: records)
        let before = snapshots.last { $0.time <= from }
        let after = snapshots.first { $0.time >= to } ?? snapshots.last { $0.time <= to && $0.time > (before?.time ?? from) }
        var ranges: [Range<UInt64>] = []
        if let before, let after, before.name != after.name {
            ranges = try diff(before.name, after.name)
        }
        let holders = LeaseHistory.holdings(of: volume, in: records).filter { holding in
            holding.from <= to && (holding.until ?? holding.expiresAt) > from
        }
        return VolumeForensics(fromSnapshot: before?.name, toSnapshot: after?.name, changedRanges: ranges,
                               holders: holders)
    }
}

extension AuditOperation {
    public static let volumeCreate = "volume.create"
    public static let snapshotCreate = "snapshot.create"
    public static let share = "share"
    public static let delete = "delete"
    public static let resize = "volume.resize"
    public static let gc = "gc"
}
