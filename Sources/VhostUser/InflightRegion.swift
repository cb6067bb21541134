import CVBDSys

#if canImport(Glibc)
import Glibc
#endif

/// Inflight I/O tracking for split virtqueues (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD; vhost-user.rst,
/// "Inflight I/O tracking"). Requests complete out of order, so after the back end restarts the
/// available ring alone cannot tell which of the chains it had taken were still unanswered: the
/// back end records each head it takes and completes in a memfd the front end (QEMU) keeps across
/// the restart and hands to the next back end, which resubmits the heads still in flight, in the
/// order they were first taken, before taking new ones.
///
/// One region per queue, each ``queueRegionBytes(queueSize:)`` long, queue 0 first:
///
///     QueueRegionSplit (16 bytes)             DescStateSplit (16 bytes), one per descriptor
///      0 u64 features (0)                      0 u8  inflight (1: taken, not completed)
///      8 u16 version (1; 0: never used)        1 u8  padding[5]
///     10 u16 desc_num (the queue size)         6 u16 next (the last completion batch, a list)
///     12 u16 last_batch_head                   8 u64 counter (the order heads were taken in)
///     14 u16 used_idx (the used index the tracking matches)
///
/// Native byte order (vhost-user.rst: "All numbers are in the machine native byte order").
public enum InflightLayout {
    public static let version: UInt16 = 1
    static let headerBytes = 16
    static let descriptorStateBytes = 16
    /// Each queue's region starts on a 64-byte boundary (as libvhost-user and DPDK place them).
    static let alignment = 64

    public static func queueRegionBytes(queueSize: UInt16) -> Int {
        let bytes = headerBytes + descriptorStateBytes * Int(queueSize)
        return (bytes + alignment - 1) / alignment * alignment
    }

    public static func totalBytes(queueCount: UInt16, queueSize: UInt16) -> Int {
        Int(queueCount) * queueRegionBytes(queueSize: queueSize)
    }
}

public enum InflightError: Error, Equatable, Sendable, CustomStringConvertible {
    case unknownVersion(UInt16)
    case queueSizeMismatch(region: UInt16, queue: UInt16)
    case lastBatchHeadOutOfRange(UInt16)

    public var description: String {
        switch self {
        case let .unknownVersion(v): return "inflight region version \(v) (1 expected)"
        case let .queueSizeMismatch(region, queue): return "the inflight region tracks \(region) descriptors, the queue has \(queue)"
        case let .lastBatchHeadOutOfRange(h): return "inflight last_batch_head \(h) is outside the queue"
        }
    }
}

/// One split queue's inflight region in memory shared with the front end. Every value read from
/// it is checked (the front end can write it); the back end that owns the queue is its only
/// writer while the queue runs (callers serialise, as they do for the ring).
public struct InflightQueueRegion: @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let queueSize: UInt16

    /// `base` must point at `InflightLayout.queueRegionBytes(queueSize:)` mapped bytes.
    public init(base: UnsafeMutableRawPointer, queueSize: UInt16) {
        self.base = base
        self.queueSize = queueSize
    }

    public var version: UInt16 { field(8) }
    public var descriptorCount: UInt16 { field(10) }
    public var lastBatchHead: UInt16 { field(12) }
    public var usedIndex: UInt16 { field(14) }

    public func isInflight(_ head: UInt16) -> Bool { state(head).load(as: UInt8.self) == 1 }
    public func counter(_ head: UInt16) -> UInt64 { (state(head) + 8).loadUnaligned(as: UInt64.self) }
    public func next(_ head: UInt16) -> UInt16 { (state(head) + 6).loadUnaligned(as: UInt16.self) }

    /// What ``recover(usedIndex:)`` found: the heads to serve again, oldest first, and the
    /// counter value the next taken head gets.
    public struct Recovery: Equatable, Sendable {
        public var resubmit: [UInt16]
        public var nextCounter: UInt64
    }

    /// Prepares the region for a queue whose used ring stands at `usedIndex`. A region never used
    /// (version 0) is initialised and nothing is resubmitted. Otherwise ("When reconnecting"): if
    /// the previous back end published a used index the region does not match, it died between
    /// publishing that completion and clearing its head's flag, which is cleared now; the heads
    /// still marked in flight are returned in the order they were taken.
    public func recover(usedIndex ringUsedIndex: UInt16) throws(InflightError) -> Recovery {
        switch version {
        case 0:
            base.initializeMemory(as: UInt8.self, repeating: 0, count: InflightLayout.queueRegionBytes(queueSize: queueSize))
            setField(10, queueSize)
            setField(14, ringUsedIndex)
            setField(8, InflightLayout.version)
            return Recovery(resubmit: [], nextCounter: 1)
        case InflightLayout.version:
            break
        default:
            throw .unknownVersion(version)
        }
        guard descriptorCount == queueSize else { throw .queueSizeMismatch(region: descriptorCount, queue: queueSize) }
        if usedIndex != ringUsedIndex {
            // Completions here are one per batch: the last batch is the one head at last_batch_head.
            guard lastBatchHead < queueSize else { throw .lastBatchHeadOutOfRange(lastBatchHead) }
            state(lastBatchHead).storeBytes(of: 0, as: UInt8.self)
            setField(14, ringUsedIndex)
        }
        var inflight: [(head: UInt16, counter: UInt64)] = []
        for head in 0..<queueSize where isInflight(head) {
            inflight.append((head, counter(head)))
        }
        inflight.sort { $0.counter < $1.counter || ($0.counter == $1.counter && $0.head < $1.head) }
        let highest = inflight.map(\.counter).max() ?? 0
        return Recovery(resubmit: inflight.map(\.head), nextCounter: highest &+ 1)
    }

    /// A head taken from the available ring: its counter, then its flag.
    public func taken(head: UInt16, counter: UInt64) {
        (state(head) + 8).storeBytes(of: counter, as: UInt64.self)
        vbd_fence_seq_cst()
        state(head).storeBytes(of: 1, as: UInt8.self)
    }

    /// Before the used element for `head` is published: it becomes the last batch, so a back end
    /// that dies between publishing the used index and ``completed(head:usedIndex:)`` has its
    /// successor clear the flag.
    public func completing(head: UInt16) {
        (state(head) + 6).storeBytes(of: lastBatchHead, as: UInt16.self)
        setField(12, head)
        vbd_fence_seq_cst()
    }

    /// After the used index `usedIndex` that includes `head` was published.
    public func completed(head: UInt16, usedIndex: UInt16) {
        vbd_fence_seq_cst()
        state(head).storeBytes(of: 0, as: UInt8.self)
        setField(14, usedIndex)
    }

    private func state(_ head: UInt16) -> UnsafeMutableRawPointer {
        precondition(head < queueSize)
        return base + InflightLayout.headerBytes + InflightLayout.descriptorStateBytes * Int(head)
    }

    private func field(_ offset: Int) -> UInt16 { (base + offset).loadUnaligned(as: UInt16.self) }
    private func setField(_ offset: Int, _ value: UInt16) { (base + offset).storeBytes(of: value, as: UInt16.self) }
}

/// The inflight memfd of a session: created for GET_INFLIGHT_FD, or the one the front end passes
/// back with SET_INFLIGHT_FD (from this or an earlier back end), mapped MAP_SHARED.
public final class InflightMemory: @unchecked Sendable {
    public let fileDescriptor: Int32
    public let queueCount: UInt16
    public let queueSize: UInt16
    public let mappedBytes: Int
    private let mapping: UnsafeMutableRawPointer
    private let regionBase: UnsafeMutableRawPointer

    /// A new zeroed region for `queueCount` queues of `queueSize`, in a memfd sealed against
    /// resizing (the front end holding it could otherwise shrink it under this process's mapping).
    public static func create(queueCount: UInt16, queueSize: UInt16) throws(VhostUserProtocolError) -> InflightMemory {
        let bytes = InflightLayout.totalBytes(queueCount: queueCount, queueSize: queueSize)
        let fd = vbd_memfd_create("vbd-vhost-inflight")
        guard fd >= 0 else { throw .invalid(request: .getInflightFD, detail: "memfd_create: \(String(cString: strerror(errno)))") }
        guard ftruncate(fd, off_t(bytes)) == 0, vbd_seal_size(fd) == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw .invalid(request: .getInflightFD, detail: "cannot size the inflight memfd to \(bytes) bytes: \(reason)")
        }
        do {
            return try InflightMemory(fileDescriptor: fd, mmapSize: UInt64(bytes), mmapOffset: 0, queueCount: queueCount,
                                      queueSize: queueSize, request: .getInflightFD)
        } catch {
            close(fd)
            throw error
        }
    }

    /// Maps `[mmapOffset, +mmapSize)` of `fileDescriptor` once it is checked to hold every queue's
    /// region and to be sealed against shrinking; owns (and closes) the fd from then on. On a
    /// throw the caller still owns it.
    public init(fileDescriptor fd: Int32, mmapSize: UInt64, mmapOffset: UInt64, queueCount: UInt16, queueSize: UInt16,
                request: VhostUserRequest = .setInflightFD) throws(VhostUserProtocolError) {
        guard (1...64).contains(queueCount), queueSize > 0, queueSize & (queueSize - 1) == 0 else {
            throw .invalid(request: request, detail: "\(queueCount) queues of \(queueSize) (1...64 queues, a power of two size)")
        }
        let needed = UInt64(InflightLayout.totalBytes(queueCount: queueCount, queueSize: queueSize))
        let (end, overflow) = mmapOffset.addingReportingOverflow(mmapSize)
        guard mmapSize >= needed, !overflow, end <= UInt64(Int.max), mmapSize <= 1 << 32 else {
            throw .invalid(request: request, detail: "an inflight area of \(mmapSize) bytes at \(mmapOffset) (\(needed) needed for \(queueCount) queues of \(queueSize))")
        }
        var status = stat()
        guard fstat(fd, &status) == 0, status.st_size >= 0, UInt64(status.st_size) >= end else {
            throw .invalid(request: request, detail: "the inflight fd holds fewer than the \(end) bytes its area needs")
        }
        guard vbd_sealed_against_shrinking(fd) == 1 else {
            throw .invalid(request: request, detail: "the inflight fd must be a memfd sealed against shrinking")
        }
        let address = mmap(nil, Int(end), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let address, address != MAP_FAILED else {
            throw .invalid(request: request, detail: "mmap of the inflight area failed: \(String(cString: strerror(errno)))")
        }
        self.fileDescriptor = fd
        self.queueCount = queueCount
        self.queueSize = queueSize
        self.mappedBytes = Int(end)
        self.mapping = address
        self.regionBase = address + Int(mmapOffset)
    }

    /// Queue `index`'s region, or nil when the area tracks fewer queues.
    public func region(queue index: Int) -> InflightQueueRegion? {
        guard index < Int(queueCount) else { return nil }
        return InflightQueueRegion(base: regionBase + index * InflightLayout.queueRegionBytes(queueSize: queueSize), queueSize: queueSize)
    }

    deinit {
        munmap(mapping, mappedBytes)
        close(fileDescriptor)
    }
}
