import Synchronization
import VBDAccounting
import VBDCore

/// virtio-blk (virtio 1.2 section 5.2): feature bits, the config space layout and the request format.
public enum VirtioBlk {
    public static let sectorBytes: UInt64 = 512

    public enum Feature {
        public static let sizeMax: UInt64 = 1 << 1
        public static let segMax: UInt64 = 1 << 2
        public static let readOnly: UInt64 = 1 << 5
        public static let blockSize: UInt64 = 1 << 6
        public static let flush: UInt64 = 1 << 9
        public static let topology: UInt64 = 1 << 10
        public static let multiQueue: UInt64 = 1 << 12
        public static let discard: UInt64 = 1 << 13
        public static let writeZeroes: UInt64 = 1 << 14
    }

    public enum RequestType: UInt32, Sendable {
        case read = 0          // VIRTIO_BLK_T_IN
        case write = 1         // VIRTIO_BLK_T_OUT
        case flush = 4
        case getID = 8
        case discard = 11
        case writeZeroes = 13
    }

    public enum Status: UInt8, Sendable {
        case ok = 0
        case ioError = 1
        case unsupported = 2
    }

    /// The device ID GET_ID returns: 20 bytes, NUL-padded (not terminated when all 20 are used).
    public static let idBytes = 20
    /// DISCARD / WRITE_ZEROES segment: le64 sector, le32 num_sectors, le32 flags (bit 0: unmap).
    public static let rangeSegmentBytes = 16
    public static let rangeFlagUnmap: UInt32 = 1
}

/// The virtio_blk_config structure this device presents (byte offsets as in the spec).
public struct VirtioBlkConfig: Equatable, Sendable {
    public var capacitySectors: UInt64
    public var segmentsMax: UInt32
    public var blockSize: UInt32
    /// log2(physical block / logical block) and the minimum and optimal I/O size in logical blocks.
    public var physicalBlockExponent: UInt8
    public var minimumIOBlocks: UInt16
    public var optimalIOBlocks: UInt32
    public var queueCount: UInt16
    public var discardSectorsMax: UInt32
    public var discardSegmentsMax: UInt32
    public var discardSectorAlignment: UInt32
    public var writeZeroesSectorsMax: UInt32
    public var writeZeroesSegmentsMax: UInt32
    public var writeZeroesMayUnmap: Bool

    /// The 60 bytes up to and including write_zeroes_may_unmap and its padding; config reads past
    /// them (secure erase, zoned) read as zeroes, as those features are not offered.
    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.u64(capacitySectors)          // 0 capacity
        w.u32(0)                        // 8 size_max (VIRTIO_BLK_F_SIZE_MAX not offered)
        w.u32(segmentsMax)              // 12 seg_max
        w.u16(0); w.u8(0); w.u8(0)      // 16 geometry (not offered)
        w.u32(blockSize)                // 20 blk_size
        w.u8(physicalBlockExponent)     // 24 topology
        w.u8(0)
        w.u16(minimumIOBlocks)
        w.u32(optimalIOBlocks)
        w.u8(0); w.u8(0)                // 32 writeback, unused0
        w.u16(queueCount)               // 34 num_queues
        w.u32(discardSectorsMax)        // 36
        w.u32(discardSegmentsMax)       // 40
        w.u32(discardSectorAlignment)   // 44
        w.u32(writeZeroesSectorsMax)    // 48
        w.u32(writeZeroesSegmentsMax)   // 52
        w.u8(writeZeroesMayUnmap ? 1 : 0) // 56
        w.u8(0); w.u8(0); w.u8(0)
        return w.bytes
    }
}

/// Serves virtio-blk requests on a ``BlockDevice``, reading and writing the guest's buffers in
/// place (no copy of the data through this process). Safe to call from several queue workers at once.
public struct VirtioBlkRequestHandler: Sendable {
    /// Largest piece of a guest's write copied out of guest memory and stored at once.
    static let bounceBytesMax = 1 << 20
    public let device: any BlockDevice
    public let segmentsMax: UInt32
    public let rangeSegmentsMax: UInt32
    public let rangeSectorsMax: UInt32
    /// The connection's session in the request layer both doors share (nil: no tenancy): the
    /// lease is checked before each request, the request waits for its device slot and is charged
    /// after it, by the code NBD requests go through.
    public let session: RequestSession?
    private let identifier: [UInt8]
    /// The device's capacity in sectors as last read: volumes only grow, so a request inside it is
    /// inside the device, and only one beyond it reads the size again (reading it costs a store
    /// lookup by name: 4.5 % of the server's samples at QD1 4 KiB reads when done per request).
    private let knownCapacity: KnownCapacity

    public init(device: any BlockDevice, session: RequestSession? = nil,
                segmentsMax: UInt32 = 126, rangeSegmentsMax: UInt32 = 32, rangeSectorsMax: UInt32 = 1 << 22) {
        self.device = device
        self.session = session
        self.segmentsMax = segmentsMax
        self.rangeSegmentsMax = rangeSegmentsMax
        self.rangeSectorsMax = rangeSectorsMax
        self.identifier = Array(device.name.utf8.prefix(VirtioBlk.idBytes))
        self.knownCapacity = KnownCapacity(sectors: device.size / VirtioBlk.sectorBytes)
    }

    /// The device's capacity now (read from the device; the config space reports it).
    public var capacitySectors: UInt64 {
        let sectors = device.size / VirtioBlk.sectorBytes
        knownCapacity.sectors.store(sectors, ordering: .relaxed)
        return sectors
    }

    /// The logical block size the guest sees: the volume's block size up to a page (Linux refuses
    /// larger logical blocks); a larger volume block is announced as the physical block.
    public func config(queueCount: UInt16) -> VirtioBlkConfig {
        let logical = UInt32(min(device.blockSize, 4096))
        let ratio = UInt32(device.blockSize) / logical
        return VirtioBlkConfig(capacitySectors: capacitySectors, segmentsMax: segmentsMax, blockSize: logical,
                               physicalBlockExponent: UInt8(ratio.trailingZeroBitCount), minimumIOBlocks: UInt16(clamping: ratio),
                               optimalIOBlocks: ratio, queueCount: queueCount,
                               discardSectorsMax: rangeSectorsMax, discardSegmentsMax: rangeSegmentsMax,
                               discardSectorAlignment: UInt32(device.blockSize) / UInt32(VirtioBlk.sectorBytes),
                               writeZeroesSectorsMax: rangeSectorsMax, writeZeroesSegmentsMax: rangeSegmentsMax,
                               writeZeroesMayUnmap: true)
    }

    public var features: UInt64 {
        var f = VirtioBlk.Feature.segMax | VirtioBlk.Feature.blockSize | VirtioBlk.Feature.topology | VirtioBlk.Feature.flush
            | VirtioBlk.Feature.multiQueue | VirtioBlk.Feature.discard | VirtioBlk.Feature.writeZeroes
        if device.isReadOnly { f |= VirtioBlk.Feature.readOnly }
        return f
    }

    /// Whether the chain is a read or write of at most ``quickBytesMax``: one that takes no longer
    /// than the store's work on a few blocks, so a queue's thread may run it itself (a flush, a
    /// discard or a large transfer go to an I/O thread, and the queue keeps taking requests meanwhile).
    public func isQuick(_ chain: DescriptorChain) -> Bool {
        guard let first = chain.readable.first, first.count >= 4 else { return false }
        let type = UInt32(littleEndian: first.loadUnaligned(as: UInt32.self))
        guard type == VirtioBlk.RequestType.read.rawValue || type == VirtioBlk.RequestType.write.rawValue else { return false }
        let bytes = chain.readable.reduce(0) { $0 + $1.count } + chain.writable.reduce(0) { $0 + $1.count }
        return bytes <= Self.quickBytesMax + 17
    }

    /// The largest read or write ``isQuick(_:)`` accepts.
    static let quickBytesMax = 64 << 10

    /// Serves one request chain: header (16 readable bytes), data, status (the last writable byte).
    /// Returns the bytes written into the chain's writable buffers (what the used ring reports),
    /// or nil when the chain has no byte for the status (it cannot be answered; the caller
    /// completes it with 0 bytes written).
    public func handle(_ chain: DescriptorChain) -> UInt32? {
        let writableTotal = chain.writable.reduce(0) { $0 + $1.count }
        guard writableTotal >= 1, let statusBuffer = chain.writable.last else { return nil }
        let status = statusBuffer.baseAddress! + (statusBuffer.count - 1)
        // The data buffers: all but the status byte. Linux gives the status its own 1-byte
        // descriptor, so that case slices without copying the list (no allocation per request).
        let inData: ArraySlice<UnsafeMutableRawBufferPointer>
        if statusBuffer.count == 1 {
            inData = chain.writable.dropLast()
        } else {
            var buffers = chain.writable
            buffers[buffers.count - 1] = UnsafeMutableRawBufferPointer(rebasing: statusBuffer[..<(statusBuffer.count - 1)])
            buffers.removeAll { $0.count == 0 }
            inData = buffers[...]
        }
        var usage = Usage()
        let started = ContinuousClock.now
        let (result, dataWritten) = serve(readable: chain.readable, inData: inData, usage: &usage)
        if let session, let kind = usage.kind, !usage.refused {
            // Device time from the scheduler's grant, not from the arrival: waiting is not charged.
            session.completed(kind, bytes: usage.bytes, deviceTime: ContinuousClock.now - (usage.granted ?? started),
                              failed: result != .ok, sources: usage.sources)
        }
        status.storeBytes(of: result.rawValue, as: UInt8.self)
        return UInt32(clamping: dataWritten + 1)
    }

    /// What one request is charged as: its kind (nil: not charged, as GET_ID), the bytes it moved
    /// or changed, and where a read's blocks came from.
    struct Usage {
        var kind: IOKind?
        var bytes: UInt64 = 0
        var sources = ReadSources()
        /// When the request got its device slot (nil: it never did, or nothing is scheduled).
        var granted: ContinuousClock.Instant?
        /// The lease refused it (the request layer charged and counted it already).
        var refused = false
    }

    /// Whether the connection's lease allows the request (always without tenancy).
    private func permitted(_ kind: IOKind, _ usage: inout Usage) -> Bool {
        guard let session, !session.permits(kind) else { return true }
        usage.refused = true
        return false
    }

    /// Waits for the scheduler's device slot for a request of `kind` moving `bytes`; returns the
    /// call that frees it, or nil when the domain's queue is full (the request fails).
    private func acquireSlot(_ kind: IOKind, usage: inout Usage) -> (@Sendable () -> Void)? {
        // Nothing scheduled (no scheduler attached): no slot to wait for, and none of the
        // hand-over objects `waitForSlot` allocates per request.
        guard let session, session.pipeline.schedules else { return {} }
        do {
            let release = try session.waitForSlot(kind, bytes: usage.bytes)
            usage.granted = ContinuousClock.now
            return release
        } catch {
            return nil
        }
    }

    private func serve(readable: [UnsafeMutableRawBufferPointer], inData: ArraySlice<UnsafeMutableRawBufferPointer>,
                       usage: inout Usage) -> (VirtioBlk.Status, Int) {
        let type: UInt32, sector: UInt64
        let outData: ArraySlice<UnsafeMutableRawBufferPointer>
        if let first = readable.first, first.count >= 16 {
            // The header in one buffer (as Linux sends it): read in place, no copy.
            type = UInt32(littleEndian: first.loadUnaligned(as: UInt32.self))
            sector = UInt64(littleEndian: first.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
            outData = first.count == 16 ? readable.dropFirst() : slice(readable, skip: 16)[...]
        } else {
            let readableTotal = readable.reduce(0) { $0 + $1.count }
            guard readableTotal >= 16 else { return (.ioError, 0) }
            var reader = ByteReader(gather(readable, skip: 0, count: 16))
            type = reader.u32()
            _ = reader.u32()   // ioprio
            sector = reader.u64()
            outData = slice(readable, skip: 16)[...]
        }
        let inTotal = inData.reduce(0) { $0 + $1.count }
        guard let request = VirtioBlk.RequestType(rawValue: type) else { return (.unsupported, 0) }
        switch request {
        case .read:
            usage.kind = .read
            guard permitted(.read, &usage), outData.isEmpty, let offset = range(sector: sector, bytes: UInt64(inTotal)) else { return (.ioError, 0) }
            usage.bytes = UInt64(inTotal)
            guard let release = acquireSlot(.read, usage: &usage) else { return (.ioError, 0) }
            defer { release() }
            var position = offset
            for buffer in inData {
                do { try device.read(offset: position, into: buffer, sources: &usage.sources) } catch { return (.ioError, 0) }
                position += UInt64(buffer.count)
            }
            return (.ok, inTotal)
        case .write:
            let outTotal = outData.reduce(0) { $0 + $1.count }
            usage.kind = .write
            guard permitted(.write, &usage), inTotal == 0, let offset = range(sector: sector, bytes: UInt64(outTotal)) else { return (.ioError, 0) }
            guard !device.isReadOnly else { return (.ioError, 0) }
            usage.bytes = UInt64(outTotal)
            guard let release = acquireSlot(.write, usage: &usage) else { return (.ioError, 0) }
            defer { release() }
            // The guest can rewrite its buffers while the store hashes, compresses and writes them
            // (a hostile or buggy guest): the store must see one stable copy, or it would keep
            // bytes that do not match their hash. Copied through a bounded bounce buffer.
            let bounce = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, min(outTotal, Self.bounceBytesMax)),
                                                                alignment: 4096)
            defer { bounce.deallocate() }
            var position = offset
            for buffer in outData {
                var done = 0
                while done < buffer.count {
                    let n = min(bounce.count, buffer.count - done)
                    bounce.baseAddress!.copyMemory(from: buffer.baseAddress! + done, byteCount: n)
                    do {
                        try device.write(offset: position, data: UnsafeRawBufferPointer(rebasing: bounce[0..<n]), fua: false)
                    } catch {
                        return (.ioError, 0)
                    }
                    position += UInt64(n)
                    done += n
                }
            }
            return (.ok, 0)
        case .flush:
            usage.kind = .flush
            guard permitted(.flush, &usage), let release = acquireSlot(.flush, usage: &usage) else { return (.ioError, 0) }
            defer { release() }
            do { try device.flush() } catch { return (.ioError, 0) }
            return (.ok, 0)
        case .getID:
            var written = 0
            let id = identifier + Array(repeating: 0, count: VirtioBlk.idBytes - identifier.count)
            for buffer in inData where written < id.count {
                let n = min(buffer.count, id.count - written)
                id.withUnsafeBytes { buffer.baseAddress!.copyMemory(from: $0.baseAddress! + written, byteCount: n) }
                written += n
            }
            return (.ok, written)
        case .discard, .writeZeroes:
            let outTotal = outData.reduce(0) { $0 + $1.count }
            let kind: IOKind = request == .discard ? .trim : .writeZeroes
            usage.kind = kind
            guard permitted(kind, &usage), inTotal == 0, outTotal > 0, outTotal % VirtioBlk.rangeSegmentBytes == 0 else { return (.ioError, 0) }
            let count = outTotal / VirtioBlk.rangeSegmentBytes
            guard count <= Int(rangeSegmentsMax) else { return (.ioError, 0) }
            guard !device.isReadOnly else { return (.ioError, 0) }
            let bytes = gather(outData, skip: 0, count: outTotal)
            var reader = ByteReader(bytes)
            var ranges: [(offset: UInt64, length: UInt64, unmap: Bool)] = []
            for _ in 0..<count {
                let start = reader.u64(), sectors = reader.u32(), flags = reader.u32()
                guard flags & ~VirtioBlk.rangeFlagUnmap == 0 else { return (.unsupported, 0) }
                let unmap = flags & VirtioBlk.rangeFlagUnmap != 0
                // The spec: a DISCARD with the unmap flag is UNSUPP.
                if request == .discard && unmap { return (.unsupported, 0) }
                guard sectors <= rangeSectorsMax,
                      let offset = range(sector: start, bytes: UInt64(sectors) * VirtioBlk.sectorBytes) else { return (.ioError, 0) }
                ranges.append((offset, UInt64(sectors) * VirtioBlk.sectorBytes, unmap))
            }
            usage.bytes = ranges.reduce(0) { $0 + $1.length }
            guard let release = acquireSlot(kind, usage: &usage) else { return (.ioError, 0) }
            defer { release() }
            for r in ranges where r.length > 0 {
                do {
                    if request == .discard {
                        try device.trim(offset: r.offset, length: r.length, fua: false)
                    } else {
                        try device.writeZeroes(offset: r.offset, length: r.length, mayTrim: r.unmap, fastOnly: false, fua: false)
                    }
                } catch .notSupported {
                    return (.unsupported, 0)
                } catch {
                    return (.ioError, 0)
                }
            }
            return (.ok, 0)
        }
    }

    /// The byte offset of `sector` when `[sector, +bytes)` is whole sectors inside the device.
    func range(sector: UInt64, bytes: UInt64) -> UInt64? {
        guard bytes % VirtioBlk.sectorBytes == 0 else { return nil }
        let sectors = bytes / VirtioBlk.sectorBytes
        func inside(_ capacity: UInt64) -> Bool { sector <= capacity && sectors <= capacity - sector }
        // Beyond the capacity last read: the volume may have grown since, so read it again.
        guard inside(knownCapacity.sectors.load(ordering: .relaxed)) || inside(capacitySectors) else { return nil }
        return sector * VirtioBlk.sectorBytes
    }
}

/// A handler's last reading of its device's capacity, shared by the copies of the handler that
/// the queues hold.
final class KnownCapacity: Sendable {
    let sectors: Atomic<UInt64>
    init(sectors: UInt64) { self.sectors = Atomic(sectors) }
}

/// Copies `count` bytes starting `skip` bytes into the concatenation of `buffers` (the caller has
/// checked that they hold that many).
func gather(_ buffers: some Collection<UnsafeMutableRawBufferPointer>, skip: Int, count: Int) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(count)
    var skip = skip
    for buffer in buffers where out.count < count {
        if skip >= buffer.count { skip -= buffer.count; continue }
        let n = min(buffer.count - skip, count - out.count)
        out += UnsafeRawBufferPointer(rebasing: buffer[skip..<(skip + n)])
        skip = 0
    }
    return out
}

/// The buffers after the first `skip` bytes of their concatenation.
func slice(_ buffers: [UnsafeMutableRawBufferPointer], skip: Int) -> [UnsafeMutableRawBufferPointer] {
    var result: [UnsafeMutableRawBufferPointer] = []
    var skip = skip
    for buffer in buffers {
        if skip >= buffer.count { skip -= buffer.count; continue }
        result.append(UnsafeMutableRawBufferPointer(rebasing: buffer[skip...]))
        skip = 0
    }
    return result
}
