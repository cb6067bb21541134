/// A guest domain as its hypervisor numbers it (Xen's domid, a KVM host's VM number): the caller of
/// the clean-page interface (``CleanPageCache``).
///
/// Not a tenant and not a sharing group: the number is the hypervisor's, reused after a guest goes
/// away. The server maps it to the tenant (`DomainID` in VBDAccounting) the hypervisor attached it to,
/// and the tenant's leases decide which volumes the domain holds (docs/ARCHITECTURE.md, "Three kinds of
/// domain").
public struct HypervisorDomain: Hashable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var number: UInt64

    public init(_ number: UInt64) { self.number = number }
    public init(integerLiteral value: UInt64) { self.number = value }

    public var description: String { "hypervisor domain \(number)" }
}
