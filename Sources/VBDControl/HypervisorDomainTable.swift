import Synchronization
import VBDAccounting
import VBDCache

/// Which tenant each hypervisor domain runs for, as the hypervisor attached it, and whether a domain
/// holds a volume: its tenant has an unexpired lease (read or write) on it.
///
/// The clean-page interface asks this for every put and get (``VBDStore/StoreMappingOracle``). A
/// domain nobody attached holds nothing, and a lease is needed even when the server does not enforce
/// leases on NBD connections: without one, nothing says the volume is the domain's.
public final class HypervisorDomainTable: Sendable {
    /// Attached domains kept at most (a host runs far fewer guests); attaching more is refused.
    public static let domainsMax = 65_536

    private let tenancy: TenancyService
    private let tenants = Mutex<[HypervisorDomain: DomainID]>([:])

    public init(tenancy: TenancyService) { self.tenancy = tenancy }

    /// Records that `domain` runs for `tenant` from now on (a reused number gets its new tenant).
    public func attach(_ domain: HypervisorDomain, tenant: DomainID) throws(ControlFailure) {
        try tenants.withLock { (tenants) throws(ControlFailure) in
            guard tenants[domain] != nil || tenants.count < Self.domainsMax else {
                throw ControlFailure(code: "invalid-argument", message: "\(Self.domainsMax) hypervisor domains are attached already; detach some first")
            }
            tenants[domain] = tenant
        }
    }

    /// Forgets `domain` (the guest went away).
    public func detach(_ domain: HypervisorDomain) {
        _ = tenants.withLock { $0.removeValue(forKey: domain) }
    }

    public func tenant(of domain: HypervisorDomain) -> DomainID? {
        tenants.withLock { $0[domain] }
    }

    /// Whether `domain` is attached and its tenant holds an unexpired lease on `image` (the image
    /// `imageID`: a lease on an earlier image of that name holds nothing).
    public func holds(_ domain: HypervisorDomain, image: String, imageID: UInt64) -> Bool {
        guard let tenant = tenant(of: domain) else { return false }
        return tenancy.snapshot().leases.permits(volume: image, imageID: imageID, domain: tenant, write: false, now: .now())
    }
}
