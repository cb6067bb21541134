import NBDProtocol
import NIOCore
import Synchronization
import VBDCore

#if canImport(Glibc)
import Glibc
#endif

/// One validated operation, run on an I/O thread: calls the device and encodes the complete reply.
///
/// Encoding on the pool thread keeps the event loop free of byte copying; the event loop only hands
/// the finished buffer to the socket. A READ reply is built whole before anything is sent, so a read
/// error can still become a clean error reply (never a half-sent simple reply).
struct NBDOperationJob: Sendable {
    struct Outcome: Sendable {
        var reply: ByteBuffer
        var error: NBDError?
        var message: String
        /// Where a READ's blocks came from (cache, last-chance tier, disk), charged to the domain.
        var readSources = ReadSources()
    }

    let operation: NBDOperation
    let payload: ByteBuffer?
    let device: any BlockDevice
    let structured: Bool
    let extentsMax: Int
    let allocator: ByteBufferAllocator

    /// Extents asked for when planning a READ: more would only split the reply into more chunks.
    static let readPlanExtentsMax = 64

    func run() -> Outcome {
        do throws(BlockDeviceError) {
            switch operation {
            case .read(let handle, let offset, let length, let dontFragment):
                return try read(handle: handle, offset: offset, length: length, dontFragment: dontFragment)
            case .write(let handle, let offset, _, let fua):
                // Validation guarantees the payload; a missing one is refused, not trapped on.
                guard let payload else { throw .invalid("WRITE without its payload") }
                var failure: BlockDeviceError?
                payload.withUnsafeReadableBytes { bytes in
                    do throws(BlockDeviceError) {
                        try device.write(offset: offset, data: bytes, fua: fua)
                    } catch {
                        failure = error
                    }
                }
                if let failure { throw failure }
                return success(handle)
            case .flush(let handle):
                try device.flush()
                return success(handle)
            case .trim(let handle, let offset, let length, let fua):
                try device.trim(offset: offset, length: UInt64(length), fua: fua)
                return success(handle)
            case .writeZeroes(let handle, let offset, let length, let mayTrim, let fastOnly, let fua):
                try device.writeZeroes(offset: offset, length: UInt64(length), mayTrim: mayTrim, fastOnly: fastOnly,
                                       fua: fua)
                return success(handle)
            case .cache(let handle, let offset, let length):
                try device.prefetch(offset: offset, length: UInt64(length))
                return success(handle)
            case .blockStatus(let handle, let offset, let length, let onlyOne, let contexts):
                return try blockStatus(handle: handle, offset: offset, length: length, onlyOne: onlyOne,
                                       contexts: contexts)
            }
        } catch {
            return Self.failure(operation, NBDError(error), error.description, structured: structured,
                                allocator: allocator)
        }
    }

    // MARK: Without blocking

    /// The operation done at once on the calling thread, when the device can do it without
    /// blocking, so the caller skips the hop to an I/O thread and back; nil otherwise (nothing
    /// was done). A READ the cache holds (``BlockDevice/readIfCached(offset:into:zeroBlocksAllowed:)``)
    /// or a small aligned WRITE without FUA (``BlockDevice/writeWithoutBlocking(offset:data:)``).
    func runWithoutBlocking() -> Outcome? {
        switch operation {
        case .read: return readFromMemory()
        case .write(let handle, let offset, _, let fua):
            guard !fua, let payload else { return nil }
            do throws(BlockDeviceError) {
                var done = false
                var failure: BlockDeviceError?
                payload.withUnsafeReadableBytes { bytes in
                    do throws(BlockDeviceError) {
                        done = try device.writeWithoutBlocking(offset: offset, data: bytes)
                    } catch {
                        failure = error
                    }
                }
                if let failure { throw failure }
                return done ? success(handle) : nil
            } catch {
                return Self.failure(operation, NBDError(error), error.description, structured: structured,
                                    allocator: allocator)
            }
        default: return nil
        }
    }

    /// A READ the device has in memory. With structured replies (and no DF) zero blocks become
    /// hole chunks as on the ordinary path, planned from what the read itself reported.
    private func readFromMemory() -> Outcome? {
        guard case .read(let handle, let offset, let length, let dontFragment) = operation, length > 0 else { return nil }
        if structured && !dontFragment {
            var zeroRanges: [Range<Int>]?
            var sources = ReadSources()
            var buffer = allocator.buffer(capacity: Int(length) + Self.dataHeaderBytes)
            NBDReplyEncoder.writeOffsetDataHeader(handle: handle, offset: offset, dataLength: length, done: true,
                                                  into: &buffer)
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { space in
                let target = UnsafeMutableRawBufferPointer(rebasing: space[0..<Int(length)])
                guard let read = device.readIfCachedReportingZeroes(offset: offset, into: target) else { return 0 }
                (sources, zeroRanges) = (read.0, read.zeroRanges)
                return Int(length)
            }
            guard let zeroRanges else { return nil }
            return Outcome(reply: replanned(buffer, handle: handle, offset: offset, length: length, zeroRanges: zeroRanges),
                           error: nil, message: "", readSources: sources)
        }
        var buffer = allocator.buffer(capacity: Int(length) + 32)
        if structured {
            NBDReplyEncoder.writeOffsetDataHeader(handle: handle, offset: offset, dataLength: length, done: true,
                                                  into: &buffer)
        } else {
            NBDReplyEncoder.writeSimpleReply(handle: handle, error: nil, into: &buffer)
        }
        var sources: ReadSources?
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { space in
            sources = device.readIfCached(offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: space[0..<Int(length)]),
                                          zeroBlocksAllowed: !structured || dontFragment)
            return sources == nil ? 0 : Int(length)
        }
        guard let sources else { return nil }
        return Outcome(reply: buffer, error: nil, message: "", readSources: sources)
    }

    // MARK: Pieces

    /// Under scheduling, a WRITE longer than this is done as device calls of at most this many
    /// bytes, each scheduled on its own, so that a reserved domain waits behind one piece of
    /// someone's large write rather than all of it (Benchmarks/hostile.sh, docs/ACCOUNTING.md).
    static let pieceBytes = 64 * 1024

    /// A piece is written in steps of at most this many bytes, ending on multiples of it in the
    /// device's offsets, and its I/O thread yields its core between steps. Storing 64 KiB takes
    /// 100-300 µs of CPU here, and the kernel lets a running thread finish its slice before a
    /// woken one gets the core: an event loop serving a reserved domain that was woken onto this
    /// thread's core waited out the whole piece, and now waits out one step at most. Each step is
    /// still one scheduled piece (one dispatch, one charge); hostile.sh, 10 interleaved rounds:
    /// the victim's p99 was lower with steps in 9 (docs/ACCOUNTING.md).
    static let stepBytes = 16 * 1024

    /// Device calls this operation is scheduled as. Pieces end on multiples of ``pieceBytes`` in
    /// the device's offsets, so a block-aligned write is cut only at block boundaries (no piece
    /// read-modify-writes a block another piece also touches).
    var pieceCount: Int {
        guard case .write(_, let offset, let length, _) = operation, Int(length) > Self.pieceBytes else { return 1 }
        let first = offset / UInt64(Self.pieceBytes), last = (offset + UInt64(length) - 1) / UInt64(Self.pieceBytes)
        return Int(last - first + 1)
    }

    /// Writes piece `piece` of a split WRITE in steps (``stepBytes``), without FUA
    /// (``finishPieces(firstError:)`` flushes once).
    func runPiece(_ piece: Int) -> BlockDeviceError? {
        guard case .write(_, let offset, let length, _) = operation, let payload else {
            return .invalid("only a WRITE is split into pieces")
        }
        let window = (offset / UInt64(Self.pieceBytes) + UInt64(piece)) * UInt64(Self.pieceBytes)
        let start = Int(max(offset, window) - offset)
        let end = min(Int(length), Int(window + UInt64(Self.pieceBytes) - offset))  // the window ends past `offset`
        guard piece >= 0, start < end else { return .invalid("piece \(piece) is past the request") }
        var failure: BlockDeviceError?
        payload.withUnsafeReadableBytes { bytes in
            do throws(BlockDeviceError) {
                let step = UInt64(Self.stepBytes)
                var at = start
                while at < end {
                    let stop = min(end, Int(((offset + UInt64(at)) / step + 1) * step - offset))
                    try device.write(offset: offset + UInt64(at), data: UnsafeRawBufferPointer(rebasing: bytes[at..<stop]),
                                     fua: false)
                    at = stop
                    if at < end { sched_yield() }
                }
            } catch {
                failure = error
            }
        }
        return failure
    }

    /// The reply of a split WRITE once every piece is done: the first error, else (with FUA) a
    /// flush that makes all pieces durable, as an unsplit FUA write would be.
    func finishPieces(firstError: BlockDeviceError?) -> Outcome {
        do throws(BlockDeviceError) {
            if let firstError { throw firstError }
            if case .write(_, _, _, true) = operation { try device.flush() }
            return success(operation.handle)
        } catch {
            return Self.failure(operation, NBDError(error), error.description, structured: structured,
                                allocator: allocator)
        }
    }

    static func failure(_ operation: NBDOperation, _ error: NBDError, _ message: String, structured: Bool,
                        allocator: ByteBufferAllocator) -> Outcome {
        var buffer = allocator.buffer(capacity: 64 + message.utf8.count)
        let rejection = NBDRequestRejection(handle: operation.handle, command: operation.command, error: error,
                                            message: message)
        NBDReplyEncoder.writeError(rejection, structured: structured, into: &buffer)
        return Outcome(reply: buffer, error: error, message: message)
    }

    private func success(_ handle: UInt64) -> Outcome {
        var buffer = allocator.buffer(capacity: 32)
        if structured {
            NBDReplyEncoder.writeNoneChunk(handle: handle, into: &buffer)
        } else {
            NBDReplyEncoder.writeSimpleReply(handle: handle, error: nil, into: &buffer)
        }
        return Outcome(reply: buffer, error: nil, message: "")
    }

    /// Bytes of an OFFSET_DATA chunk before its data: the chunk header and the offset.
    static let dataHeaderBytes = 28

    /// `reply` is one OFFSET_DATA chunk covering the whole READ; with zero ranges in it, the reply
    /// planned from them (holes for zero runs of a block or more, data copied for the rest).
    private func replanned(_ reply: ByteBuffer, handle: UInt64, offset: UInt64, length: UInt32,
                           zeroRanges: [Range<Int>]) -> ByteBuffer {
        guard !zeroRanges.isEmpty else { return reply }
        var extents: [Extent] = []
        var position = 0
        for zero in zeroRanges {
            if zero.lowerBound > position { extents.append(Extent(length: UInt64(zero.lowerBound - position), flags: [])) }
            extents.append(Extent(length: UInt64(zero.count), flags: [.zero]))
            position = zero.upperBound
        }
        let segments = NBDReplyPlanning.readSegments(offset: offset, length: length, extents: extents)
        var buffer = allocator.buffer(capacity: reply.readableBytes + 32 * segments.count)
        for (index, segment) in segments.enumerated() {
            let done = index == segments.count - 1
            switch segment {
            case .hole(let holeOffset, let holeLength):
                NBDReplyEncoder.writeOffsetHole(handle: handle, offset: holeOffset, length: holeLength, done: done,
                                                into: &buffer)
            case .data(let dataOffset, let dataLength):
                NBDReplyEncoder.writeOffsetDataHeader(handle: handle, offset: dataOffset, dataLength: dataLength,
                                                      done: done, into: &buffer)
                let start = reply.readerIndex + Self.dataHeaderBytes + Int(dataOffset - offset)
                buffer.writeImmutableBuffer(reply.getSlice(at: start, length: Int(dataLength))!)
            }
        }
        return buffer
    }

    private func read(handle: UInt64, offset: UInt64, length: UInt32,
                      dontFragment: Bool) throws(BlockDeviceError) -> Outcome {
        if structured && !dontFragment {
            // One walk of the map: the read reports its zero blocks, and the reply is planned
            // from them (a device that cannot report them is asked for extents below).
            var zeroRanges: [Range<Int>]?
            var sources = ReadSources()
            var failure: BlockDeviceError?
            var buffer = allocator.buffer(capacity: Int(length) + Self.dataHeaderBytes)
            NBDReplyEncoder.writeOffsetDataHeader(handle: handle, offset: offset, dataLength: length, done: true,
                                                  into: &buffer)
            buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(length)) { space in
                let target = UnsafeMutableRawBufferPointer(rebasing: space[0..<Int(length)])
                do throws(BlockDeviceError) {
                    zeroRanges = try device.readReportingZeroes(offset: offset, into: target, sources: &sources)
                } catch {
                    failure = error
                }
                return zeroRanges == nil ? 0 : Int(length)
            }
            if let failure { throw failure }
            if let zeroRanges {
                return Outcome(reply: replanned(buffer, handle: handle, offset: offset, length: length, zeroRanges: zeroRanges),
                               error: nil, message: "", readSources: sources)
            }
        }
        // Plan: without structured replies, or with DF, the whole range is one piece of data.
        var segments: [NBDReadSegment] = [.data(offset: offset, length: length)]
        if structured && !dontFragment,
           let extents = try? device.extents(offset: offset, length: UInt64(length),
                                             maxExtents: Self.readPlanExtentsMax) {
            // Extents only shape the reply; if the device cannot describe them, data is always correct.
            segments = NBDReplyPlanning.readSegments(offset: offset, length: length, extents: extents)
        }
        var sources = ReadSources()
        var buffer = allocator.buffer(capacity: Int(length) + 32 * segments.count)
        if !structured {
            NBDReplyEncoder.writeSimpleReply(handle: handle, error: nil, into: &buffer)
        }
        for (index, segment) in segments.enumerated() {
            let done = index == segments.count - 1
            switch segment {
            case .hole(let holeOffset, let holeLength):
                NBDReplyEncoder.writeOffsetHole(handle: handle, offset: holeOffset, length: holeLength, done: done,
                                                into: &buffer)
            case .data(let dataOffset, let dataLength):
                if structured {
                    NBDReplyEncoder.writeOffsetDataHeader(handle: handle, offset: dataOffset, dataLength: dataLength,
                                                          done: done, into: &buffer)
                }
                var failure: BlockDeviceError?
                buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: Int(dataLength)) { space in
                    let target = UnsafeMutableRawBufferPointer(rebasing: space[0..<Int(dataLength)])
                    do throws(BlockDeviceError) {
                        try device.read(offset: dataOffset, into: target, sources: &sources)
                    } catch {
                        failure = error
                    }
                    return Int(dataLength)
                }
                if let failure { throw failure }
            }
        }
        return Outcome(reply: buffer, error: nil, message: "", readSources: sources)
    }

    private func blockStatus(handle: UInt64, offset: UInt64, length: UInt32, onlyOne: Bool,
                             contexts: [NBDMetaContext]) throws(BlockDeviceError) -> Outcome {
        // One device query serves every context: extents carry all flags, and each context merges
        // neighbours by its own flags. With REQ_ONE a few extents suffice to find the first run.
        let extents = try device.extents(offset: offset, length: UInt64(length),
                                         maxExtents: onlyOne ? 16 : extentsMax)
        var buffer = allocator.buffer(capacity: contexts.count * (24 + 8 * min(extents.count, 1024)))
        for (index, context) in contexts.enumerated() {
            var descriptors = NBDReplyPlanning.blockStatusDescriptors(context: context, extents: extents,
                                                                      length: length, onlyOne: onlyOne)
            if descriptors.isEmpty {
                // proto.md: at least one descriptor; status 0 is always a safe answer.
                descriptors = [NBDBlockDescriptor(length: length, flags: 0)]
            }
            NBDReplyEncoder.writeBlockStatusChunk(handle: handle, contextID: context.id, descriptors: descriptors,
                                                  done: index == contexts.count - 1, into: &buffer)
        }
        return Outcome(reply: buffer, error: nil, message: "")
    }
}

/// Collects the pieces of a split request, which may finish on different threads in any order.
final class NBDPieceTracker: Sendable {
    struct Total {
        var firstError: BlockDeviceError?
        var deviceTime: Duration
    }

    private struct State {
        var remaining: Int
        var total = Total(firstError: nil, deviceTime: .zero)
    }

    private let state: Mutex<State>

    init(pieces: Int) {
        precondition(pieces > 0)
        state = Mutex(State(remaining: pieces))
    }

    /// Whether a piece has failed (later pieces then skip their device call).
    var hasFailed: Bool { state.withLock { $0.total.firstError != nil } }

    /// Records one finished piece; returns the totals when it was the last one.
    func pieceDone(error: BlockDeviceError?, deviceTime: Duration) -> Total? {
        state.withLock { state in
            precondition(state.remaining > 0, "more pieces finished than were scheduled")
            state.remaining -= 1
            state.total.deviceTime += deviceTime
            if state.total.firstError == nil { state.total.firstError = error }
            return state.remaining == 0 ? state.total : nil
        }
    }
}
