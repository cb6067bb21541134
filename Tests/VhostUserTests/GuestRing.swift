import CVBDSys
import Foundation
@testable import VhostUser

#if canImport(Glibc)
import Glibc
#endif

/// A guest's side of one split virtqueue, laid out in memory the test owns (plain memory, or a
/// memfd shared with a vhost-user back end): the test plays the virtio driver.
final class GuestRing: @unchecked Sendable {
    static let bytes = 1 << 20
    static let guestPhysicalBase: UInt64 = 0x10_0000
    static let userBase: UInt64 = 0x7f12_0000_0000
    static let descriptorOffset = 0x0, availableOffset = 0x1000, usedOffset = 0x2000, indirectOffset = 0x3000
    static let dataOffset = 0x10000

    let base: UnsafeMutableRawPointer
    let queueSize: UInt32
    let memfd: Int32
    private var nextData = GuestRing.dataOffset

    /// With `shared`, the memory is a memfd mapped MAP_SHARED (pass `memfd` to the back end).
    init(queueSize: UInt32 = 16, shared: Bool = false) {
        self.queueSize = queueSize
        if shared {
            memfd = vbd_memfd_create("guest-ring")
            precondition(memfd >= 0 && ftruncate(memfd, off_t(Self.bytes)) == 0 && vbd_seal_size(memfd) == 0)
            base = mmap(nil, Self.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0)!
        } else {
            memfd = -1
            base = UnsafeMutableRawPointer.allocate(byteCount: Self.bytes, alignment: 4096)
            base.initializeMemory(as: UInt8.self, repeating: 0, count: Self.bytes)
        }
    }

    deinit {
        if memfd >= 0 { munmap(base, Self.bytes); close(memfd) } else { base.deallocate() }
    }

    var table: GuestMemoryTable {
        GuestMemoryTable(regions: [.init(guestPhysicalAddress: Self.guestPhysicalBase, userAddress: Self.userBase,
                                         size: UInt64(Self.bytes), base: base)])
    }
    var region: VhostUserMemoryRegion {
        VhostUserMemoryRegion(guestPhysicalAddress: Self.guestPhysicalBase, size: UInt64(Self.bytes), userAddress: Self.userBase, mmapOffset: 0)
    }
    var addresses: SplitVirtqueue.Addresses {
        .init(descriptorTable: Self.userBase + UInt64(Self.descriptorOffset), availableRing: Self.userBase + UInt64(Self.availableOffset),
              usedRing: Self.userBase + UInt64(Self.usedOffset))
    }

    func guestPhysical(_ offset: Int) -> UInt64 { Self.guestPhysicalBase + UInt64(offset) }

    /// Reserves `count` bytes of buffer space (16-byte aligned) and returns its offset.
    func allocate(_ count: Int, fill: UInt8 = 0) -> Int {
        let offset = nextData
        nextData += (count + 15) & ~15
        precondition(nextData <= Self.bytes)
        (base + offset).initializeMemory(as: UInt8.self, repeating: fill, count: count)
        return offset
    }

    func setDescriptor(_ index: Int, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0,
                       tableOffset: Int = GuestRing.descriptorOffset) {
        let entry = base + tableOffset + 16 * index
        entry.storeBytes(of: address.littleEndian, as: UInt64.self)
        (entry + 8).storeBytes(of: length.littleEndian, as: UInt32.self)
        (entry + 12).storeBytes(of: flags.littleEndian, as: UInt16.self)
        (entry + 14).storeBytes(of: next.littleEndian, as: UInt16.self)
    }

    var availableIndex: UInt16 {
        get { (base + Self.availableOffset + 2).load(as: UInt16.self) }
        set { vbd_store_release_u16(base + Self.availableOffset + 2, newValue) }
    }

    /// Makes `head` available (the entry first, then the index, as a driver must).
    func publish(_ head: UInt16) {
        let index = availableIndex
        (base + Self.availableOffset + 4 + 2 * Int(index % UInt16(queueSize))).storeBytes(of: head, as: UInt16.self)
        availableIndex = index &+ 1
    }

    var availableFlags: UInt16 {
        get { (base + Self.availableOffset).load(as: UInt16.self) }
        set { (base + Self.availableOffset).storeBytes(of: newValue, as: UInt16.self) }
    }
    var usedEvent: UInt16 {
        get { (base + Self.availableOffset + 4 + 2 * Int(queueSize)).load(as: UInt16.self) }
        set { (base + Self.availableOffset + 4 + 2 * Int(queueSize)).storeBytes(of: newValue, as: UInt16.self) }
    }
    var availableEvent: UInt16 { vbd_load_acquire_u16(base + Self.usedOffset + 4 + 8 * Int(queueSize)) }
    var usedIndex: UInt16 { vbd_load_acquire_u16(base + Self.usedOffset + 2) }
    func usedElement(_ i: UInt16) -> (id: UInt32, length: UInt32) {
        let e = base + Self.usedOffset + 4 + 8 * Int(i % UInt16(queueSize))
        return (e.load(as: UInt32.self), (e + 4).load(as: UInt32.self))
    }

    func bytes(at offset: Int, count: Int) -> [UInt8] { Array(UnsafeRawBufferPointer(start: base + offset, count: count)) }
    func write(_ bytes: [UInt8], at offset: Int) { bytes.withUnsafeBytes { (base + offset).copyMemory(from: $0.baseAddress!, byteCount: $0.count) } }

    /// A virtio-blk request as Linux lays it out: header, data descriptors, status; descriptors from
    /// `firstDescriptor` on. Returns the head and where the status byte and the data are.
    @discardableResult
    func blockRequest(type: UInt32, sector: UInt64, data: [UInt8] = [], readLength: Int = 0, firstDescriptor: Int = 0,
                      publish: Bool = true) -> (head: UInt16, status: Int, data: Int) {
        var header = ByteWriter()
        header.u32(type); header.u32(0); header.u64(sector)
        let headerAt = allocate(16)
        write(header.bytes, at: headerAt)
        let statusAt = allocate(1, fill: 0xee)
        var d = firstDescriptor
        setDescriptor(d, address: guestPhysical(headerAt), length: 16, flags: 1, next: UInt16(d + 1)); d += 1
        var dataAt = 0
        if !data.isEmpty {
            dataAt = allocate(data.count)
            write(data, at: dataAt)
            setDescriptor(d, address: guestPhysical(dataAt), length: UInt32(data.count), flags: 1, next: UInt16(d + 1)); d += 1
        } else if readLength > 0 {
            dataAt = allocate(readLength, fill: 0xcc)
            setDescriptor(d, address: guestPhysical(dataAt), length: UInt32(readLength), flags: 1 | 2, next: UInt16(d + 1)); d += 1
        }
        setDescriptor(d, address: guestPhysical(statusAt), length: 1, flags: 2)
        if publish { self.publish(UInt16(firstDescriptor)) }
        return (UInt16(firstDescriptor), statusAt, dataAt)
    }
}
