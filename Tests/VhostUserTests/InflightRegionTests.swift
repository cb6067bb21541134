import Testing
@testable import VhostUser

/// One queue's inflight region in memory the test owns (as the front end keeps it across back ends).
final class InflightArea {
    let base: UnsafeMutableRawPointer
    let queueSize: UInt16

    init(queueSize: UInt16) {
        self.queueSize = queueSize
        let bytes = InflightLayout.queueRegionBytes(queueSize: queueSize)
        base = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        base.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
    }

    deinit { base.deallocate() }

    var region: InflightQueueRegion { InflightQueueRegion(base: base, queueSize: queueSize) }
    func u16(at offset: Int) -> UInt16 { (base + offset).loadUnaligned(as: UInt16.self) }
    func setU16(_ value: UInt16, at offset: Int) { (base + offset).storeBytes(of: value, as: UInt16.self) }
    /// Marks `head` in flight with `counter`, as a back end that took it and then died left it.
    func markInflight(_ head: UInt16, counter: UInt64) {
        let entry = base + 16 + 16 * Int(head)
        (entry + 8).storeBytes(of: counter, as: UInt64.self)
        entry.storeBytes(of: 1, as: UInt8.self)
    }
}

@Suite struct InflightRegionTests {
    func queue(_ guest: GuestRing, _ area: InflightArea?, base: UInt16 = 0) throws -> SplitVirtqueue {
        try SplitVirtqueue(size: guest.queueSize, addresses: guest.addresses, memory: guest.table, lastAvailableIndex: base,
                           eventIndex: false, indirectDescriptors: true, inflight: area?.region)
    }

    /// The layout of vhost-user.rst's QueueRegionSplit / DescStateSplit, each queue 64-byte aligned.
    @Test func layout() throws {
        #expect(InflightLayout.queueRegionBytes(queueSize: 128) == 2112)   // 16 + 16 * 128, rounded up to 64
        #expect(InflightLayout.queueRegionBytes(queueSize: 16) == 320)
        #expect(InflightLayout.totalBytes(queueCount: 4, queueSize: 256) == 4 * 4160)
        let area = InflightArea(queueSize: 16)
        // A region never used (version 0) is initialised: version 1, desc_num, used_idx.
        area.setU16(0xffff, at: 12)
        let recovery = try area.region.recover(usedIndex: 7)
        #expect(recovery == .init(resubmit: [], nextCounter: 1))
        #expect(area.u16(at: 8) == 1 && area.u16(at: 10) == 16 && area.u16(at: 12) == 0 && area.u16(at: 14) == 7)
    }

    /// Heads are recorded when taken and cleared when completed; the used index and the last
    /// batch follow each completion.
    @Test func takingAndCompletingAreRecorded() throws {
        let guest = GuestRing()
        let area = InflightArea(queueSize: UInt16(guest.queueSize))
        let vq = try queue(guest, area)
        for i in 0..<3 { guest.blockRequest(type: 4, sector: 0, firstDescriptor: 2 * i) }
        let heads = try (0..<3).map { _ in try #require(try vq.nextAvailable()) }
        #expect(heads == [0, 2, 4])
        #expect(heads.map(area.region.isInflight) == [true, true, true])
        #expect(heads.map(area.region.counter) == [1, 2, 3])
        vq.complete(head: 2, writtenBytes: 1)
        #expect(heads.map(area.region.isInflight) == [true, false, true])
        #expect(area.region.usedIndex == 1 && area.region.lastBatchHead == 2)
        vq.complete(head: 4, writtenBytes: 1)
        #expect(area.region.lastBatchHead == 4 && area.region.next(4) == 2 && area.region.usedIndex == 2)
    }

    /// The case the region exists for: requests complete out of order, the back end dies, and the
    /// next one must serve exactly the heads still in flight, oldest first, then continue with new
    /// ones. From the used index alone it would serve again one that was answered and never the
    /// oldest one (the last check shows what the restart without a region does).
    @Test func aRestartServesAgainExactlyTheHeadsInFlight() throws {
        let guest = GuestRing()
        let area = InflightArea(queueSize: UInt16(guest.queueSize))
        let first = try queue(guest, area)
        for i in 0..<4 { guest.blockRequest(type: 4, sector: 0, firstDescriptor: 2 * i) }
        for _ in 0..<4 { _ = try first.nextAvailable() }
        first.complete(head: 2, writtenBytes: 1)
        first.complete(head: 6, writtenBytes: 1)
        // The back end dies with heads 0 and 4 in flight; the front end saw used index 2.
        let second = try queue(guest, area, base: 2)
        #expect(second.resubmitting == 2)
        #expect(second.hasAvailable && !second.armKickAndCheckEmpty())
        #expect(try second.nextAvailable() == 0)
        #expect(try second.nextAvailable() == 4)
        #expect(second.lastAvailableIndex == 4)
        #expect(try second.nextAvailable() == nil)
        guest.blockRequest(type: 4, sector: 0, firstDescriptor: 8)
        #expect(try second.nextAvailable() == 8)
        #expect(area.region.counter(8) == 4)   // after the highest counter still in flight (head 4: 3)
        second.complete(head: 4, writtenBytes: 1)
        second.complete(head: 0, writtenBytes: 1)
        second.complete(head: 8, writtenBytes: 1)
        #expect((0..<16).allSatisfy { !area.region.isInflight($0) })
        #expect(guest.usedIndex == 5 && area.region.usedIndex == 5)

        // Without the region: the same out-of-order state restarted from the used index.
        let plainGuest = GuestRing()
        let plain = try queue(plainGuest, nil)
        for i in 0..<4 { plainGuest.blockRequest(type: 4, sector: 0, firstDescriptor: 2 * i) }
        for _ in 0..<4 { _ = try plain.nextAvailable() }
        plain.complete(head: 2, writtenBytes: 1)
        plain.complete(head: 6, writtenBytes: 1)
        let restarted = try queue(plainGuest, nil, base: 2)
        #expect(try restarted.nextAvailable() == 4)
        #expect(try restarted.nextAvailable() == 6)   // answered already; head 0 is never served
    }

    /// Resubmission follows the order heads were taken in (their counters), not their numbers.
    @Test func resubmissionFollowsTheCounters() throws {
        let area = InflightArea(queueSize: 16)
        _ = try area.region.recover(usedIndex: 0)
        area.markInflight(9, counter: 40)
        area.markInflight(3, counter: 42)
        area.markInflight(12, counter: 41)
        #expect(try area.region.recover(usedIndex: 0) == .init(resubmit: [9, 12, 3], nextCounter: 43))
    }

    /// A back end that died after publishing a used index and before clearing the head's flag:
    /// the region's used_idx lags, and the head at last_batch_head is cleared, not served again.
    @Test func aCompletionCutShortIsFinished() throws {
        let area = InflightArea(queueSize: 16)
        _ = try area.region.recover(usedIndex: 4)
        area.markInflight(5, counter: 1)
        area.markInflight(7, counter: 2)
        area.region.completing(head: 7)   // last_batch_head = 7; the used index then became 5
        #expect(try area.region.recover(usedIndex: 5) == .init(resubmit: [5], nextCounter: 2))
        #expect(area.region.usedIndex == 5 && !area.region.isInflight(7))
    }

    /// What the front end (or a different back end) left in the region is checked before use.
    @Test func aBadRegionIsRefused() throws {
        let guest = GuestRing()
        let area = InflightArea(queueSize: 16)
        area.setU16(2, at: 8)
        #expect(throws: VirtqueueError.inflight(.unknownVersion(2))) { try queue(guest, area) }
        area.setU16(1, at: 8)
        area.setU16(32, at: 10)
        #expect(throws: VirtqueueError.inflight(.queueSizeMismatch(region: 32, queue: 16))) { try queue(guest, area) }
        area.setU16(16, at: 10)
        area.setU16(3, at: 14)   // used_idx behind the ring's 0: the last batch is consulted
        area.setU16(16, at: 12)
        #expect(throws: VirtqueueError.inflight(.lastBatchHeadOutOfRange(16))) { try queue(guest, area) }
        let other = InflightArea(queueSize: 8)
        #expect(throws: VirtqueueError.inflight(.queueSizeMismatch(region: 8, queue: 16))) { try queue(guest, other) }
    }
}
