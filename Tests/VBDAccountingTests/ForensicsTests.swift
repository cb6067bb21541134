import Foundation
import Testing
import VBDCore
import VBDStore
@testable import VBDAccounting

@Suite struct ForensicsTests {
    /// A real store: the volume is written by alice, snapshotted, written by bob, snapshotted; the
    /// audit log records the leases and snapshots; forensics names the holders and the changed bytes.
    @Test func whoHeldTheVolumeAndWhatChangedBetweenTwoPoints() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("forensics-\(UUID().uuidString)").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try Store.initialize(path: path)
        _ = try store.createVolume(name: "vm", size: 1 << 20)
        let clock = ClockBox(WallTime(seconds: 1_800_000_000))
        let service = try TenancyService(configuration: .init(leasesEnforced: true),
                                         auditStorage: MemoryAuditStorage(), clock: { clock.now })
        func write(_ byte: UInt8, at offset: UInt64) throws {
            let device = try store.openExport(named: "vm")
            try [UInt8](repeating: byte, count: 4096).withUnsafeBytes { try device.write(offset: offset, data: $0, fua: true) }
        }
        func snapshot(_ name: String) throws {
            _ = try store.snapshot(volume: "vm", name: name)
            try service.audit(actor: "operator", operation: AuditOperation.snapshotCreate, target: "vm",
                              details: ["snapshot": "vm@\(name)"])
        }
        let t0 = clock.now
        try service.grantLease(volume: "vm", domain: "alice", mode: .write, duration: .seconds(100), actor: "operator")
        try write(1, at: 0)
        clock.now = t0 + .seconds(10)
        try snapshot("s1")
        clock.now = t0 + .seconds(20)
        try service.revokeLease(volume: "vm", domain: "alice", actor: "operator")
        try service.grantLease(volume: "vm", domain: "bob", mode: .write, duration: .seconds(100), actor: "operator")
        try write(2, at: 8192)
        try write(2, at: 65536)
        clock.now = t0 + .seconds(30)
        try snapshot("s2")

        let records = try service.auditRecords()
        let report = try VolumeForensics.investigate(volume: "vm", from: t0 + .seconds(10), to: t0 + .seconds(30),
                                                     records: records, diff: store.diff(from:to:))
        #expect(report.fromSnapshot == "vm@s1" && report.toSnapshot == "vm@s2")
        #expect(report.changedRanges == [8192..<12288, 65536..<69632])
        #expect(report.holders.map(\.domain) == ["alice", "bob"])
        #expect(report.holders[0].end == .revoked && report.holders[0].until == t0 + .seconds(20))
        // Before s1 only alice held it.
        let early = try VolumeForensics.investigate(volume: "vm", from: t0, to: t0 + .seconds(5), records: records,
                                                    diff: store.diff(from:to:))
        #expect(early.holders.map(\.domain) == ["alice"])
    }
}
