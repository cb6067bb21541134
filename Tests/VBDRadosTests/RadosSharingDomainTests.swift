import Foundation
import Synchronization
import Testing
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
}
