import Foundation
import Testing
import VBDCore
@testable import VBDAccounting

/// An empty domain name is bad input, and a certificate with an empty subject proves no tenant.
/// Seen through `vbdtool serve`: `vbdtool domain bind e ""` and `lease grant e --domain ""` were
/// accepted, and a CA-signed certificate with an empty subject (`openssl req -subj /`) then opened
/// `e` under --enforce-leases as the domain "" (a script binding to an unset "$DOMAIN" does this).
@Suite struct EmptyDomainTests {
    @Test func bindingOrLeasingToAnEmptyDomainIsRefused() throws {
        let clock = ClockBox(WallTime(seconds: 1_800_000_000))
        let service = try TenancyService(configuration: .init(leasesEnforced: true), stateStorage: MemoryStateStorage(),
                                         auditStorage: MemoryAuditStorage(), clock: { clock.now })
        #expect(throws: (any Error).self) { _ = try service.handle(.bind(export: "e", domain: ""), actor: "operator") }
        #expect(throws: (any Error).self) {
            _ = try service.handle(.leaseGrant(volume: "e", domain: "", mode: .write, seconds: 60), actor: "operator")
        }
        #expect(service.snapshot().bindings["e"] == nil)
    }

    @Test func aCertificateWithAnEmptySubjectIsNoDomain() {
        let empty = PeerIdentity(certificateSubject: CertificateSubject(certificateOrder: []))
        let resolver = DomainResolver(bindings: ["e": ExportBinding(domain: DomainID(""))])
        #expect(resolver.authenticate(empty) != .domain(DomainID("")))
        #expect(resolver.admission(export: "e", imageID: nil, identity: empty, authenticationRequired: true)
                != .admitted(DomainID("")))
    }
}
