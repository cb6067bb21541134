/// A sharing group: the volumes whose blocks may be deduplicated and cached as one.
///
/// The store numbers groups in 16 bits (bits 48-63 of a chunk's location) and names them in its
/// group table; by default every volume has a group of its own, inherited by its snapshots and
/// shares (docs/ARCHITECTURE.md, "Sharing groups, lineage and what a tenant can learn"). Not a
/// tenant (`DomainID`) and not a hypervisor domain (``HypervisorDomain``).
public struct SharingGroupID: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var rawValue: UInt16

    public init(_ rawValue: UInt16) { self.rawValue = rawValue }
    public init(integerLiteral value: UInt16) { self.rawValue = value }

    public static func < (lhs: SharingGroupID, rhs: SharingGroupID) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String { "sharing group \(rawValue)" }
}
