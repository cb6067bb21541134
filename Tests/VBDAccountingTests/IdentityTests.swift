import Foundation
import Testing
import VBDCore
@testable import VBDAccounting

/// Who a connection is (issue 13): only what it proved, never the export it opens.
@Suite struct IdentityTests {
    static let tenantB = CertificateSubject(certificateOrder: [
        [.init(type: "2.5.4.10", value: "tenants")], [.init(type: "2.5.4.3", value: "tenant-b")],
    ])
    /// What openssl makes of `-subj '/O=tenants,CN=tenant-b'`: one organisation whose name holds a comma.
    static let crafted = CertificateSubject(certificateOrder: [[.init(type: "2.5.4.10", value: "tenants,CN=tenant-b")]])

    static func credentials(uid: UInt32, gid: UInt32) -> UnixPeerCredentials {
        var credentials = UnixPeerCredentials()
        credentials.uid = uid
        credentials.gid = gid
        return credentials
    }

    @Test func rfc4514TextParsesToTheSameStructureAsTheCertificate() throws {
        #expect(try CertificateSubject(rfc4514: "CN=tenant-b,O=tenants") == Self.tenantB)
        #expect(try CertificateSubject(rfc4514: "cn=tenant-b, o=tenants") == Self.tenantB, "type names are case-insensitive")
        #expect(try CertificateSubject(rfc4514: "CN=tenant-b ,O=tenants") != Self.tenantB, "a space is part of the value")
        #expect(try CertificateSubject(rfc4514: "CN=tenant-b,2.5.4.10=tenants") == Self.tenantB)
        #expect(try CertificateSubject(rfc4514: "O=tenants\\,CN=tenant-b") == Self.crafted)
        #expect(try CertificateSubject(rfc4514: "O=tenants\\2CCN=tenant-b") == Self.crafted)
        #expect(Self.tenantB.description == "CN=tenant-b,O=tenants")
        #expect(Self.crafted.description == "O=tenants\\,CN\\=tenant-b")
        #expect(try CertificateSubject(rfc4514: Self.crafted.description) == Self.crafted)
        #expect(try CertificateSubject(rfc4514: "CN=a+O=b") == CertificateSubject(rfc4514: "O=b+CN=a"))
        #expect(throws: CertificateSubject.ParseError.self) { try CertificateSubject(rfc4514: "") }
        #expect(throws: CertificateSubject.ParseError.self) { try CertificateSubject(rfc4514: "CN") }
        #expect(throws: CertificateSubject.ParseError.self) { try CertificateSubject(rfc4514: "XX=a") }
        #expect(throws: CertificateSubject.ParseError.self) { try CertificateSubject(rfc4514: "CN=a,") }
        #expect(throws: CertificateSubject.ParseError.self) { try CertificateSubject(rfc4514: "CN=a\"b") }
    }

    @Test func certificateSubjectsMapByStructureOnly() {
        let resolver = DomainResolver(certificateDomains: [Self.tenantB: "bee"])
        #expect(resolver.authenticate(PeerIdentity(certificateSubject: Self.tenantB)) == .domain("bee"))
        // The crafted subject prints like tenant-b's once joined naively, but is another subject:
        // a domain of its own (its escaped text), never "bee".
        #expect(resolver.authenticate(PeerIdentity(certificateSubject: Self.crafted))
                == .domain(DomainID("O=tenants\\,CN\\=tenant-b")))
    }

    @Test func unixPeersMapByUidThenGid() {
        let resolver = DomainResolver(unixPeerDomains: [.uid(1000): .domain("alice"), .gid(50): .domain("staff")])
        #expect(resolver.authenticate(PeerIdentity(unixCredentials: Self.credentials(uid: 1000, gid: 50))) == .domain("alice"))
        #expect(resolver.authenticate(PeerIdentity(unixCredentials: Self.credentials(uid: 1001, gid: 50))) == .domain("staff"))
        #expect(resolver.authenticate(PeerIdentity(unixCredentials: Self.credentials(uid: 65534, gid: 65534))) == nil)
        #expect(resolver.authenticate(.unauthenticated) == nil)
        #expect(UnixPeer("uid:1000") == .uid(1000) && UnixPeer("gid:7") == .gid(7))
        #expect(UnixPeer("user:1") == nil && UnixPeer("uid:") == nil && UnixPeer("uid:-1") == nil)
    }

    /// Bindings narrow: a bound export opens only for its domain, and never makes a client that
    /// proved nothing (or proved another identity) into that domain.
    @Test func bindingsNeverGrantAnIdentity() {
        let resolver = DomainResolver(bindings: ["vm": ExportBinding(domain: "alice", imageID: 7)],
                                      unixPeerDomains: [.uid(1000): .domain("alice"), .uid(1001): .domain("bob"),
                                                        .uid(0): .boundDomain])
        let alice = PeerIdentity(unixCredentials: Self.credentials(uid: 1000, gid: 1000))
        let bob = PeerIdentity(unixCredentials: Self.credentials(uid: 1001, gid: 1001))
        let nobody = PeerIdentity(unixCredentials: Self.credentials(uid: 65534, gid: 65534))
        let hypervisor = PeerIdentity(unixCredentials: Self.credentials(uid: 0, gid: 0))
        for required in [false, true] {
            #expect(resolver.admission(export: "vm", imageID: 7, identity: alice, authenticationRequired: required) == .admitted("alice"))
            #expect(resolver.admission(export: "vm@snap", imageID: 9, identity: alice, authenticationRequired: required) == .admitted("alice"))
            guard case .refused = resolver.admission(export: "vm", imageID: 7, identity: bob, authenticationRequired: required),
                  case .refused = resolver.admission(export: "vm@snap", imageID: 9, identity: bob, authenticationRequired: required),
                  case .refused = resolver.admission(export: "vm", imageID: 7, identity: nobody, authenticationRequired: required),
                  case .refused = resolver.admission(export: "vm", imageID: 7, identity: .unauthenticated,
                                                     authenticationRequired: required),
                  case .refused = resolver.admission(export: "other", imageID: 8, identity: hypervisor,
                                                     authenticationRequired: required) else {
                Issue.record("a client that is not alice opened alice's export (authentication required: \(required))")
                continue
            }
            #expect(resolver.admission(export: "vm", imageID: 7, identity: hypervisor, authenticationRequired: required) == .admitted("alice"))
            #expect(resolver.admission(export: "other", imageID: 8, identity: bob, authenticationRequired: required) == .admitted("bob"))
        }
        // Unbound exports: anonymous without enforcement, nothing with it.
        #expect(resolver.admission(export: "other", imageID: 8, identity: nobody, authenticationRequired: false) == .admitted(.anonymous))
        guard case .refused = resolver.admission(export: "other", imageID: 8, identity: nobody, authenticationRequired: true) else {
            Issue.record("an unauthenticated client opened an export with leases enforced")
            return
        }
        // A binding made on image 7 does not bind a new image 12 of the same name.
        #expect(resolver.admission(export: "vm", imageID: 12, identity: bob, authenticationRequired: true) == .admitted("bob"))
    }

    @Test func bindingsSavedAsBareNamesStillDecode() throws {
        let decoded = try JSONDecoder().decode([String: ExportBinding].self, from: Data(#"{"vm":"alice","b":{"domain":"bob","imageID":3}}"#.utf8))
        #expect(decoded == ["vm": ExportBinding(domain: "alice"), "b": ExportBinding(domain: "bob", imageID: 3)])
    }
}
