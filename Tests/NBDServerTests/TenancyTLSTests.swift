import Foundation
import NBDServer
import Testing
import VBDAccounting
import VBDCore
import VBDStore

extension RealServerTests {
    /// Issue 13 and issue 18 (item 6): a TLS client is the domain its verified certificate names,
    /// and nothing else. Certificates are made by openssl (IntegrationTests/make-test-certificates.sh);
    /// the server serves a real store; the clients are libnbd's (nbdsh).
    @Suite("Domains from TLS client certificates", .serialized)
    struct TenancyTLSTests {
        static let certificateScript = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("IntegrationTests/make-test-certificates.sh").path

        /// nbdsh over TLS with the client directory `client` (libnbd's tls-certificates layout):
        /// writes 64 KiB of `byte` to `export` at 0 and reads it back. True when that worked.
        func writes(_ fixture: TenancyServer, export: String, client: String, byte: UInt8) async throws -> Bool {
            let script = """
            h = nbd.NBD()
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates("\(client)")
            h.set_tls_verify_peer(False)
            h.set_export_name("\(export)")
            h.connect_unix("\(fixture.socketPath)")
            h.pwrite(bytes([\(byte)]) * 65536, 0)
            h.flush()
            assert h.pread(65536, 0) == bytes([\(byte)]) * 65536
            h.shutdown()
            """
            return try await runTool("nbdsh", ["-c", script]).status == 0
        }

        @Test(.enabled(if: Tool.exists("openssl") && Tool.hasNBDPython))
        func aClientIsTheDomainItsVerifiedCertificateNamesAndNothingElse() async throws {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-tls-\(UUID().uuidString.prefix(8))")
            defer { try? FileManager.default.removeItem(at: directory) }
            func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
            let made = try await runTool("bash", [Self.certificateScript, path("certs")])
            try #require(made.status == 0, "\(made)")
            let store = try Store.initialize(path: path("store"))
            let volumeA = try store.createVolume(name: "vol-a", size: 1 << 20)
            let volumeB = try store.createVolume(name: "vol-b", size: 1 << 20)
            // tenant-a is not mapped: its domain is its subject's RFC 4514 text. tenant-b maps to "bee".
            let tenantA = DomainID("CN=tenant-a,O=tenants")
            let service = try TenancyService(configuration: .init(
                resolver: DomainResolver(
                    bindings: ["vol-a": ExportBinding(domain: tenantA, imageID: volumeA.id),
                               "vol-b": ExportBinding(domain: "bee", imageID: volumeB.id)],
                    certificateDomains: [try CertificateSubject(rfc4514: "CN=tenant-b,O=tenants"): "bee"]),
                leasesEnforced: true))
            try service.grantLease(volume: "vol-a", imageID: volumeA.id, domain: tenantA, mode: .write,
                                   duration: .seconds(600), actor: "test")
            try service.grantLease(volume: "vol-b", imageID: volumeB.id, domain: "bee", mode: .write,
                                   duration: .seconds(600), actor: "test")
            let fixture = try await TenancyServer(
                exports: store, tenancy: .init(service: service),
                tls: .required(certificatePath: path("certs/server-cert.pem"), keyPath: path("certs/server-key.pem"),
                               caPath: path("certs/ca-cert.pem")))
            func client(_ name: String) -> String { path("certs/\(name)") }

            #expect(try await writes(fixture, export: "vol-a", client: client("tenant-a"), byte: 0xA1))
            #expect(try await writes(fixture, export: "vol-b", client: client("tenant-b"), byte: 0xB2))
            // Each refused: another tenant's export; subjects crafted to read like tenant-b's once
            // joined ("O=tenants,CN=tenant-b" as one O attribute, "tenant-b,O=tenants" as one CN);
            // another CA; expired;
            // no certificate at all (the export's binding is no identity).
            for (name, export) in [("tenant-a", "vol-b"), ("crafted", "vol-b"), ("crafted", "vol-a"), ("crafted-cn", "vol-b"),
                                   ("wrong-ca", "vol-b"), ("expired", "vol-b"), ("no-cert", "vol-b"),
                                   ("no-cert", "vol-a")] {
                #expect(try await !writes(fixture, export: export, client: client(name), byte: 0x66),
                        "\(name) wrote \(export)")
            }
            // The server goes on serving the tenants.
            #expect(try await writes(fixture, export: "vol-b", client: client("tenant-b"), byte: 0xB3))
            await fixture.stop()

            // Charged: the two verified tenants only (pwrite, flush, pread per session).
            let ledger = service.snapshot().ledger
            #expect(Set(ledger.domains.keys) == [tenantA, "bee"], "\(ledger.domains.keys)")
            #expect(ledger.usage(of: tenantA).operations[.write] == 1)
            #expect(ledger.usage(of: "bee").operations[.write] == 2)
            // The store holds what they wrote and nothing the refused clients sent, after a reopen.
            try store.close()
            let reopened = try Store.open(path: path("store"))
            defer { try? reopened.close() }
            for (name, byte) in [("vol-a", UInt8(0xA1)), ("vol-b", 0xB3)] {
                var buffer = [UInt8](repeating: 0, count: 1 << 20)
                try buffer.withUnsafeMutableBytes { try reopened.openExport(named: name).read(offset: 0, into: $0) }
                #expect(buffer[..<65536].allSatisfy { $0 == byte } && buffer[65536...].allSatisfy { $0 == 0 }, "\(name)")
            }
        }

        /// Without a CA the server verifies no client certificate (it does not ask for one, and the
        /// handler would not take one it did not verify), so presenting one proves nothing: with
        /// leases enforced the client gets nothing, without it it is anonymous.
        @Test(.enabled(if: Tool.exists("openssl") && Tool.hasNBDPython))
        func anUnverifiedCertificateIsNoIdentity() async throws {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-tls-\(UUID().uuidString.prefix(8))")
            defer { try? FileManager.default.removeItem(at: directory) }
            func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
            let made = try await runTool("bash", [Self.certificateScript, path("certs")])
            try #require(made.status == 0, "\(made)")
            let store = try Store.initialize(path: path("store"))
            defer { try? store.close() }
            let volume = try store.createVolume(name: "vol", size: 1 << 20)
            for enforced in [true, false] {
                let service = try TenancyService(configuration: .init(
                    resolver: DomainResolver(certificateDomains: [try CertificateSubject(rfc4514: "CN=tenant-b,O=tenants"): "bee"]),
                    leasesEnforced: enforced))
                try service.grantLease(volume: "vol", imageID: volume.id, domain: "bee", mode: .write,
                                       duration: .seconds(600), actor: "test")
                let fixture = try await TenancyServer(
                    exports: store, tenancy: .init(service: service),
                    tls: .required(certificatePath: path("certs/server-cert.pem"), keyPath: path("certs/server-key.pem")))
                let served = try await writes(fixture, export: "vol", client: path("certs/tenant-b"), byte: 0x42)
                await fixture.stop()
                #expect(served == !enforced)
                #expect(service.snapshot().ledger.usage(of: "bee").operationCount == 0)
                #expect(service.snapshot().ledger.usage(of: .anonymous).operationCount == (enforced ? 0 : 3))
            }
        }
    }
}
