/// What the handshake needs to know about an export, taken from the ``VBDCore/BlockDevice`` by the
/// server so that the state machines stay free of I/O.
public struct NBDExportDescription: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var isReadOnly: Bool
    /// The device's block size: advertised as the preferred block size.
    public var preferredBlockSize: UInt32

    public init(name: String, description: String, size: UInt64, isReadOnly: Bool, preferredBlockSize: UInt32) {
        self.name = name
        self.description = description
        self.size = size
        self.isReadOnly = isReadOnly
        self.preferredBlockSize = preferredBlockSize
    }
}

/// A metadata context this server offers (proto.md, "Metadata querying").
public enum NBDMetaContext: UInt32, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    /// `base:allocation`: bit 0 NBD_STATE_HOLE, bit 1 NBD_STATE_ZERO.
    case baseAllocation = 1
    /// `x-vbd:sharing`: bit 0 set where the range's storage is also held by another image of the
    /// same lineage (its snapshots and shares); never a signal about other tenants. See docs/NBD.md.
    case vbdSharing = 2

    /// The context id sent in `NBD_REP_META_CONTEXT` and in block status chunks; fixed per context.
    public var id: UInt32 { rawValue }

    public var name: String {
        switch self {
        case .baseAllocation: return "base:allocation"
        case .vbdSharing: return "x-vbd:sharing"
        }
    }

    public var description: String { name }

    /// The contexts a `NBD_OPT_LIST_META_CONTEXT` query selects: an exact name, or a namespace
    /// (`base:`, `x-vbd:`) for all contexts in it. Unknown namespaces select nothing.
    public static func listed(by query: String) -> [NBDMetaContext] {
        allCases.filter { context in
            context.name == query || (query.hasSuffix(":") && context.name.hasPrefix(query))
        }
    }

    /// The context a `NBD_OPT_SET_META_CONTEXT` query selects: exact names only.
    public static func selected(by query: String) -> NBDMetaContext? {
        allCases.first { $0.name == query }
    }
}

/// The outcome of a successful handshake: everything the transmission phase depends on.
public struct NBDNegotiatedExport: Sendable, Equatable {
    public var export: NBDExportDescription
    public var transmissionFlags: NBDTransmissionFlags
    public var structuredReplies: Bool
    public var metaContexts: [NBDMetaContext]
    /// Largest READ/WRITE length accepted (the advertised maximum block size).
    public var requestBytesMax: Int

    public init(export: NBDExportDescription, transmissionFlags: NBDTransmissionFlags, structuredReplies: Bool,
                metaContexts: [NBDMetaContext], requestBytesMax: Int) {
        self.export = export
        self.transmissionFlags = transmissionFlags
        self.structuredReplies = structuredReplies
        self.metaContexts = metaContexts
        self.requestBytesMax = requestBytesMax
    }

    /// The transmission flags this server advertises; each one is true of the implementation.
    ///
    /// - FLUSH, FUA: the device makes writes durable on request.
    /// - CAN_MULTI_CONN: every connection to an export shares one device whose flush covers writes
    ///   completed on all connections (``VBDCore/BlockDevice/flush()``).
    /// - TRIM, WRITE_ZEROES, FAST_ZERO: writable exports only; a read-only export answers the
    ///   commands with EPERM instead.
    /// - DF: only once structured replies are negotiated, as the spec requires.
    /// - CACHE: prefetch into the shared buffer cache.
    public static func transmissionFlags(readOnly: Bool, structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .canMultiConn, .sendCache]
        if readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendFUA, .sendTrim, .sendWriteZeroes, .sendFastZero])
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}
