import Foundation
import NBDServer
import Testing
import VBDAccounting
import VBDCore

extension RealServerTests {
    @Suite("Domains from TLS client certificates", .serialized)
    struct TenancyTLSTests {
        /// Two tenants with CA-signed certificates open the same export: each request is charged to
        /// the certificate's subject, not to the export's binding.
        @Test(.enabled(if: Tool.exists("openssl") && Tool.hasNBDPython))
        func requestsAreChargedToTheClientCertificateSubject() async throws {
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-acct-tls-\(UUID().uuidString.prefix(8))")
            defer { try? FileManager.default.removeItem(at: directory) }
            func path(_ name: String) -> String { directory.appendingPathComponent(name).path }
            var commands: [[String]] = [
                ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=vbd-test-ca",
                 "-keyout", path("ca-key.pem"), "-out", path("ca-cert.pem")],
                ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", path("server-key.pem"),
                 "-out", path("server.csr")],
                ["x509", "-req", "-in", path("server.csr"), "-CA", path("ca-cert.pem"), "-CAkey", path("ca-key.pem"),
                 "-CAcreateserial", "-days", "1", "-out", path("server-cert.pem")],
            ]
            for tenant in ["tenant-a", "tenant-b"] {
                try FileManager.default.createDirectory(atPath: path(tenant), withIntermediateDirectories: true)
                commands.append(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/O=tenants/CN=\(tenant)",
                                 "-keyout", path("\(tenant)/client-key.pem"), "-out", path("\(tenant).csr")])
                commands.append(["x509", "-req", "-in", path("\(tenant).csr"), "-CA", path("ca-cert.pem"),
                                 "-CAkey", path("ca-key.pem"), "-CAcreateserial", "-days", "1",
                                 "-out", path("\(tenant)/client-cert.pem")])
            }
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            for arguments in commands {
                let made = try await runTool("openssl", arguments)
                try #require(made.status == 0, "\(made)")
            }
            for tenant in ["tenant-a", "tenant-b"] {
                try FileManager.default.copyItem(atPath: path("ca-cert.pem"), toPath: path("\(tenant)/ca-cert.pem"))
            }
            let service = try TenancyService(configuration: .init(
                resolver: DomainResolver(bindings: ["vol": "export-binding"],
                                         certificateDomains: ["O=tenants,CN=tenant-b": "bee"])))
            let fixture = try await TenancyServer(
                devices: [MemoryBlockDevice(name: "vol", size: 1 << 20)], tenancy: .init(service: service),
                tls: .required(certificatePath: path("server-cert.pem"), keyPath: path("server-key.pem"),
                               caPath: path("ca-cert.pem")))
            defer { Task { await fixture.stop() } }
            for (tenant, writes) in [("tenant-a", 3), ("tenant-b", 5)] {
                let script = """
                t = nbd.NBD()
                t.set_tls(nbd.TLS_REQUIRE)
                t.set_tls_certificates("\(path(tenant))")
                t.set_tls_verify_peer(False)
                t.set_export_name("vol")
                t.connect_unix("\(fixture.socketPath)")
                for i in range(\(writes)):
                    t.pwrite(b"\\x11" * 4096, i * 4096)
                t.shutdown()
                """
                let result = try await runTool("nbdsh", ["-c", script])
                #expect(result.status == 0, "\(result)")
            }
            let ledger = service.snapshot().ledger
            // Unmapped subjects are domains of their own name; mapped ones take the mapping.
            #expect(ledger.usage(of: "O=tenants,CN=tenant-a").operations[.write] == 3)
            #expect(ledger.usage(of: "bee").operations[.write] == 5)
            #expect(ledger.usage(of: "export-binding").operationCount == 0)
        }
    }
}
