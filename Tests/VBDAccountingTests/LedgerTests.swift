import Testing
import VBDCore
@testable import VBDAccounting

@Suite struct LedgerTests {
    @Test func everyRecordLandsInOneDomainAndTotalsAddUp() {
        var ledger = Ledger()
        var generator = SplitMix64(seed: 3)
        var bytesRead: UInt64 = 0, bytesWritten: UInt64 = 0, count: UInt64 = 0
        for _ in 0..<2000 {
            let kind = IOKind.allCases[Int(generator.next() % UInt64(IOKind.allCases.count))]
            let bytes = generator.next() % (1 << 20)
            let failed = generator.next() % 10 == 0
            ledger.record(UsageRecord(domain: DomainID("d\(generator.next() % 7)"), kind: kind, bytes: bytes,
                                      deviceTime: .microseconds(10), failed: failed))
            count += 1
            if !failed && kind == .read { bytesRead += bytes }
            if !failed && kind == .write { bytesWritten += bytes }
        }
        let total = ledger.total
        #expect(total.operationCount == count)
        #expect(total.bytesRead == bytesRead && total.bytesWritten == bytesWritten)
        #expect(total.deviceTime == .microseconds(10) * 2000)
        #expect(ledger.domains.count == 7)
    }

    @Test func domainTableIsBounded() {
        var ledger = Ledger(domainsMax: 4)
        for index in 0..<10 {
            ledger.record(UsageRecord(domain: DomainID("tenant\(index)"), kind: .read, bytes: 4096, deviceTime: .zero))
        }
        #expect(ledger.domains.count == 4)
        #expect(ledger.usage(of: Ledger.overflowDomain).operationCount == 7)
        #expect(ledger.total.operationCount == 10)
    }

    @Test func storageSharesSumToStoredBytes() {
        // Three images: two share blocks (fair shares already split by the store), one unowned.
        let images = [
            ImageShareInput(name: "vm1", fairStoredBytes: 3000.5, exclusiveStoredBytes: 2048),
            ImageShareInput(name: "vm2", fairStoredBytes: 1000.25, exclusiveStoredBytes: 0),
            ImageShareInput(name: "base", fairStoredBytes: 999.25, exclusiveStoredBytes: 512),
        ]
        let shares = StorageShares.perDomain(images: images, owner: { ["vm1": "alice", "vm2": "alice"][$0] })
        #expect(shares["alice"]?.fairStoredBytes == 4000.75)
        #expect(shares["alice"]?.exclusiveStoredBytes == 2048)
        #expect(shares[.anonymous]?.images == ["base"])
        #expect(shares.values.reduce(0) { $0 + $1.fairStoredBytes } == 5000)
    }
}
