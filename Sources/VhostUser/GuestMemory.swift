import CVBDSys
#if canImport(Glibc)
import Glibc
#endif

/// The guest's memory as this process sees it: SET_MEM_TABLE's regions, each mapped here at `base`.
/// Descriptors carry guest-physical addresses; SET_VRING_ADDR carries the front end's (QEMU's)
/// virtual addresses. Both translate to a pointer only when the whole range lies inside one
/// region, checked without overflow (every address and length comes from the guest or the front end).
public struct GuestMemoryTable: @unchecked Sendable {
    public struct Region: @unchecked Sendable {
        public var guestPhysicalAddress: UInt64
        public var userAddress: UInt64
        public var size: UInt64
        public var base: UnsafeMutableRawPointer
        public init(guestPhysicalAddress: UInt64, userAddress: UInt64, size: UInt64, base: UnsafeMutableRawPointer) {
            self.guestPhysicalAddress = guestPhysicalAddress
            self.userAddress = userAddress
            self.size = size
            self.base = base
        }
    }

    public private(set) var regions: [Region]

    public init(regions: [Region]) { self.regions = regions }

    /// The pointer to guest-physical `[address, address + length)`, or nil when any byte of it is
    /// outside every region or the range spans two regions.
    public func pointer(guestPhysical address: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        for region in regions {
            if let offset = Self.offset(of: address, length: length, inRegionAt: region.guestPhysicalAddress, size: region.size) {
                return region.base + Int(offset)
            }
        }
        return nil
    }

    /// As ``pointer(guestPhysical:length:)`` for the front end's virtual addresses (ring addresses).
    public func pointer(userAddress address: UInt64, length: UInt64) -> UnsafeMutableRawPointer? {
        for region in regions {
            if let offset = Self.offset(of: address, length: length, inRegionAt: region.userAddress, size: region.size) {
                return region.base + Int(offset)
            }
        }
        return nil
    }

    /// `address - start` when `[address, address + length)` lies in `[start, start + size)`.
    /// Written as subtractions that cannot wrap: `address + length` may exceed 2^64.
    static func offset(of address: UInt64, length: UInt64, inRegionAt start: UInt64, size: UInt64) -> UInt64? {
        guard address >= start else { return nil }
        let offset = address - start
        guard offset <= size, length <= size - offset else { return nil }
        // A zero-length range at the very end is outside the region: there is no byte to point at.
        guard offset < size || length > 0 else { return nil }
        return offset
    }
}

/// The regions of one SET_MEM_TABLE mapped MAP_SHARED from the front end's file descriptors;
/// unmapped when released (the front end sends a new table, or disconnects).
public final class MappedGuestMemory: @unchecked Sendable {
    public let table: GuestMemoryTable
    private var mappings: [(address: UnsafeMutableRawPointer, length: Int)]

    /// Maps each region `size + mmapOffset` bytes from offset 0 of its fd (the offset need not be
    /// page aligned; libvhost-user maps the same way). Closes nothing: the caller owns the fds.
    public init(regions: [VhostUserMemoryRegion], fileDescriptors: [Int32]) throws(VhostUserProtocolError) {
        precondition(regions.count == fileDescriptors.count)
        var mapped: [Region] = []
        var mappings: [(UnsafeMutableRawPointer, Int)] = []
        typealias Region = GuestMemoryTable.Region
        for (region, fd) in zip(regions, fileDescriptors) {
            let (total, overflow) = region.size.addingReportingOverflow(region.mmapOffset)
            guard !overflow, total <= UInt64(Int.max) else {
                for (a, l) in mappings { munmap(a, l) }
                throw .invalid(request: .setMemTable, detail: "region of size \(region.size) at offset \(region.mmapOffset) is too large")
            }
            // A mapping past the end of the file, or of a file the front end can shrink later,
            // faults with SIGBUS on access and would take the whole server down: only memfds
            // sealed against shrinking (QEMU's memory-backend-memfd, seal=on by default) that
            // hold the whole region are mapped.
            var status = stat()
            guard fstat(fd, &status) == 0, status.st_size >= 0, UInt64(status.st_size) >= total else {
                for (a, l) in mappings { munmap(a, l) }
                throw .invalid(request: .setMemTable, detail: "the memory fd holds fewer than the \(total) bytes its region needs")
            }
            guard vbd_sealed_against_shrinking(fd) == 1 else {
                for (a, l) in mappings { munmap(a, l) }
                throw .invalid(request: .setMemTable, detail: "guest memory must be a memfd sealed against shrinking (memory-backend-memfd with seal=on)")
            }
            let address = mmap(nil, Int(total), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
            guard let address, address != MAP_FAILED else {
                let reason = String(cString: strerror(errno))
                for (a, l) in mappings { munmap(a, l) }
                throw .invalid(request: .setMemTable, detail: "mmap of \(total) bytes failed: \(reason)")
            }
            mappings.append((address, Int(total)))
            mapped.append(Region(guestPhysicalAddress: region.guestPhysicalAddress, userAddress: region.userAddress,
                                 size: region.size, base: address + Int(region.mmapOffset)))
        }
        self.table = GuestMemoryTable(regions: mapped)
        self.mappings = mappings
    }

    deinit {
        for (address, length) in mappings { munmap(address, length) }
    }
}

extension GuestMemoryTable {
    /// Guest-physical `[address, address + length)` as pointers, split where it crosses from one
    /// region into the next (guest RAM is often two regions, below and above a PCI hole); nil when
    /// any byte is unmapped.
    public func buffers(guestPhysical address: UInt64, length: UInt64) -> [UnsafeMutableRawBufferPointer]? {
        var result: [UnsafeMutableRawBufferPointer] = []
        var address = address, remaining = length
        while remaining > 0 {
            guard let region = regions.first(where: { address >= $0.guestPhysicalAddress && address - $0.guestPhysicalAddress < $0.size }) else {
                return nil
            }
            let offset = address - region.guestPhysicalAddress
            let take = min(remaining, region.size - offset)
            guard take <= UInt64(Int.max) else { return nil }
            result.append(UnsafeMutableRawBufferPointer(start: region.base + Int(offset), count: Int(take)))
            remaining -= take
            let (next, overflow) = address.addingReportingOverflow(take)
            if overflow && remaining > 0 { return nil }
            address = next
        }
        return result
    }
}
