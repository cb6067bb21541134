import Testing
@testable import VhostUser

@Suite struct SplitVirtqueueTests {
    func queue(_ guest: GuestRing, eventIndex: Bool = false, indirect: Bool = true, base: UInt16 = 0) throws -> SplitVirtqueue {
        try SplitVirtqueue(size: guest.queueSize, addresses: guest.addresses, memory: guest.table, lastAvailableIndex: base,
                           eventIndex: eventIndex, indirectDescriptors: indirect)
    }

    @Test func walksAChainAndCompletesIt() throws {
        let guest = GuestRing()
        let vq = try queue(guest)
        #expect(try vq.nextAvailable() == nil)
        let request = guest.blockRequest(type: 0, sector: 0, readLength: 4096, firstDescriptor: 3)
        let head = try #require(try vq.nextAvailable())
        #expect(head == 3)
        let chain = try vq.chain(head: head)
        #expect(chain.readable.map(\.count) == [16])
        #expect(chain.writable.map(\.count) == [4096, 1])
        #expect(chain.writable[1].baseAddress == guest.base + request.status)
        vq.complete(head: head, writtenBytes: 4097)
        #expect(guest.usedIndex == 1)
        #expect(guest.usedElement(0) == (3, 4097))
        #expect(try vq.nextAvailable() == nil)
    }

    @Test func indirectTables() throws {
        let guest = GuestRing()
        let header = guest.allocate(16), data = guest.allocate(512), status = guest.allocate(1)
        let table = GuestRing.indirectOffset
        guest.setDescriptor(0, address: guest.guestPhysical(header), length: 16, flags: 1, next: 1, tableOffset: table)
        guest.setDescriptor(1, address: guest.guestPhysical(data), length: 512, flags: 1, next: 2, tableOffset: table)
        guest.setDescriptor(2, address: guest.guestPhysical(status), length: 1, flags: 2, tableOffset: table)
        guest.setDescriptor(5, address: guest.guestPhysical(table), length: 48, flags: 4)
        guest.publish(5)
        let vq = try queue(guest)
        let chain = try vq.chain(head: try #require(try vq.nextAvailable()))
        #expect(chain.readable.map(\.count) == [16, 512] && chain.writable.map(\.count) == [1])
        // Not negotiated: refused.
        let plain = try queue(guest, indirect: false)
        #expect(throws: VirtqueueError.indirectNotNegotiated) { try plain.chain(head: 5) }
        // Nested indirect, indirect with NEXT, a table of bad length.
        guest.setDescriptor(0, address: guest.guestPhysical(table), length: 48, flags: 4, tableOffset: table)
        #expect(throws: VirtqueueError.nestedIndirect) { try vq.chain(head: 5) }
        guest.setDescriptor(5, address: guest.guestPhysical(table), length: 48, flags: 4 | 1, next: 6)
        #expect(throws: VirtqueueError.indirectWithNext) { try vq.chain(head: 5) }
        guest.setDescriptor(5, address: guest.guestPhysical(table), length: 40, flags: 4)
        #expect(throws: VirtqueueError.badIndirectLength(40)) { try vq.chain(head: 5) }
        guest.setDescriptor(5, address: 0xdead_0000_0000, length: 48, flags: 4)
        #expect(throws: VirtqueueError.bufferOutsideMemory(address: 0xdead_0000_0000, length: 48)) { try vq.chain(head: 5) }
    }

    @Test func loopsAndBadIndexesAreRefused() throws {
        let guest = GuestRing()
        let buffer = guest.allocate(64)
        let vq = try queue(guest)
        // 0 -> 1 -> 0: a loop, found once the chain is longer than the queue.
        guest.setDescriptor(0, address: guest.guestPhysical(buffer), length: 8, flags: 1, next: 1)
        guest.setDescriptor(1, address: guest.guestPhysical(buffer), length: 8, flags: 1, next: 0)
        #expect(throws: VirtqueueError.chainTooLong) { try vq.chain(head: 0) }
        // A self-loop in an indirect table.
        let table = GuestRing.indirectOffset
        guest.setDescriptor(0, address: guest.guestPhysical(buffer), length: 8, flags: 1, next: 0, tableOffset: table)
        guest.setDescriptor(2, address: guest.guestPhysical(table), length: 32, flags: 4)
        #expect(throws: VirtqueueError.chainTooLong) { try vq.chain(head: 2) }
        // next beyond the table.
        guest.setDescriptor(0, address: guest.guestPhysical(buffer), length: 8, flags: 1, next: 16)
        #expect(throws: VirtqueueError.descriptorIndexOutOfRange(16)) { try vq.chain(head: 0) }
        // A readable buffer after a writable one.
        guest.setDescriptor(0, address: guest.guestPhysical(buffer), length: 8, flags: 2 | 1, next: 1)
        guest.setDescriptor(1, address: guest.guestPhysical(buffer), length: 8, flags: 0)
        #expect(throws: VirtqueueError.readableAfterWritable) { try vq.chain(head: 0) }
        // A buffer outside guest memory, and one whose end wraps past 2^64.
        guest.setDescriptor(0, address: UInt64.max - 3, length: 8, flags: 0)
        #expect(throws: VirtqueueError.bufferOutsideMemory(address: UInt64.max - 3, length: 8)) { try vq.chain(head: 0) }
        // A head out of range in the available ring.
        guest.publish(40)
        #expect(throws: VirtqueueError.descriptorIndexOutOfRange(40)) { try vq.nextAvailable() }
    }

    @Test func availableIndexMayNotRunAheadByMoreThanTheQueue() throws {
        let guest = GuestRing()
        let vq = try queue(guest)
        guest.availableIndex = 17
        #expect(throws: VirtqueueError.availableIndexJumped(from: 0, to: 17)) { try vq.nextAvailable() }
        guest.availableIndex = 16
        #expect(try vq.nextAvailable() == 0)
    }

    @Test func ringPlacementIsChecked() throws {
        let guest = GuestRing()
        var addresses = guest.addresses
        addresses.usedRing = GuestRing.userBase + UInt64(GuestRing.bytes) - 8
        #expect(throws: VirtqueueError.ringOutsideMemory) {
            try SplitVirtqueue(size: 16, addresses: addresses, memory: guest.table, lastAvailableIndex: 0, eventIndex: false, indirectDescriptors: false)
        }
        addresses = guest.addresses
        addresses.descriptorTable += 8
        #expect(throws: VirtqueueError.misaligned) {
            try SplitVirtqueue(size: 16, addresses: addresses, memory: guest.table, lastAvailableIndex: 0, eventIndex: false, indirectDescriptors: false)
        }
        #expect(throws: VirtqueueError.badSize(24)) {
            try SplitVirtqueue(size: 24, addresses: guest.addresses, memory: guest.table, lastAvailableIndex: 0, eventIndex: false, indirectDescriptors: false)
        }
    }

    @Test func notificationsFollowTheDriversWishes() throws {
        let guest = GuestRing()
        let vq = try queue(guest)
        for i in 0..<3 { guest.blockRequest(type: 4, sector: 0, firstDescriptor: 2 * i) }
        // Without EVENT_IDX: NO_INTERRUPT suppresses.
        _ = try vq.nextAvailable(); vq.complete(head: 0, writtenBytes: 1)
        #expect(vq.shouldNotify())
        guest.availableFlags = 1
        _ = try vq.nextAvailable(); vq.complete(head: 2, writtenBytes: 1)
        #expect(!vq.shouldNotify())

        // With EVENT_IDX: notify only when used_event falls in (old, new].
        let guest2 = GuestRing()
        let ev = try queue(guest2, eventIndex: true)
        for i in 0..<4 { guest2.blockRequest(type: 4, sector: 0, firstDescriptor: 2 * i) }
        guest2.usedEvent = 2
        _ = try ev.nextAvailable(); ev.complete(head: 0, writtenBytes: 1)
        #expect(ev.shouldNotify())           // the first completion always signals
        _ = try ev.nextAvailable(); ev.complete(head: 2, writtenBytes: 1)
        #expect(!ev.shouldNotify())          // used 1 -> 2: the driver asked for an interrupt after entry 2
        _ = try ev.nextAvailable(); ev.complete(head: 4, writtenBytes: 1)
        #expect(ev.shouldNotify())           // used 2 -> 3 covers used_event 2
        // Before sleeping, the device publishes avail_event and sees the pending fourth request.
        #expect(!ev.armKickAndCheckEmpty())
        #expect(guest2.availableEvent == 3)
        _ = try ev.nextAvailable()
        #expect(ev.armKickAndCheckEmpty())
    }

    @Test func needsEventWrapsAround() {
        #expect(SplitVirtqueue.needsEvent(eventIndex: 0xffff, new: 1, old: 0xfffe))
        #expect(!SplitVirtqueue.needsEvent(eventIndex: 5, new: 5, old: 5))
        #expect(SplitVirtqueue.needsEvent(eventIndex: 4, new: 5, old: 4))
        #expect(!SplitVirtqueue.needsEvent(eventIndex: 6, new: 5, old: 4))
    }

    /// A restarted back end resumes from the used index when the front end's base is ahead of it
    /// (requests taken before the restart but never completed are served again).
    @Test func resumesFromTheUsedIndex() throws {
        let guest = GuestRing()
        for i in 0..<2 { guest.blockRequest(type: 4, sector: 0, firstDescriptor: 2 * i) }
        let first = try queue(guest)
        _ = try first.nextAvailable(); first.complete(head: 0, writtenBytes: 1)
        _ = try first.nextAvailable()   // taken, never completed
        let second = try queue(guest, base: first.lastAvailableIndex)
        #expect(second.lastAvailableIndex == 1)
        #expect(try second.nextAvailable() == 2)
    }

    /// The 16-bit ring indexes wrap: 70000 requests through a 4-entry queue, with EVENT_IDX.
    @Test func indexesWrapAround() throws {
        let guest = GuestRing(queueSize: 4)
        let buffer = guest.allocate(16)
        for d in 0..<4 { guest.setDescriptor(d, address: guest.guestPhysical(buffer), length: 16, flags: 2) }
        let vq = try queue(guest, eventIndex: true)
        var notified = 0
        for i in 0..<70_000 {
            guest.usedEvent = UInt16(truncatingIfNeeded: i)   // the driver wants every completion
            guest.publish(UInt16(i % 4))
            let head = try #require(try vq.nextAvailable())
            #expect(head == UInt16(i % 4))
            vq.complete(head: head, writtenBytes: 16)
            if vq.shouldNotify() { notified += 1 }
            #expect(vq.armKickAndCheckEmpty())
        }
        #expect(guest.usedIndex == UInt16(truncatingIfNeeded: 70_000))
        #expect(guest.availableEvent == UInt16(truncatingIfNeeded: 70_000))
        #expect(notified == 70_000)
    }
}
