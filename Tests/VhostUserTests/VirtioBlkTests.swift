import CVBDSys
import Foundation
import Synchronization
import Testing
import VBDAccounting
import VBDCore
import VBDStore
@testable import VhostUser

/// A fresh store with one volume (1 MiB, 4 KiB blocks) and a snapshot of it, in a temporary directory.
final class ScratchStore {
    let directory: URL
    let store: Store

    init(blockSize: Int = 4096) throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("vbd-vhost-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        store = try Store.initialize(path: directory.appendingPathComponent("store").path)
        try store.createVolume(name: "vol", size: 1 << 20, blockSize: blockSize)
    }

    deinit {
        try? store.close()
        try? FileManager.default.removeItem(at: directory)
    }
}

@Suite struct VirtioBlkTests {
    func serve(_ guest: GuestRing, _ handler: VirtioBlkRequestHandler) throws -> UInt32? {
        let vq = try SplitVirtqueue(size: guest.queueSize, addresses: guest.addresses, memory: guest.table,
                                    lastAvailableIndex: guest.usedIndex, eventIndex: false, indirectDescriptors: true)
        let head = try #require(try vq.nextAvailable())
        let written = handler.handle(try vq.chain(head: head))
        vq.complete(head: head, writtenBytes: written ?? 0)
        return written
    }

    @Test func writeReadFlushAndGetID() throws {
        let scratch = try ScratchStore()
        let handler = VirtioBlkRequestHandler(device: try scratch.store.openExport(named: "vol"))
        let guest = GuestRing()
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        let write = guest.blockRequest(type: 1, sector: 24, data: pattern)
        #expect(try serve(guest, handler) == 1)
        #expect(guest.bytes(at: write.status, count: 1) == [0])
        let read = guest.blockRequest(type: 0, sector: 24, readLength: 8192)
        #expect(try serve(guest, handler) == 8193)
        #expect(guest.bytes(at: read.status, count: 1) == [0])
        #expect(guest.bytes(at: read.data, count: 8192) == pattern)
        // The store has it, at byte 24 * 512.
        var back = [UInt8](repeating: 0, count: 8192)
        try back.withUnsafeMutableBytes { try scratch.store.openExport(named: "vol").read(offset: 24 * 512, into: $0) }
        #expect(back == pattern)
        let flush = guest.blockRequest(type: 4, sector: 0)
        #expect(try serve(guest, handler) == 1 && guest.bytes(at: flush.status, count: 1) == [0])
        let id = guest.blockRequest(type: 8, sector: 0, readLength: 20)
        #expect(try serve(guest, handler) == 21)
        #expect(guest.bytes(at: id.data, count: 20) == Array("vol".utf8) + [UInt8](repeating: 0, count: 17))
    }

    /// A guest may rewrite a buffer while its write runs: the store is handed a private copy, never
    /// guest memory (it hashes, compresses and writes the bytes at different moments).
    @Test func writesReachTheStoreCopiedOutOfGuestMemory() throws {
        let scratch = try ScratchStore()
        let guest = GuestRing()
        let device = WritePointerRecordingDevice(try scratch.store.openExport(named: "vol"))
        let handler = VirtioBlkRequestHandler(device: device)
        let pattern = (0..<(3 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        let write = guest.blockRequest(type: 1, sector: 8, data: Array(pattern.prefix(65536)))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: write.status, count: 1) == [0])
        let guestMemory = UInt(bitPattern: guest.base)..<UInt(bitPattern: guest.base) + UInt(GuestRing.bytes)
        #expect(!device.pointers.isEmpty)
        #expect(device.pointers.allSatisfy { !guestMemory.contains($0) }, "the store was given guest memory")
        var back = [UInt8](repeating: 0, count: 65536)
        try back.withUnsafeMutableBytes { try scratch.store.openExport(named: "vol").read(offset: 8 * 512, into: $0) }
        #expect(back == Array(pattern.prefix(65536)))
    }

    /// Mapping memory the front end can shrink, or past the end of its fd, would fault (SIGBUS)
    /// on access and take the server down: such a table is refused.
    @Test func memoryThatCanShrinkOrIsTooShortIsNotMapped() throws {
        let region = VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 1 << 20, userAddress: 0x7f00_0000_0000, mmapOffset: 0)
        let unsealed = vbd_memfd_create("unsealed")
        defer { close(unsealed) }
        #expect(ftruncate(unsealed, 1 << 20) == 0)
        #expect(throws: VhostUserProtocolError.self) { try MappedGuestMemory(regions: [region], fileDescriptors: [unsealed]) }
        let short = vbd_memfd_create("short")
        defer { close(short) }
        #expect(ftruncate(short, 4096) == 0 && vbd_seal_size(short) == 0)
        #expect(throws: VhostUserProtocolError.self) { try MappedGuestMemory(regions: [region], fileDescriptors: [short]) }
        let offset = VhostUserMemoryRegion(guestPhysicalAddress: 0, size: 4096, userAddress: 0x7f00_0000_0000, mmapOffset: 4096)
        #expect(throws: VhostUserProtocolError.self) { try MappedGuestMemory(regions: [offset], fileDescriptors: [short]) }
        let sealed = vbd_memfd_create("sealed")
        defer { close(sealed) }
        #expect(ftruncate(sealed, 1 << 20) == 0 && vbd_seal_size(sealed) == 0)
        let mapped = try MappedGuestMemory(regions: [region], fileDescriptors: [sealed])
        #expect(mapped.table.pointer(guestPhysical: 0, length: 4096) != nil)
    }

    /// Data spread over several descriptors, and a header sharing its descriptor with the data
    /// (virtio 1.x lets the driver frame a request any way it likes).
    @Test func scatteredBuffersAndAnyLayout() throws {
        let scratch = try ScratchStore()
        let handler = VirtioBlkRequestHandler(device: try scratch.store.openExport(named: "vol"))
        let guest = GuestRing()
        let pattern = (0..<6144).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        var header = ByteWriter()
        header.u32(1); header.u32(0); header.u64(100)
        // Header and the first 512 data bytes in one descriptor, then 1024 + 4608 bytes, then the status.
        let first = guest.allocate(16 + 512), second = guest.allocate(1024), third = guest.allocate(4608), status = guest.allocate(1)
        guest.write(header.bytes + pattern[0..<512], at: first)
        guest.write(Array(pattern[512..<1536]), at: second)
        guest.write(Array(pattern[1536...]), at: third)
        guest.setDescriptor(0, address: guest.guestPhysical(first), length: 16 + 512, flags: 1, next: 1)
        guest.setDescriptor(1, address: guest.guestPhysical(second), length: 1024, flags: 1, next: 2)
        guest.setDescriptor(2, address: guest.guestPhysical(third), length: 4608, flags: 1, next: 3)
        guest.setDescriptor(3, address: guest.guestPhysical(status), length: 1, flags: 2)
        guest.publish(0)
        #expect(try serve(guest, handler) == 1)
        #expect(guest.bytes(at: status, count: 1) == [0])
        // Read it back into two buffers, the second sharing its descriptor with the status byte.
        var readHeader = ByteWriter()
        readHeader.u32(0); readHeader.u32(0); readHeader.u64(100)
        let h = guest.allocate(16), a = guest.allocate(2048), b = guest.allocate(4096 + 1, fill: 0xee)
        guest.write(readHeader.bytes, at: h)
        guest.setDescriptor(4, address: guest.guestPhysical(h), length: 16, flags: 1, next: 5)
        guest.setDescriptor(5, address: guest.guestPhysical(a), length: 2048, flags: 1 | 2, next: 6)
        guest.setDescriptor(6, address: guest.guestPhysical(b), length: 4096 + 1, flags: 2)
        guest.publish(4)
        #expect(try serve(guest, handler) == 6145)
        #expect(guest.bytes(at: a, count: 2048) + guest.bytes(at: b, count: 4096) == pattern)
        #expect(guest.bytes(at: b + 4096, count: 1) == [0])
    }

    @Test func boundsAndMalformedRequests() throws {
        let scratch = try ScratchStore()
        let handler = VirtioBlkRequestHandler(device: try scratch.store.openExport(named: "vol"))
        let guest = GuestRing()
        // The last sector is fine, one past it is not; nor is a sector count that wraps.
        let last = guest.blockRequest(type: 0, sector: 2047, readLength: 512)
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: last.status, count: 1) == [0])
        let past = guest.blockRequest(type: 0, sector: 2047, readLength: 1024)
        #expect(try serve(guest, handler) == 1)   // nothing read, only the status
        #expect(guest.bytes(at: past.status, count: 1) == [1])
        let wrap = guest.blockRequest(type: 1, sector: UInt64.max, data: [UInt8](repeating: 1, count: 512))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: wrap.status, count: 1) == [1])
        let partial = guest.blockRequest(type: 1, sector: 0, data: [UInt8](repeating: 1, count: 100))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: partial.status, count: 1) == [1])
        let unknown = guest.blockRequest(type: 99, sector: 0)
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: unknown.status, count: 1) == [2])
        // A request without any writable byte cannot be answered.
        let header = guest.allocate(16)
        guest.setDescriptor(0, address: guest.guestPhysical(header), length: 16, flags: 0)
        guest.publish(0)
        #expect(try serve(guest, handler) == nil)
    }

    func rangeSegments(_ ranges: [(UInt64, UInt32, UInt32)]) -> [UInt8] {
        var w = ByteWriter()
        for (sector, count, flags) in ranges { w.u64(sector); w.u32(count); w.u32(flags) }
        return w.bytes
    }

    @Test func discardAndWriteZeroes() throws {
        let scratch = try ScratchStore()
        let device = try scratch.store.openExport(named: "vol")
        let handler = VirtioBlkRequestHandler(device: device)
        try [UInt8](repeating: 0xab, count: 65536).withUnsafeBytes { try device.write(offset: 0, data: $0, fua: false) }
        let guest = GuestRing()
        let zero = guest.blockRequest(type: 13, sector: 0, data: rangeSegments([(0, 8, 1), (16, 8, 0)]))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: zero.status, count: 1) == [0])
        let discard = guest.blockRequest(type: 11, sector: 0, data: rangeSegments([(32, 16, 0)]))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: discard.status, count: 1) == [0])
        var back = [UInt8](repeating: 0xff, count: 65536)
        try back.withUnsafeMutableBytes { try device.read(offset: 0, into: $0) }
        #expect(back[0..<4096].allSatisfy { $0 == 0 } && back[4096..<8192].allSatisfy { $0 == 0xab })
        #expect(back[8192..<12288].allSatisfy { $0 == 0 } && back[16384..<24576].allSatisfy { $0 == 0 })
        #expect(back[24576...].allSatisfy { $0 == 0xab })
        // DISCARD with the unmap flag, unknown flags: UNSUPP; too many segments, out of range, ragged: IOERR.
        let unmap = guest.blockRequest(type: 11, sector: 0, data: rangeSegments([(0, 8, 1)]))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: unmap.status, count: 1) == [2])
        let flags = guest.blockRequest(type: 13, sector: 0, data: rangeSegments([(0, 8, 4)]))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: flags.status, count: 1) == [2])
        let many = guest.blockRequest(type: 13, sector: 0, data: rangeSegments(Array(repeating: (0, 8, 0), count: 33)))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: many.status, count: 1) == [1])
        let outside = guest.blockRequest(type: 11, sector: 2040, data: rangeSegments([(2040, 16, 0)]))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: outside.status, count: 1) == [1])
        let ragged = guest.blockRequest(type: 11, sector: 0, data: Array(rangeSegments([(0, 8, 0)]).prefix(12)))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: ragged.status, count: 1) == [1])
    }

    @Test func snapshotsAreReadOnly() throws {
        let scratch = try ScratchStore()
        try [UInt8](repeating: 0x5a, count: 4096).withUnsafeBytes { try scratch.store.openExport(named: "vol").write(offset: 0, data: $0, fua: false) }
        try scratch.store.snapshot(volume: "vol", name: "s1")
        let handler = VirtioBlkRequestHandler(device: try scratch.store.openExport(named: "vol@s1"))
        #expect(handler.features & VirtioBlk.Feature.readOnly != 0)
        let guest = GuestRing()
        let write = guest.blockRequest(type: 1, sector: 0, data: [UInt8](repeating: 1, count: 512))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: write.status, count: 1) == [1])
        let zero = guest.blockRequest(type: 13, sector: 0, data: rangeSegments([(0, 8, 0)]))
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: zero.status, count: 1) == [1])
        let read = guest.blockRequest(type: 0, sector: 0, readLength: 4096)
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: read.status, count: 1) == [0] && guest.bytes(at: read.data, count: 4096) == [UInt8](repeating: 0x5a, count: 4096))
    }

    @Test func configLayout() throws {
        let scratch = try ScratchStore(blockSize: 65536)
        let handler = VirtioBlkRequestHandler(device: try scratch.store.openExport(named: "vol"))
        let bytes = handler.config(queueCount: 2).encoded()
        #expect(bytes.count == 60)
        func u32(_ at: Int) -> UInt32 { bytes[at..<at + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        #expect(bytes[0..<8] == [0x00, 0x08, 0, 0, 0, 0, 0, 0])   // 2048 sectors
        #expect(u32(12) == 126)                                      // seg_max
        #expect(u32(20) == 4096)                                     // blk_size: a page at most
        #expect(bytes[24] == 4 && bytes[26] == 16 && u32(28) == 16)  // 64 KiB physical blocks
        #expect(bytes[34] == 2)                                      // num_queues
        #expect(u32(36) == 1 << 22 && u32(40) == 32 && u32(44) == 128)
        #expect(u32(48) == 1 << 22 && u32(52) == 32 && bytes[56] == 1)
    }
}

/// Records where the data of each write it forwards lives.
final class WritePointerRecordingDevice: ForwardingBlockDevice, @unchecked Sendable {
    let inner: any BlockDevice
    private let recorded = Mutex<[UInt]>([])
    var pointers: [UInt] { recorded.withLock { $0 } }

    init(_ inner: any BlockDevice) { self.inner = inner }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        try inner.read(offset: offset, into: buffer)
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        recorded.withLock { $0.append(UInt(bitPattern: data.baseAddress)) }
        try inner.write(offset: offset, data: data, fua: fua)
    }
}

extension VirtioBlkTests {
    /// The capacity is read from the device once, not per request (a store lookup by name), and
    /// again only for a request beyond it: a volume that grew while served is served up to its
    /// new end, and a request past that still fails.
    @Test func theCapacityIsReadAgainOnlyBeyondWhatWasKnown() throws {
        let scratch = try ScratchStore()   // 1 MiB: 2048 sectors
        let device = SizeCountingDevice(try scratch.store.openExport(named: "vol"))
        let handler = VirtioBlkRequestHandler(device: device)
        let readsAtStart = device.sizeReads
        let guest = GuestRing()
        for i in 0..<8 {
            let read = guest.blockRequest(type: 0, sector: UInt64(i) * 8, readLength: 4096)
            _ = try serve(guest, handler)
            #expect(guest.bytes(at: read.status, count: 1) == [0])
        }
        #expect(device.sizeReads == readsAtStart)
        try scratch.store.resize(volume: "vol", size: 2 << 20)
        let grown = guest.blockRequest(type: 0, sector: 2048, readLength: 4096)
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: grown.status, count: 1) == [0])
        let past = guest.blockRequest(type: 0, sector: 4096, readLength: 512)
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: past.status, count: 1) == [1])
    }

    /// With a scheduler attached to the request layer every read and write waits for its device
    /// slot there (the door skips the wait only when nothing is scheduled).
    @Test func requestsWaitForTheSchedulersSlotWhenOneIsAttached() throws {
        let scratch = try ScratchStore()
        let device = try scratch.store.openExport(named: "vol")
        let pipeline = RequestPipeline(tenancy: try TenancyService(configuration: .init()))
        guard case .success(let session) = pipeline.admit(device: device, identity: .unauthenticated, door: .vhostUserBlk) else {
            Issue.record("not admitted"); return
        }
        let handler = VirtioBlkRequestHandler(device: device, session: session)
        let guest = GuestRing()
        let unscheduled = guest.blockRequest(type: 0, sector: 0, readLength: 4096)
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: unscheduled.status, count: 1) == [0])
        let scheduler = CountingSlotScheduler()
        pipeline.attachScheduler(scheduler)
        let write = guest.blockRequest(type: 1, sector: 8, data: [UInt8](repeating: 7, count: 4096))
        _ = try serve(guest, handler)
        let read = guest.blockRequest(type: 0, sector: 8, readLength: 4096)
        _ = try serve(guest, handler)
        #expect(guest.bytes(at: write.status, count: 1) == [0] && guest.bytes(at: read.status, count: 1) == [0])
        #expect(guest.bytes(at: read.data, count: 4096) == [UInt8](repeating: 7, count: 4096))
        #expect(scheduler.submitted == 2 && scheduler.running == 0)
    }
}

/// A scheduler that grants every request its slot at once and counts them.
final class CountingSlotScheduler: DeviceSlotScheduler, @unchecked Sendable {
    private let counts = Mutex((submitted: 0, running: 0))
    var submitted: Int { counts.withLock { $0.submitted } }
    var running: Int { counts.withLock { $0.running } }

    func submit(domain: DomainID, cost: Double, pieces: Int,
                start: @escaping @Sendable (_ piece: Int, _ finished: @escaping @Sendable () -> Void) -> Void) throws(SchedulerError) {
        counts.withLock { $0.submitted += 1; $0.running += 1 }
        start(0) { [self] in counts.withLock { $0.running -= 1 } }
    }
}

/// The store's device, counting how often its size is read.
final class SizeCountingDevice: ForwardingBlockDevice, @unchecked Sendable {
    let inner: any BlockDevice
    private let reads = Mutex(0)
    var sizeReads: Int { reads.withLock { $0 } }

    init(_ inner: any BlockDevice) { self.inner = inner }

    var size: UInt64 {
        reads.withLock { $0 += 1 }
        return inner.size
    }
    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError) {
        try inner.read(offset: offset, into: buffer)
    }
    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError) {
        try inner.write(offset: offset, data: data, fua: fua)
    }
}
