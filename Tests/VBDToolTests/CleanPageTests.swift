import Foundation
import Testing
import VBDControl

/// The last-chance tier's hypervisor interface, used out of process over the control socket of a
/// running `vbdtool serve`, as a hypervisor backend would.
@Suite struct CleanPageTests {
    func send(_ request: ControlRequest, _ store: String) throws -> ControlResult {
        guard let result = try ControlClient.sendIfServed(request, storePath: store, progress: { _ in }) else {
            throw HarnessError("no server answered")
        }
        return result
    }

    func get(_ domain: UInt64, _ offset: UInt64, _ store: String) throws -> Data? {
        guard case let .page(page) = try send(.cleanPageGet(domain: domain, volume: "vm", offset: offset, length: 4096), store) else {
            throw HarnessError("unexpected reply")
        }
        return page
    }

    /// Attaches hypervisor domains to tenants and gives each tenant a read lease on `vm`.
    func attach(_ domains: [(UInt64, String)], leasing tenants: [String], _ store: String) throws {
        for (domain, tenant) in domains { _ = try send(.cleanPageAttach(domain: domain, tenant: tenant), store) }
        for tenant in tenants {
            let grant = try Tool.run(["lease", "grant", "vm", "--domain", tenant, "--mode", "read", "--duration", "1h"], store: store)
            #expect(grant.succeeded, "\(grant.stderr)")
        }
    }

    @Test func putGetIsolationStalenessAndInvalidation() throws {
        guard let python = LiveTests.pythonWithNBD() else {
            Issue.record("python3-libnbd is needed to write through NBD")
            return
        }
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let image = dir.path + "/image.raw"
        let contents = patternBytes(count: 16 * 4096, seed: 11)
        try writeBytes(contents, at: 0, to: image)
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        _ = try send(.importImage(path: image, name: "vm", blockSize: 4096, group: nil, format: "raw"), store)
        try attach([(1, "acme"), (2, "acme-other-vm"), (3, "acme")], leasing: ["acme"], store)

        // A clean page (the mapped contents) is kept and returned to its domain only.
        let page = Data(contents[4096..<8192])
        _ = try send(.cleanPagePut(domain: 1, volume: "vm", offset: 4096, page: page), store)
        #expect(try get(1, 4096, store) == page)
        #expect(try get(2, 4096, store) == nil, "another domain must not see domain 1's pages")
        // A page that is not what the volume holds is refused (it is not clean).
        _ = try send(.cleanPagePut(domain: 1, volume: "vm", offset: 8192, page: Data(repeating: 0x5A, count: 4096)), store)
        #expect(try get(1, 8192, store) == nil)

        // A write after the put makes the page stale: never returned again.
        let write = try Subprocess.run(python, ["-c", """
            import nbd, sys
            h = nbd.NBD(); h.connect_uri(sys.argv[1]); h.pwrite(b"\\x42" * 4096, 4096); h.flush(); h.shutdown()
            """, server.uri("vm")])
        #expect(write.succeeded, "\(write.stderr)")
        #expect(try get(1, 4096, store) == nil, "a page overwritten after its put must not come back")

        // Invalidation per page, per volume and per domain.
        let p3 = Data(contents[12288..<16384]), p4 = Data(contents[16384..<20480])
        _ = try send(.cleanPagePut(domain: 1, volume: "vm", offset: 12288, page: p3), store)
        _ = try send(.cleanPagePut(domain: 1, volume: "vm", offset: 16384, page: p4), store)
        _ = try send(.cleanPagePut(domain: 3, volume: "vm", offset: 16384, page: p4), store)
        #expect(try get(1, 12288, store) == p3)
        _ = try send(.cleanPageInvalidate(domain: 1, volume: "vm", offset: 12288), store)
        #expect(try get(1, 12288, store) == nil)
        #expect(try get(1, 16384, store) == p4)
        _ = try send(.cleanPageInvalidate(domain: 1, volume: "vm", offset: nil), store)
        #expect(try get(1, 16384, store) == nil)
        #expect(try get(3, 16384, store) == p4)
        _ = try send(.cleanPageInvalidate(domain: 3, volume: nil, offset: nil), store)
        #expect(try get(3, 16384, store) == nil)
        #expect(server.stop() == 0)
    }

    /// A hypervisor domain whose tenant holds no lease on a volume can neither plant a page of it
    /// nor read one back: put + get must not confirm a guess of another tenant's block.
    @Test func aDomainWithoutALeaseOnTheVolumeGetsNothing() throws {
        let dir = try TemporaryDirectory()
        let store = try dir.initializedStore()
        let image = dir.path + "/image.raw"
        let contents = patternBytes(count: 4 * 4096, seed: 23)
        try writeBytes(contents, at: 0, to: image)
        let server = try RunningServer(store: store, nbdSocket: dir.path + "/nbd.sock")
        _ = try send(.importImage(path: image, name: "vm", blockSize: 4096, group: nil, format: "raw"), store)
        try attach([(1, "acme"), (2, "mallory")], leasing: ["acme"], store)
        let secret = Data(contents[4096..<8192])

        // mallory's domain knows (guesses) the block and tries put + get: nothing is kept.
        _ = try send(.cleanPagePut(domain: 2, volume: "vm", offset: 4096, page: secret), store)
        #expect(try get(2, 4096, store) == nil, "a domain without a lease confirmed another tenant's block")
        // A domain no hypervisor attached holds nothing either.
        _ = try send(.cleanPagePut(domain: 9, volume: "vm", offset: 4096, page: secret), store)
        #expect(try get(9, 4096, store) == nil)
        // The lease holder's domain is served; once its lease is revoked it is not.
        _ = try send(.cleanPagePut(domain: 1, volume: "vm", offset: 4096, page: secret), store)
        #expect(try get(1, 4096, store) == secret)
        let revoke = try Tool.run(["lease", "revoke", "vm", "--domain", "acme"], store: store)
        #expect(revoke.succeeded, "\(revoke.stderr)")
        #expect(try get(1, 4096, store) == nil, "a domain whose lease ended still reads the volume's pages")
        #expect(server.stop() == 0)
    }
}
