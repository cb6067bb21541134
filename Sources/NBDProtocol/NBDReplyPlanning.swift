import VBDCore

/// How a READ reply is split into chunks, computed from the device's extents before any data is read.
public enum NBDReadSegment: Sendable, Equatable {
    /// Bytes to read from the device and send as `NBD_REPLY_TYPE_OFFSET_DATA`.
    case data(offset: UInt64, length: UInt32)
    /// A range that reads as zeroes, sent as `NBD_REPLY_TYPE_OFFSET_HOLE` without reading it.
    case hole(offset: UInt64, length: UInt32)
}

public enum NBDReplyPlanning {
    /// Below this size a zero run is sent as data: a hole chunk costs a header and breaks the data
    /// into more chunks, and the spec asks for 512-byte multiples where possible.
    public static let holeBytesMin: UInt64 = 4096

    /// Splits `[offset, offset+length)` into data and hole segments. Extents flagged `.zero` become
    /// holes; extents not covering the whole range leave the rest as data. Adjacent data merges, so a
    /// fully allocated range is one segment.
    public static func readSegments(offset: UInt64, length: UInt32, extents: [Extent]) -> [NBDReadSegment] {
        var segments: [NBDReadSegment] = []
        let end = offset + UInt64(length)
        var position = offset
        func appendData(_ start: UInt64, _ count: UInt64) {
            guard count > 0 else { return }
            if case .data(let previousOffset, let previousLength)? = segments.last,
               previousOffset + UInt64(previousLength) == start {
                segments[segments.count - 1] = .data(offset: previousOffset, length: previousLength + UInt32(count))
            } else {
                segments.append(.data(offset: start, length: UInt32(count)))
            }
        }
        for extent in extents where position < end {
            let count = min(extent.length, end - position)
            guard count > 0 else { continue }
            if extent.flags.contains(.zero) && count >= holeBytesMin {
                segments.append(.hole(offset: position, length: UInt32(count)))
            } else {
                appendData(position, count)
            }
            position += count
        }
        appendData(position, end - position)
        return segments
    }

    /// Block status descriptors for one context, from the device's extents: flags are mapped into
    /// the context's meaning, equal neighbours merged, and the total clipped to the request length.
    /// With `onlyOne` (NBD_CMD_FLAG_REQ_ONE) at most one descriptor is returned.
    public static func blockStatusDescriptors(context: NBDMetaContext, extents: [Extent], length: UInt32,
                                              onlyOne: Bool) -> [NBDBlockDescriptor] {
        var descriptors: [NBDBlockDescriptor] = []
        var remaining = UInt64(length)
        for extent in extents where remaining > 0 {
            let count = min(extent.length, remaining)
            guard count > 0 else { continue }
            let flags = contextFlags(context, extent.flags)
            if let last = descriptors.last, last.flags == flags {
                descriptors[descriptors.count - 1].length += UInt32(count)
            } else {
                if onlyOne && !descriptors.isEmpty { break }
                descriptors.append(NBDBlockDescriptor(length: UInt32(count), flags: flags))
            }
            remaining -= count
        }
        return descriptors
    }

    /// The wire flags of an extent in a context: base:allocation bit 0 HOLE, bit 1 ZERO;
    /// x-vbd:sharing bit 0 SHARED.
    public static func contextFlags(_ context: NBDMetaContext, _ flags: ExtentFlags) -> UInt32 {
        switch context {
        case .baseAllocation:
            return (flags.contains(.hole) ? 1 : 0) | (flags.contains(.zero) ? 2 : 0)
        case .vbdSharing:
            return flags.contains(.shared) ? 1 : 0
        }
    }
}
