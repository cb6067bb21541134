import Foundation
import Synchronization
import Testing
@testable import VBDAccounting

@Suite struct TenancyControlTests {
    /// Every request survives a JSON round trip (the control socket's encoding) and does what it says.
    @Test func controlRequestsRoundTripAndAct() throws {
        let clock = ClockBox(WallTime(seconds: 1_800_000_000))
        let service = try TenancyService(configuration: .init(leasesEnforced: true), stateStorage: MemoryStateStorage(),
                                         auditStorage: MemoryAuditStorage(), clock: { clock.now })
        func send(_ request: TenancyRequest) throws -> TenancyResponse {
            let wire = try JSONDecoder().decode(TenancyRequest.self, from: JSONEncoder().encode(request))
            #expect(wire == request)
            let response = try service.handle(wire, actor: "operator")
            return try JSONDecoder().decode(TenancyResponse.self, from: JSONEncoder().encode(response))
        }
        guard case .lease(let lease) = try send(.leaseGrant(volume: "vm", domain: "alice", mode: .write, seconds: 60))
        else { Issue.record("grant"); return }
        #expect(lease.expiresAt == clock.now + .seconds(60))
        clock.now = clock.now + .seconds(30)
        guard case .lease(let renewed) = try send(.leaseRenew(volume: "vm", domain: "alice", seconds: 120)) else { return }
        #expect(renewed.expiresAt == clock.now + .seconds(120))
        #expect(try send(.leaseList) == .leases([renewed]))
        #expect(try send(.setPolicy(domain: "alice", policy: .init(reservation: 100, limit: 500, weight: 2))) == .done)
        #expect(try send(.bind(export: "vm", domain: "alice")) == .done)
        #expect(try send(.setOverdraft(domain: "alice", limit: 10)) == .done)
        #expect(try send(.topUp(domain: "alice", amount: 5)) == .done)
        service.requestCompleted(domain: "alice", kind: .read, bytes: 4096, deviceTime: .microseconds(80), failed: false)
        guard case .stats(let stats) = try send(.stats) else { Issue.record("stats"); return }
        #expect(stats.domains.map(\.domain) == ["alice"])
        #expect(stats.domains[0].policy.limit == 500 && stats.domains[0].usage.operations[.read] == 1)
        #expect(stats.domains[0].account.overdraftLimit == 10)
        #expect(abs(stats.totalCharged - stats.domains[0].usage.creditsCharged) < 1e-12)
        #expect(try send(.leaseRevoke(volume: "vm", domain: "alice")) != .done)
        guard case .audit(let records) = try send(.auditList) else { return }
        #expect(records.map(\.operation) == ["lease.grant", "lease.renew", "policy.set", "binding.set",
                                             "credit.overdraft", "credit.topup", "lease.revoke"])
        #expect(records.allSatisfy { $0.actor == "operator" })
        guard case .verification(let problems, let count, let head) = try send(.auditVerify(anchorSequence: nil, anchorHash: nil))
        else { return }
        #expect(problems.isEmpty && count == 7 && head?.sequence == 6)
        // An anchor from the future (records cut off the end) is reported.
        guard case .verification(let cut, _, _) = try send(.auditVerify(anchorSequence: 9, anchorHash: "00")) else { return }
        #expect(cut.count == 1 && cut[0].contains("removed"))
    }

    /// Issue 13: leases and bindings follow the image (the store's id), not its name, and go with it.
    @Test func leasesAndBindingsFollowTheImageAndGoWithIt() throws {
        let state = MemoryStateStorage(), audit = MemoryAuditStorage()
        let service = try TenancyService(configuration: .init(leasesEnforced: true), stateStorage: state,
                                         auditStorage: audit)
        let ended = EndedLeases()
        service.addLeaseEndObserver { lease, end in ended.append(lease, end) }
        try service.grantLease(volume: "vm", imageID: 7, domain: "alice", mode: .write, duration: .seconds(600), actor: "op")
        try service.bind(export: "vm", to: "alice", imageID: 7, actor: "op")
        #expect(service.admits(volume: "vm", imageID: 7, domain: "alice", write: true))
        // Another image named vm (the old one deleted behind the service's back, e.g. before a crash).
        #expect(!service.admits(volume: "vm", imageID: 8, domain: "alice", write: false))
        let bob = PeerIdentity(certificateSubject: try CertificateSubject(rfc4514: "CN=bob"))
        guard case .refused = service.admission(export: "vm", imageID: 7, identity: bob) else {
            Issue.record("bob opened alice's bound image"); return
        }
        #expect(service.admission(export: "vm", imageID: 8, identity: bob) == .admitted("CN=bob"))
        // Both survive a restart with their image ids.
        let reloaded = try TenancyService(configuration: .init(leasesEnforced: true), stateStorage: state)
        #expect(reloaded.snapshot().leases.lease(on: "vm", domain: "alice")?.imageID == 7)
        #expect(reloaded.snapshot().bindings["vm"] == ExportBinding(domain: "alice", imageID: 7))
        // Deleting the image drops both, tells the server (to close connections) and is audited.
        try service.imagesDeleted(["vm"], actor: "op")
        #expect(service.snapshot().leases.leases(on: "vm").isEmpty && service.snapshot().bindings.isEmpty)
        #expect(ended.all.map(\.1) == [.deleted] && ended.all.map(\.0.domain) == ["alice"])
        #expect(try service.auditRecords().map(\.operation) == ["lease.grant", "binding.set", "lease.drop", "binding.drop"])
        #expect(LeaseHistory.holdings(of: "vm", in: try service.auditRecords()).map(\.end) == [.deleted])
        #expect(!service.admits(volume: "vm", domain: "alice", write: false))
        let saved = try TenancyService(configuration: .init(leasesEnforced: true), stateStorage: state)
        #expect(saved.snapshot().leases.count == 0 && saved.snapshot().bindings.isEmpty)
    }
}

final class EndedLeases: Sendable {
    private let ended = Mutex<[(Lease, LeaseEnd)]>([])
    func append(_ lease: Lease, _ end: LeaseEnd) { ended.withLock { $0.append((lease, end)) } }
    var all: [(Lease, LeaseEnd)] { ended.withLock { $0 } }
}

@Suite struct TenancyMetricsTests {
    @Test func metricsMirrorTheLedgerAndStorageFollowsBindings() throws {
        let service = try TenancyService(configuration: .init(resolver: DomainResolver(bindings: ["vm": "alice"])))
        service.requestCompleted(domain: "alice", kind: .write, bytes: 65536, deviceTime: .milliseconds(2), failed: false)
        service.requestCompleted(domain: "alice", kind: .read, bytes: 4096, deviceTime: .milliseconds(1), failed: true)
        service.requestCompleted(domain: "alice", kind: .read, bytes: 3 * 4096, deviceTime: .zero, failed: false,
                                 cacheHits: 2, lastChanceHits: 1)
        let metrics = service.statistics().metrics
        func value(_ name: String, _ labels: [String: String]) -> Double? {
            metrics.first { $0.name == name && $0.labels == labels }?.value
        }
        #expect(value("vbd_domain_operations_total", ["domain": "alice", "command": "write"]) == 1)
        #expect(value("vbd_domain_operations_total", ["domain": "alice", "command": "read"]) == 2)
        #expect(value("vbd_domain_cache_hits_total", ["domain": "alice", "tier": "main"]) == 2)
        #expect(value("vbd_domain_cache_hits_total", ["domain": "alice", "tier": "last_chance"]) == 1)
        #expect(value("vbd_domain_failed_operations_total", ["domain": "alice"]) == 1)
        #expect(value("vbd_domain_written_bytes_total", ["domain": "alice"]) == 65536)
        #expect(value("vbd_domain_read_bytes_total", ["domain": "alice"]) == 12288)
        #expect(abs(value("vbd_domain_device_seconds_total", ["domain": "alice"])! - 0.003) < 1e-12)
        // A 64 KiB write costs 2 units, a 4 KiB read 1.0625, a 12 KiB read 1.1875.
        let expectedUnits: Double = 2 + 1.0625 + 1.1875
        #expect(value("vbd_domain_io_units_total", ["domain": "alice"]) == expectedUnits)
        let shares = service.storageShares(images: [
            ImageShareInput(name: "vm", fairStoredBytes: 100, exclusiveStoredBytes: 50),
            ImageShareInput(name: "vm@monday", fairStoredBytes: 20, exclusiveStoredBytes: 0),
            ImageShareInput(name: "base", fairStoredBytes: 30, exclusiveStoredBytes: 30),
        ])
        #expect(shares["alice"]?.fairStoredBytes == 120 && shares["alice"]?.images == ["vm", "vm@monday"])
        #expect(shares[.anonymous]?.fairStoredBytes == 30)
        // With storage figures every holder has a row (anonymous has sent no request), and the
        // rows' fair shares add up to the bytes stored.
        let withStorage = service.statistics(storage: shares)
        #expect(withStorage.domains.map(\.domain) == ["alice", "anonymous"])
        #expect(withStorage.domains.compactMap(\.storage?.fairStoredBytes).reduce(0, +) == 150)
        let stored = withStorage.metrics.filter { $0.name == "vbd_domain_stored_bytes" }
        #expect(stored.map(\.value).sorted() == [30, 120])
        #expect(withStorage.metrics.contains { $0.name == "vbd_domain_exclusive_stored_bytes" && $0.labels == ["domain": "alice"] && $0.value == 50 })
        #expect(!service.statistics().metrics.contains { $0.name == "vbd_domain_stored_bytes" }, "no figures, no series")
    }

    @Test func utilisationIsMeasuredAgainstTheParallelismTheServerSets() throws {
        let clock = ManualMonotonic()
        let service = try TenancyService(configuration: .init(deviceParallelism: 4), monotonic: { clock.now })
        #expect(service.deviceParallelism == 4)
        service.setDeviceParallelism(2)
        #expect(service.deviceParallelism == 2)
        // Two slots busy for a whole 100 ms window: saturated (with 4 slots it would read as half).
        for _ in 0..<10 {
            clock.advance(.milliseconds(100))
            service.requestCompleted(domain: "a", kind: .read, bytes: 4096, deviceTime: .milliseconds(200), failed: false)
        }
        clock.advance(.milliseconds(100))
        #expect(service.snapshot().utilisation > 0.99)
    }
}

/// A monotonic clock the test moves by hand.
final class ManualMonotonic: @unchecked Sendable {
    // @unchecked: tests call it from one thread.
    private(set) var now: Duration = .zero
    func advance(_ by: Duration) { now += by }
}

/// Policies come over the control socket and from the saved state: a bad one is an error for that
/// request (or that file), never a trap that takes the server down.
@Suite struct PolicyValidationTests {
    @Test(arguments: [
        SchedulingPolicy(reservation: -1),
        SchedulingPolicy(weight: 0),
        SchedulingPolicy(weight: -3),
        SchedulingPolicy(reservation: 100, limit: 50),
        SchedulingPolicy(limit: .infinity),
        SchedulingPolicy(burstUnits: -1),
        SchedulingPolicy(queueCapacity: 0),
        SchedulingPolicy(queueCapacity: Int.max),
    ])
    func badPoliciesAreRefusedWithAReason(policy: SchedulingPolicy) throws {
        let service = try TenancyService(configuration: .init(), stateStorage: MemoryStateStorage(),
                                         auditStorage: MemoryAuditStorage())
        #expect(throws: SchedulerError.self) { try service.handle(.setPolicy(domain: "mallory", policy: policy), actor: "test") }
        #expect(service.policy(for: "mallory") == SchedulingPolicy())
    }
}
