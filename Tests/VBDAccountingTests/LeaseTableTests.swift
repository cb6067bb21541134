import Testing
import VBDCore
@testable import VBDAccounting

@Suite struct LeaseTableTests {
    let t0 = WallTime(seconds: 1_800_000_000)

    @Test func grantRenewRevokeExpire() throws {
        var table = LeaseTable()
        let lease = try table.grant(volume: "vm1", domain: "alice", mode: .write, duration: .seconds(60), now: t0)
        #expect(lease.expiresAt == t0 + .seconds(60))
        #expect(table.permits(volume: "vm1", domain: "alice", write: true, now: t0 + .seconds(59)))
        #expect(!table.permits(volume: "vm1", domain: "alice", write: true, now: t0 + .seconds(60)))
        #expect(!table.permits(volume: "vm1", domain: "bob", write: false, now: t0))
        // Renewal extends, never shortens.
        #expect(try table.renew(volume: "vm1", domain: "alice", duration: .seconds(120), now: t0 + .seconds(30)).expiresAt
                == t0 + .seconds(150))
        #expect(try table.renew(volume: "vm1", domain: "alice", duration: .seconds(1), now: t0 + .seconds(31)).expiresAt
                == t0 + .seconds(150))
        #expect(table.expire(now: t0 + .seconds(149)).isEmpty)
        #expect(table.expire(now: t0 + .seconds(150)).map(\.domain) == ["alice"])
        #expect(table.count == 0)
        #expect(throws: LeaseError.notHeld(volume: "vm1", domain: "alice")) {
            try table.renew(volume: "vm1", domain: "alice", duration: .seconds(1), now: t0 + .seconds(151))
        }
        try table.grant(volume: "vm1", domain: "bob", mode: .read, duration: .seconds(10), now: t0 + .seconds(151))
        #expect(try table.revoke(volume: "vm1", domain: "bob").domain == "bob")
        #expect(table.leases(on: "vm1").isEmpty)
        #expect(throws: LeaseError.invalidDuration) {
            try table.grant(volume: "vm1", domain: "bob", mode: .read, duration: .zero, now: t0)
        }
    }

    @Test func writeLeaseExcludesOtherDomainsUntilItEnds() throws {
        var table = LeaseTable()
        try table.grant(volume: "v", domain: "alice", mode: .write, duration: .seconds(10), now: t0)
        #expect(throws: LeaseError.conflict(volume: "v", holder: "alice", mode: .write)) {
            try table.grant(volume: "v", domain: "bob", mode: .write, duration: .seconds(10), now: t0 + .seconds(5))
        }
        #expect(throws: LeaseError.conflict(volume: "v", holder: "alice", mode: .write)) {
            try table.grant(volume: "v", domain: "bob", mode: .read, duration: .seconds(10), now: t0 + .seconds(5))
        }
        // After expiry the volume can be leased to another domain.
        try table.grant(volume: "v", domain: "bob", mode: .write, duration: .seconds(10), now: t0 + .seconds(10))
        #expect(table.leases(on: "v").map(\.domain) == ["bob"])
        // Readers share; a writer waits for all of them.
        try table.revoke(volume: "v", domain: "bob")
        try table.grant(volume: "v", domain: "r1", mode: .read, duration: .seconds(10), now: t0)
        try table.grant(volume: "v", domain: "r2", mode: .read, duration: .seconds(20), now: t0)
        #expect(throws: LeaseError.conflict(volume: "v", holder: "r1", mode: .read)) {
            try table.grant(volume: "v", domain: "w", mode: .write, duration: .seconds(10), now: t0)
        }
        #expect(table.invariantViolation() == nil)
    }

    /// Property: under random grant/renew/revoke/expire from several domains, never two write
    /// holders, never a writer beside another holder, and counts stay consistent.
    @Test(arguments: [1, 2, 3, 4, 5] as [UInt64])
    func randomOperationsKeepInvariants(seed: UInt64) {
        var generator = SplitMix64(seed: seed)
        var table = LeaseTable()
        var now = t0
        let domains: [DomainID] = ["a", "b", "c", "d"], volumes = ["v1", "v2", "v3"]
        var writeGrants = 0
        for _ in 0..<3000 {
            now = now + .milliseconds(Int64(generator.next() % 2000))
            let domain = domains[Int(generator.next() % 4)], volume = volumes[Int(generator.next() % 3)]
            switch generator.next() % 5 {
            case 0, 1:
                let mode: LeaseMode = generator.next() % 2 == 0 ? .write : .read
                if (try? table.grant(volume: volume, domain: domain, mode: mode,
                                     duration: .seconds(Int64(1 + generator.next() % 10)), now: now)) != nil,
                   mode == .write { writeGrants += 1 }
            case 2: _ = try? table.renew(volume: volume, domain: domain, duration: .seconds(5), now: now)
            case 3: _ = try? table.revoke(volume: volume, domain: domain)
            default:
                for lease in table.expire(now: now) { #expect(lease.expiresAt <= now) }
                for holders in table.leases.values { #expect(holders.allSatisfy { $0.expiresAt > now }) }
            }
            if let violation = table.invariantViolation() {
                Issue.record("seed \(seed): \(violation)")
                return
            }
        }
        #expect(writeGrants > 50, "the property must have been exercised")
    }
}
