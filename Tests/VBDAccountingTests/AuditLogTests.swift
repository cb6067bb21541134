import Foundation
import Testing
@testable import VBDAccounting

@Suite struct AuditLogTests {
    /// The chain's format is pinned: a record's hash is SHA-256 over its canonical bytes, here
    /// checked against a digest computed independently (Python's hashlib over the same encoding),
    /// so logs written before the hash moved to swift-crypto still verify.
    @Test func recordHashIsSHA256OfTheCanonicalEncoding() throws {
        let (log, _) = try makeLog()
        let first = try #require(try log.records().first)
        #expect(first.hash == "85f3e1687cab2d9c0d21dea5d1d8559dd4fef3f49269c7a6fbb33f156c0cf125")
        #expect(first.computedHash == first.hash)
    }

    /// Five records written through the real log code.
    func makeLog() throws -> (AuditLog, MemoryAuditStorage) {
        let storage = MemoryAuditStorage()
        var log = try AuditLog(storage: storage)
        let operations = ["volume.create", "lease.grant", "snapshot.create", "lease.revoke", "gc"]
        for (index, operation) in operations.enumerated() {
            try log.append(actor: index % 2 == 0 ? "operator" : "alice", operation: operation, target: "vm\(index)",
                           details: ["n": "\(index)"], time: WallTime(seconds: 1_800_000_000 + Int64(index)))
        }
        return (log, storage)
    }

    func lines(_ storage: MemoryAuditStorage) throws -> [String] {
        String(decoding: try storage.readAll(), as: UTF8.self).split(separator: "\n").map(String.init)
    }

    func write(_ lines: [String], to storage: MemoryAuditStorage) {
        storage.replaceAll(Array((lines.joined(separator: "\n") + "\n").utf8))
    }

    @Test func intactLogVerifiesAndChainContinuesAcrossReopen() throws {
        let (log, storage) = try makeLog()
        let result = try log.verify()
        #expect(result.isIntact && result.recordCount == 5)
        var reopened = try AuditLog(storage: storage)
        let record = try reopened.append(actor: "op", operation: "volume.delete", target: "vm0", time: WallTime(seconds: 1))
        #expect(record.sequence == 5 && record.previousHash == result.head?.hash)
        #expect(try reopened.verify(anchor: AuditAnchor(sequence: 5, hash: record.hash)).isIntact)
    }

    @Test func alteredRecordIsNamed() throws {
        let (log, storage) = try makeLog()
        var text = try lines(storage)
        text[2] = text[2].replacingOccurrences(of: "\"actor\":\"operator\"", with: "\"actor\":\"mallory\"")
        write(text, to: storage)
        #expect(try log.verify().problems == [.altered(sequence: 2, line: 3)])
    }

    @Test func alteredAndRehashedRecordIsNamed() throws {
        let (log, storage) = try makeLog()
        var records = try log.records()
        records[1].actor = "mallory"
        records[1].hash = records[1].computedHash   // the editor fixes the record's own hash
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        write(try records.map { String(decoding: try encoder.encode($0), as: UTF8.self) }, to: storage)
        #expect(try log.verify().problems == [.altered(sequence: 1, line: 2)])
    }

    @Test func removedRecordIsNamed() throws {
        let (log, storage) = try makeLog()
        var text = try lines(storage)
        text.remove(at: 3)
        write(text, to: storage)
        #expect(try log.verify().problems == [.removed(sequence: 3)])
        text.remove(at: 0)
        write(text, to: storage)
        #expect(try log.verify().problems == [.removed(sequence: 0), .removed(sequence: 3)])
    }

    @Test func reorderedRecordIsNamed() throws {
        let (log, storage) = try makeLog()
        var text = try lines(storage)
        text.swapAt(1, 3)
        write(text, to: storage)
        #expect(try log.verify().problems == [.reordered(sequence: 2, line: 3), .reordered(sequence: 1, line: 4)])
    }

    @Test func truncatedTailIsFoundOnlyWithAnAnchor() throws {
        let (log, storage) = try makeLog()
        let anchor = try log.verify().head!
        var text = try lines(storage)
        text.removeLast()
        write(text, to: storage)
        #expect(try log.verify().isIntact, "without an anchor a clean truncation is undetectable")
        #expect(try log.verify(anchor: anchor).problems == [.truncated(expectedLastSequence: 4, foundLastSequence: 3)])
    }

    /// Issue 13: records dropped from the tail and new ones appended after them keep the sequence
    /// numbers consecutive and the chain linked, so only the anchor can tell: the record now at the
    /// anchor's sequence is not the one the anchor names.
    @Test func droppedRecordsFollowedByAppendsFailAgainstTheAnchor() throws {
        let (log, storage) = try makeLog()
        let anchor = try #require(try log.verify().head)   // #4, after lease.grant (#1) and lease.revoke (#3)
        var text = try lines(storage)
        text.removeLast(3)                                  // drops #2..#4, lease.revoke among them
        write(text, to: storage)
        var tampered = try AuditLog(storage: storage)
        for index in 0..<4 {                                // #2..#5: the tail grows past the anchor again
            try tampered.append(actor: "mallory", operation: "gc", target: "store", details: ["n": "\(index)"],
                                time: WallTime(seconds: 1_900_000_000 + Int64(index)))
        }
        #expect(try tampered.verify().isIntact, "without an anchor the rewritten tail is a valid chain")
        #expect(try tampered.verify(anchor: anchor).problems == [.anchorMismatch(sequence: 4, line: 5)])
    }

    /// An anchor taken earlier still verifies a log that only grew since.
    @Test func anchorFromAnEarlierHeadVerifiesAGrownLog() throws {
        let (log, storage) = try makeLog()
        let anchor = try #require(try log.verify().head)
        var grown = try AuditLog(storage: storage)
        try grown.append(actor: "op", operation: "gc", target: "store", time: WallTime(seconds: 1_900_000_000))
        #expect(try grown.verify(anchor: anchor).isIntact)
        #expect(try grown.verify(anchor: AuditAnchor(sequence: 2, hash: try log.records()[2].hash)).isIntact)
        #expect(try grown.verify(anchor: AuditAnchor(sequence: 2, hash: anchor.hash)).problems
                == [.anchorMismatch(sequence: 2, line: 3)])
    }

    @Test func malformedLineAndTornTail() throws {
        let (_, storage) = try makeLog()
        try storage.append(Array("{\"sequence\":5,\"ti".utf8))   // crash in the middle of an append
        var log = try AuditLog(storage: storage)
        #expect(try log.verify().problems == [.malformed(line: 6)])
        let record = try log.append(actor: "op", operation: "gc", target: "store", time: WallTime(seconds: 9))
        #expect(record.sequence == 5)
        let result = try log.verify()
        #expect(result.problems == [.malformed(line: 6)] && result.recordCount == 6)
    }

    @Test func fileStorageAppendsDurablyAndReopens() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("audit-\(UUID().uuidString).log").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        var log = try AuditLog(storage: try FileAuditStorage(path: path))
        try log.append(actor: "op", operation: "volume.create", target: "vm", time: WallTime(seconds: 1))
        try log.append(actor: "op", operation: "volume.resize", target: "vm", details: ["size": "1G"], time: WallTime(seconds: 2))
        let reopened = try AuditLog(storage: try FileAuditStorage(path: path))
        #expect(reopened.nextSequence == 2)
        #expect(try reopened.verify().isIntact)
        #expect(try reopened.records().map(\.operation) == ["volume.create", "volume.resize"])
    }

    @Test func forensicsReconstructsWhoHeldAVolumeWhen() throws {
        var clock = WallTime(seconds: 1_800_000_000)
        let box = ClockBox(clock)
        let service = try TenancyService(configuration: .init(leasesEnforced: true), auditStorage: MemoryAuditStorage(),
                                         clock: { box.now })
        try service.grantLease(volume: "vm", domain: "alice", mode: .write, duration: .seconds(60), actor: "operator")
        clock = clock + .seconds(30); box.now = clock
        try service.renewLease(volume: "vm", domain: "alice", duration: .seconds(60), actor: "alice")  // to +90
        clock = clock + .seconds(100); box.now = clock   // +130: alice's lease expired at +90
        try service.grantLease(volume: "vm", domain: "bob", mode: .write, duration: .seconds(60), actor: "operator")
        clock = clock + .seconds(10); box.now = clock
        try service.revokeLease(volume: "vm", domain: "bob", actor: "operator")
        let records = try service.auditRecords()
        #expect(records.map(\.operation) == ["lease.grant", "lease.renew", "lease.expire", "lease.grant", "lease.revoke"])
        let t0 = WallTime(seconds: 1_800_000_000)
        let holdings = LeaseHistory.holdings(of: "vm", in: records)
        #expect(holdings.map(\.domain) == ["alice", "bob"])
        #expect(holdings[0].from == t0 && holdings[0].until == t0 + .seconds(90) && holdings[0].end == .expired)
        #expect(holdings[1].from == t0 + .seconds(130) && holdings[1].until == t0 + .seconds(140) && holdings[1].end == .revoked)
        #expect(LeaseHistory.holders(of: "vm", at: t0 + .seconds(89), in: records).map(\.domain) == ["alice"])
        #expect(LeaseHistory.holders(of: "vm", at: t0 + .seconds(100), in: records).isEmpty)
        #expect(LeaseHistory.holders(of: "vm", at: t0 + .seconds(135), in: records).map(\.domain) == ["bob"])
        #expect(try service.verifyAudit()?.isIntact == true)
    }
}

final class ClockBox: @unchecked Sendable {
    // @unchecked: tests set it from one task only.
    var now: WallTime
    init(_ now: WallTime) { self.now = now }
}
