import Foundation
import Synchronization
import Testing
import VBDStore
@testable import VBDRados

@Suite(.serialized) struct RadosSharingDomainTests {
    let cluster: MicroCluster
    init() throws { cluster = try MicroCluster.get() }

    /// Two hosts with four threads each ask for a new domain's secret at once: one of them creates
    /// it and every caller gets that one; another domain gets another secret; a damaged secret
    /// object is reported, never replaced.
    @Test func everyHostGetsTheDomainsOneSecret() throws {
        let hosts = [try cluster.connect(), try cluster.connect()]
        let namespace = try cluster.freshPool(hosts[0], prefix: "domain").namespace
        let pools = try hosts.map { try $0.openPool("vbd", namespace: namespace) }
        let answers = Mutex<[Result<UInt64, MicroClusterError>]>([])
        let start = DispatchSemaphore(value: 0)
        let group = DispatchGroup()
        for worker in 0..<8 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                start.wait()
                let answer: Result<UInt64, MicroClusterError>
                do { answer = .success(try RadosSharingDomain.secret(pool: pools[worker % 2], domain: "tenant-a")) } catch {
                    answer = .failure(MicroClusterError(message: "worker \(worker): \(error)"))
                }
                answers.withLock { $0.append(answer) }
            }
        }
        for _ in 0..<8 { start.signal() }
        group.wait()
        let secrets = try answers.withLock { $0 }.map { try $0.get() }
        #expect(secrets.count == 8)
        #expect(Set(secrets).count == 1)
        #expect(secrets.first != 0)
        #expect(try RadosSharingDomain.secret(pool: pools[1], domain: "tenant-a") == secrets.first)

        let other = try RadosSharingDomain.secret(pool: pools[0], domain: "tenant-b")
        #expect(other != secrets.first)

        try pools[0].writeFull(RadosSharingDomain.object("tenant-b"), Array("garbage".utf8))
        let caught = #expect(throws: RadosChunkError.self) { try RadosSharingDomain.secret(pool: pools[1], domain: "tenant-b") }
        if case .corrupt = caught {} else { Issue.record("not .corrupt: \(String(describing: caught))") }
        #expect(try pools[0].readAll(RadosSharingDomain.object("tenant-b")) == Array("garbage".utf8))
        #expect(throws: RadosChunkError.invalidIdentifier("a.b")) { try RadosSharingDomain.secret(pool: pools[0], domain: "a.b") }
    }

    /// Stores created in a sharing domain (each through a connection of its own, as two hosts)
    /// hash with the domain's secret from the pool and record the domain; an open naming another
    /// domain, or a domain for a store of none, is refused; so is a store whose record names a
    /// domain it does not hash with.
    @Test func familiesOfADomainHashWithItsSecret() throws {
        let suffix = UUID().uuidString.prefix(8).lowercased()
        let domain = "dom-\(suffix)", other = "oth-\(suffix)"
        func location(_ name: String) -> RadosStoreLocation {
            RadosStoreLocation(configurationFile: cluster.configurationFile, pool: "vbd", namespace: "\(name)-\(suffix)")
        }
        var options = Store.Options()
        options.spaceReserveBytes = 256 << 10
        for (name, sharingDomain) in [("fa", domain), ("fb", domain), ("fc", other), ("fd", nil)] {
            try RadosStore.open(location(name), options: options, create: true, sharingDomain: sharingDomain).store.close()
        }
        let connection = try cluster.connect()
        let chunkPool = try connection.openPool("vbd", namespace: RadosChunkStorage.chunkNamespace)
        let secret = try RadosSharingDomain.secret(pool: chunkPool, domain: domain)
        func opened(_ name: String, sharingDomain: String? = nil, _ body: (Store) throws -> Void) throws {
            let store = try RadosStore.open(location(name), options: options, create: false, sharingDomain: sharingDomain).store
            defer { try? store.close() }
            try body(store)
        }
        try opened("fa") { #expect($0.hashesWithSecret(secret)) }
        try opened("fb", sharingDomain: domain) { #expect($0.hashesWithSecret(secret)) }
        try opened("fc") { #expect(!$0.hashesWithSecret(secret)) }
        try opened("fd") { #expect(!$0.hashesWithSecret(secret)) }
        #expect(try RadosStore.recordedSharingDomain(connection.openPool("vbd", namespace: location("fc").namespace)) == other)
        #expect(try RadosStore.recordedSharingDomain(connection.openPool("vbd", namespace: location("fd").namespace)) == nil)

        func refusal(_ name: String, sharingDomain: String?) -> String {
            do {
                try opened(name, sharingDomain: sharingDomain) { _ in }
                return "opened"
            } catch { return "\(error)" }
        }
        #expect(refusal("fa", sharingDomain: other).contains("is not in sharing domain \(other): it is in \(domain)"))
        #expect(refusal("fd", sharingDomain: domain).contains("it was created in none"))
        // A store that records the domain without hashing with its secret.
        let storeD = try connection.openPool("vbd", namespace: location("fd").namespace)
        try storeD.writeFull(RadosStore.sharingDomainObject, Array(domain.utf8))
        #expect(refusal("fd", sharingDomain: nil).contains("does not hash with its secret"))
        #expect(refusal("fd", sharingDomain: domain).contains("does not hash with its secret"))
        // The refused opens left the lock free: the store opens once the record is gone.
        try storeD.remove(RadosStore.sharingDomainObject)
        #expect(refusal("fd", sharingDomain: nil) == "opened")
        // A record left in a namespace without a store is not the domain of a store created there.
        let storeE = try connection.openPool("vbd", namespace: location("fe").namespace)
        try storeE.writeFull(RadosStore.sharingDomainObject, Array(domain.utf8))
        try RadosStore.open(location("fe"), options: options, create: true).store.close()
        #expect(try RadosStore.recordedSharingDomain(storeE) == nil)
        #expect(refusal("fe", sharingDomain: nil) == "opened")
    }
}
