import Testing
import VBDCache

@Suite struct CacheTraceTests {
    @Test func committedTraceParsesAndIsConsistent() throws {
        let trace = try loadCommittedTrace()
        #expect(trace.blockBytes == 4096)
        #expect(trace.records.contains { $0.isWrite } && trace.records.contains { !$0.isWrite })
        let requests = trace.requests()
        let contentCount = UInt64(trace.compressedBytes.count)
        #expect(requests.allSatisfy { $0.key >= 1 && $0.key <= contentCount })
        #expect(trace.compressedBytes.allSatisfy { $0 > 0 })
    }

    @Test func malformedTracesAreRejected() throws {
        let good = Array("VBDTRACE".utf8) + le(1) + le(4096) + le(2) + le(1) + le(1) + le(0) + le(1) + [100, 0]
            + le(0) + le(2 << 1)
        #expect(throws: Never.self) { try CacheTrace(bytes: good) }
        var badMagic = good
        badMagic[0] = 0
        #expect(throws: CacheTraceError.self) { try CacheTrace(bytes: badMagic) }
        #expect(throws: CacheTraceError.self) { try CacheTrace(bytes: Array(good.dropLast())) }
        var recordPastEnd = good
        recordPastEnd.replaceSubrange(recordPastEnd.count - 4..<recordPastEnd.count, with: le(3 << 1))
        #expect(throws: CacheTraceError.self) { try CacheTrace(bytes: recordPastEnd) }
        var unknownContent = good
        unknownContent.replaceSubrange(32..<36, with: le(5))
        #expect(throws: CacheTraceError.self) { try CacheTrace(bytes: unknownContent) }
    }

    private func le(_ value: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }
}

@Suite struct OptimalCacheTests {
    /// Hand-checked: capacity 2, requests 1 2 3 1 2. On the miss for 3, MIN evicts 2 (its next use is
    /// furthest away), so 1 hits and 2 misses: one hit. With room for 3 blocks, both 1 and 2 hit.
    @Test func beladyOnATinySequence() {
        let requests = [1, 2, 3, 1, 2].map { CacheRequest(key: UInt64($0)) }
        #expect(OptimalCache.hits(requests, capacityEntries: 2).hits == 1)
        #expect(OptimalCache.hits(requests, capacityEntries: 3).hits == 2)
    }
}
