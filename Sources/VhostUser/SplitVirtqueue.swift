import CVBDSys

/// A split virtqueue (virtio 1.2 section 2.7) in guest memory, processed from the device side: the
/// driver (the guest) publishes descriptor chain heads in the available ring; the device walks
/// each chain, does the work and returns the head in the used ring.
///
/// Everything in guest memory is untrusted: indexes are bounds-checked, chains are limited to the
/// queue size (which also ends loops), indirect tables are checked and may not nest, and every
/// buffer address is translated with bounds checks. Index loads acquire and index stores release
/// (C11 atomics in CVBDSys); the notification decision is ordered by a full fence.
///
/// Not thread-safe: one queue worker owns a queue while it runs.
public final class SplitVirtqueue: @unchecked Sendable {
    public struct Addresses: Sendable, Equatable {
        public var descriptorTable: UInt64
        public var availableRing: UInt64
        public var usedRing: UInt64
        public init(descriptorTable: UInt64, availableRing: UInt64, usedRing: UInt64) {
            self.descriptorTable = descriptorTable
            self.availableRing = availableRing
            self.usedRing = usedRing
        }
    }

    public let size: UInt32
    public let eventIndex: Bool
    public let indirectDescriptors: Bool
    private let memory: GuestMemoryTable
    private let descriptors: UnsafeMutableRawPointer
    private let available: UnsafeMutableRawPointer
    private let used: UnsafeMutableRawPointer
    /// The next available-ring entry to take.
    public private(set) var lastAvailableIndex: UInt16
    /// The next used-ring entry to fill (published to the guest when written).
    public private(set) var usedIndex: UInt16
    /// The used index at the last notification; nil until the first (then notify unconditionally).
    private var signalledUsedIndex: UInt16?
    /// Inflight I/O tracking (INFLIGHT_SHMFD), when the front end set up a region for this queue.
    public let inflight: InflightQueueRegion?
    /// Heads a previous back end had taken and not completed, newest first (taken from the end).
    private var resubmit: [UInt16] = []
    /// The inflight counter the next head taken from the available ring gets.
    private var inflightCounter: UInt64 = 1

    static let descriptorBytes = 16
    static let flagNext: UInt16 = 1
    static let flagWrite: UInt16 = 2
    static let flagIndirect: UInt16 = 4
    static let availableFlagNoInterrupt: UInt16 = 1

    /// Places the rings at `addresses` (the front end's virtual addresses, as SET_VRING_ADDR gives
    /// them) and checks that each lies wholly in mapped memory with the alignment the spec requires.
    /// `usedIndex` is read from the ring; when it is behind `lastAvailableIndex` (the front end's
    /// SET_VRING_BASE) the device restarts from it: requests taken but never completed are taken
    /// again (right for a device that completes in order). With an `inflight` region the region
    /// decides instead: the heads it holds in flight are served first, in the order they were
    /// taken, and the available ring resumes after the used ones and those.
    public init(size: UInt32, addresses: Addresses, memory: GuestMemoryTable, lastAvailableIndex: UInt16,
                eventIndex: Bool, indirectDescriptors: Bool, inflight: InflightQueueRegion? = nil) throws(VirtqueueError) {
        guard size > 0, size <= VhostUserLimits.queueSizeMax, size & (size - 1) == 0 else { throw .badSize(size) }
        let n = UInt64(size)
        let tableBytes = 16 * n
        let availableBytes = 4 + 2 * n + 2   // flags, idx, ring, used_event
        let usedBytes = 4 + 8 * n + 2        // flags, idx, ring, avail_event
        guard let d = memory.pointer(userAddress: addresses.descriptorTable, length: tableBytes),
              let a = memory.pointer(userAddress: addresses.availableRing, length: availableBytes),
              let u = memory.pointer(userAddress: addresses.usedRing, length: usedBytes) else {
            throw .ringOutsideMemory
        }
        guard addresses.descriptorTable % 16 == 0, addresses.availableRing % 2 == 0, addresses.usedRing % 4 == 0 else {
            throw .misaligned
        }
        self.size = size
        self.memory = memory
        self.descriptors = d
        self.available = a
        self.used = u
        self.eventIndex = eventIndex
        self.indirectDescriptors = indirectDescriptors
        let usedNow = vbd_load_acquire_u16(u + 2)
        self.usedIndex = usedNow
        self.inflight = inflight
        if let inflight {
            guard UInt32(inflight.queueSize) == size else {
                throw .inflight(.queueSizeMismatch(region: inflight.queueSize, queue: UInt16(truncatingIfNeeded: size)))
            }
            let recovery: InflightQueueRegion.Recovery
            do { recovery = try inflight.recover(usedIndex: usedNow) } catch { throw .inflight(error) }
            self.resubmit = recovery.resubmit.reversed()
            self.inflightCounter = recovery.nextCounter
            self.lastAvailableIndex = usedNow &+ UInt16(recovery.resubmit.count)
        } else {
            self.lastAvailableIndex = usedNow == lastAvailableIndex ? lastAvailableIndex : usedNow
        }
    }

    /// The used index at the last notification decision (diagnostics).
    var lastNotificationUsedIndex: UInt16? { signalledUsedIndex }

    /// Heads still to be served again from a previous back end's inflight region.
    public var resubmitting: Int { resubmit.count }

    /// The next chain head the guest made available, or nil when there is none.
    public func nextAvailable() throws(VirtqueueError) -> UInt16? {
        if let head = resubmit.popLast() { return head }   // checked against the queue size when found
        let availableIndex = vbd_load_acquire_u16(available + 2)   // pairs with the driver's release of idx
        let pending = availableIndex &- lastAvailableIndex
        guard pending != 0 else { return nil }
        guard UInt32(pending) <= size else { throw .availableIndexJumped(from: lastAvailableIndex, to: availableIndex) }
        let slot = Int(lastAvailableIndex % UInt16(truncatingIfNeeded: size))
        let head = UInt16(littleEndian: (available + 4 + 2 * slot).loadUnaligned(as: UInt16.self))
        guard UInt32(head) < size else { throw .descriptorIndexOutOfRange(head) }
        lastAvailableIndex &+= 1
        if let inflight {
            inflight.taken(head: head, counter: inflightCounter)
            inflightCounter &+= 1
        }
        return head
    }

    /// Whether the guest has made a chain available that ``nextAvailable()`` has not taken yet.
    public var hasAvailable: Bool {
        !resubmit.isEmpty || vbd_load_acquire_u16(available + 2) != lastAvailableIndex
    }

    /// The buffers of the chain starting at `head`: readable ones first, then writable ones.
    public func chain(head: UInt16) throws(VirtqueueError) -> DescriptorChain {
        var chain = DescriptorChain(head: head)
        var table = descriptors
        var tableCount = size
        var index = UInt32(head)
        var visited: UInt32 = 0
        var inIndirect = false
        while true {
            guard index < tableCount else { throw .descriptorIndexOutOfRange(UInt16(truncatingIfNeeded: index)) }
            visited += 1
            // A chain longer than the queue (the table, for an indirect one) has a loop.
            guard visited <= tableCount else { throw .chainTooLong }
            let entry = table + Int(index) * Self.descriptorBytes
            let address = UInt64(littleEndian: entry.loadUnaligned(as: UInt64.self))
            let length = UInt32(littleEndian: (entry + 8).loadUnaligned(as: UInt32.self))
            let flags = UInt16(littleEndian: (entry + 12).loadUnaligned(as: UInt16.self))
            let next = UInt16(littleEndian: (entry + 14).loadUnaligned(as: UInt16.self))
            if flags & Self.flagIndirect != 0 {
                guard indirectDescriptors else { throw .indirectNotNegotiated }
                guard !inIndirect else { throw .nestedIndirect }
                guard flags & Self.flagNext == 0 else { throw .indirectWithNext }
                guard length > 0, length % 16 == 0, length / 16 <= VhostUserLimits.queueSizeMax else {
                    throw .badIndirectLength(length)
                }
                guard let pointer = memory.pointer(guestPhysical: address, length: UInt64(length)) else {
                    throw .bufferOutsideMemory(address: address, length: length)
                }
                table = pointer
                tableCount = length / 16
                index = 0
                visited = 0
                inIndirect = true
                continue
            }
            let writable = flags & Self.flagWrite != 0
            guard writable || chain.writable.isEmpty else { throw .readableAfterWritable }
            if length == 0 {
                // Nothing to read or write (and no buffer: the status byte is the last writable one).
            } else if let pointer = memory.pointer(guestPhysical: address, length: UInt64(length)) {
                // In one region (nearly always): no list of pieces to build.
                let buffer = UnsafeMutableRawBufferPointer(start: pointer, count: Int(length))
                if writable { chain.writable.append(buffer) } else { chain.readable.append(buffer) }
            } else {
                guard let buffers = memory.buffers(guestPhysical: address, length: UInt64(length)) else {
                    throw .bufferOutsideMemory(address: address, length: length)
                }
                if writable { chain.writable += buffers } else { chain.readable += buffers }
            }
            guard flags & Self.flagNext != 0 else { return chain }
            index = UInt32(next)
        }
    }

    /// Returns `head` to the guest with `writtenBytes` written into its writable buffers, and
    /// publishes the new used index (release: the element is visible before the index).
    public func complete(head: UInt16, writtenBytes: UInt32) {
        inflight?.completing(head: head)
        let slot = Int(usedIndex % UInt16(truncatingIfNeeded: size))
        let element = used + 4 + 8 * slot
        element.storeBytes(of: UInt32(head).littleEndian, as: UInt32.self)
        (element + 4).storeBytes(of: writtenBytes.littleEndian, as: UInt32.self)
        usedIndex &+= 1
        vbd_store_release_u16(used + 2, usedIndex.littleEndian)
        inflight?.completed(head: head, usedIndex: usedIndex)
    }

    /// Whether the guest wants an interrupt for what was completed since the last one
    /// (VRING_AVAIL_F_NO_INTERRUPT, or with VIRTIO_F_EVENT_IDX the driver's used_event).
    public func shouldNotify() -> Bool {
        vbd_fence_seq_cst()   // the used index store before the read of the driver's wishes
        defer { signalledUsedIndex = usedIndex }
        if !eventIndex {
            let flags = vbd_load_acquire_u16(available)
            return flags & Self.availableFlagNoInterrupt == 0
        }
        guard let old = signalledUsedIndex else { return true }
        let usedEvent = vbd_load_acquire_u16(available + 4 + 2 * Int(size))
        return Self.needsEvent(eventIndex: usedEvent, new: usedIndex, old: old)
    }

    /// Before sleeping on the kick: with EVENT_IDX, asks the guest to kick when it makes entry
    /// `lastAvailableIndex` available; then tells whether more arrived meanwhile (the caller must
    /// process again rather than sleep, or a kick the guest skipped would be lost).
    public func armKickAndCheckEmpty() -> Bool {
        guard resubmit.isEmpty else { return false }
        if eventIndex {
            vbd_store_release_u16(used + 4 + 8 * Int(size), lastAvailableIndex.littleEndian)
        }
        vbd_fence_seq_cst()
        return vbd_load_acquire_u16(available + 2) == lastAvailableIndex
    }

    /// vring_need_event: whether `eventIndex` lies in `(old, new]`, modulo 2^16.
    public static func needsEvent(eventIndex: UInt16, new: UInt16, old: UInt16) -> Bool {
        (new &- eventIndex &- 1) < (new &- old)
    }
}

/// One descriptor chain's buffers in this process's address space.
public struct DescriptorChain: @unchecked Sendable {
    public var head: UInt16
    public var readable: [UnsafeMutableRawBufferPointer] = []
    public var writable: [UnsafeMutableRawBufferPointer] = []
    public init(head: UInt16) { self.head = head }
}

public enum VirtqueueError: Error, Equatable, Sendable, CustomStringConvertible {
    case badSize(UInt32)
    case ringOutsideMemory
    case misaligned
    case availableIndexJumped(from: UInt16, to: UInt16)
    case descriptorIndexOutOfRange(UInt16)
    case chainTooLong
    case indirectNotNegotiated
    case nestedIndirect
    case indirectWithNext
    case badIndirectLength(UInt32)
    case bufferOutsideMemory(address: UInt64, length: UInt32)
    case readableAfterWritable
    case inflight(InflightError)

    public var description: String {
        switch self {
        case let .badSize(n): return "queue size \(n) is not a power of two in 1...32768"
        case .ringOutsideMemory: return "a ring lies outside the guest memory table"
        case .misaligned: return "a ring address is misaligned (descriptors 16, available 2, used 4)"
        case let .availableIndexJumped(from, to): return "the available index moved from \(from) to \(to), more than the queue size"
        case let .descriptorIndexOutOfRange(i): return "descriptor index \(i) is outside the table"
        case .chainTooLong: return "a descriptor chain is longer than its table (a loop)"
        case .indirectNotNegotiated: return "an indirect descriptor, but VIRTIO_F_INDIRECT_DESC was not negotiated"
        case .nestedIndirect: return "an indirect descriptor inside an indirect table"
        case .indirectWithNext: return "an indirect descriptor with NEXT set"
        case let .badIndirectLength(l): return "an indirect table of \(l) bytes (a non-zero multiple of 16 expected)"
        case let .bufferOutsideMemory(address, length): return "buffer [0x\(String(address, radix: 16)), +\(length)) is outside guest memory"
        case .readableAfterWritable: return "a device-readable descriptor after a device-writable one"
        case let .inflight(error): return "\(error)"
        }
    }
}
