// Wire constants of the NBD protocol. Every value cites its section of
// NetworkBlockDevice/nbd doc/proto.md ("Values", "Newstyle negotiation", "Transmission").

/// Magic numbers (proto.md, "Newstyle negotiation", "Request message", "Simple reply message",
/// "Structured reply chunk message").
public enum NBDMagic {
    /// `NBDMAGIC`: the first 8 bytes the server sends.
    public static let initPassword: UInt64 = 0x4e42_444d_4147_4943
    /// `IHAVEOPT`: the newstyle magic; also prefixes every option the client sends.
    public static let option: UInt64 = 0x4948_4156_454F_5054
    /// Prefixes every fixed-newstyle option reply.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    /// `NBD_REQUEST_MAGIC`.
    public static let request: UInt32 = 0x2560_9513
    /// `NBD_SIMPLE_REPLY_MAGIC`.
    public static let simpleReply: UInt32 = 0x6744_6698
    /// `NBD_STRUCTURED_REPLY_MAGIC`.
    public static let structuredReply: UInt32 = 0x668e_33ef
}

/// Handshake flags the server sends after the magics (proto.md, "Handshake flags").
public struct NBDHandshakeFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDHandshakeFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDHandshakeFlags(rawValue: 1 << 1)
}

/// Client flags (proto.md, "Client flags"). Unknown bits make the server drop the connection.
public struct NBDClientFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let fixedNewstyle = NBDClientFlags(rawValue: 1 << 0)
    public static let noZeroes = NBDClientFlags(rawValue: 1 << 1)
    /// Every flag this server understands.
    public static let known: NBDClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Transmission flags (proto.md, "Transmission flags"); 16 bits on the wire.
public struct NBDTransmissionFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = NBDTransmissionFlags(rawValue: 1 << 0)
    public static let readOnly = NBDTransmissionFlags(rawValue: 1 << 1)
    public static let sendFlush = NBDTransmissionFlags(rawValue: 1 << 2)
    public static let sendFUA = NBDTransmissionFlags(rawValue: 1 << 3)
    public static let rotational = NBDTransmissionFlags(rawValue: 1 << 4)
    public static let sendTrim = NBDTransmissionFlags(rawValue: 1 << 5)
    public static let sendWriteZeroes = NBDTransmissionFlags(rawValue: 1 << 6)
    public static let sendDF = NBDTransmissionFlags(rawValue: 1 << 7)
    public static let canMultiConn = NBDTransmissionFlags(rawValue: 1 << 8)
    public static let sendResize = NBDTransmissionFlags(rawValue: 1 << 9)
    public static let sendCache = NBDTransmissionFlags(rawValue: 1 << 10)
    public static let sendFastZero = NBDTransmissionFlags(rawValue: 1 << 11)
}

/// Option codes (proto.md, "Option types").
public enum NBDOptionCode {
    public static let exportName: UInt32 = 1
    public static let abort: UInt32 = 2
    public static let list: UInt32 = 3
    public static let peekExport: UInt32 = 4
    public static let startTLS: UInt32 = 5
    public static let info: UInt32 = 6
    public static let go: UInt32 = 7
    public static let structuredReply: UInt32 = 8
    /// 9 and 10 as in the current proto.md, libnbd and qemu (an older revision of proto.md listed
    /// 9 as the withdrawn NBD_OPT_BLOCK_SIZE and 10/11 for the meta context options).
    public static let listMetaContext: UInt32 = 9
    public static let setMetaContext: UInt32 = 10
    /// `NBD_OPT_EXTENDED_HEADERS`: not supported (see docs/NBD.md); answered with ERR_UNSUP.
    public static let extendedHeaders: UInt32 = 11
}

/// Option reply types (proto.md, "Option reply types"). Errors have bit 31 set.
public enum NBDOptionReplyType {
    public static let ack: UInt32 = 1
    public static let server: UInt32 = 2
    public static let info: UInt32 = 3
    public static let metaContext: UInt32 = 4
    public static let errUnsupported: UInt32 = 0x8000_0000 | 1
    public static let errPolicy: UInt32 = 0x8000_0000 | 2
    public static let errInvalid: UInt32 = 0x8000_0000 | 3
    public static let errPlatform: UInt32 = 0x8000_0000 | 4
    public static let errTLSRequired: UInt32 = 0x8000_0000 | 5
    public static let errUnknown: UInt32 = 0x8000_0000 | 6
    public static let errShutdown: UInt32 = 0x8000_0000 | 7
    public static let errBlockSizeRequired: UInt32 = 0x8000_0000 | 8
    public static let errTooBig: UInt32 = 0x8000_0000 | 9
}

/// Information types in `NBD_OPT_INFO` / `NBD_OPT_GO` (proto.md, INFO extension, "NBD_REP_INFO").
public enum NBDInfoType {
    public static let export: UInt16 = 0
    public static let name: UInt16 = 1
    public static let description: UInt16 = 2
    public static let blockSize: UInt16 = 3
}

/// Request types (proto.md, "Request types").
public enum NBDCommand: UInt16, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7

    public var description: String {
        switch self {
        case .read: return "READ"
        case .write: return "WRITE"
        case .disconnect: return "DISC"
        case .flush: return "FLUSH"
        case .trim: return "TRIM"
        case .cache: return "CACHE"
        case .writeZeroes: return "WRITE_ZEROES"
        case .blockStatus: return "BLOCK_STATUS"
        }
    }
}

/// Command flags (proto.md, "Command flags").
public struct NBDCommandFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = NBDCommandFlags(rawValue: 1 << 0)
    public static let noHole = NBDCommandFlags(rawValue: 1 << 1)
    public static let dontFragment = NBDCommandFlags(rawValue: 1 << 2)
    public static let requestOne = NBDCommandFlags(rawValue: 1 << 3)
    public static let fastZero = NBDCommandFlags(rawValue: 1 << 4)
}

/// Structured reply flags and chunk types (proto.md, "Structured reply flags/types").
public enum NBDStructuredReply {
    public static let flagDone: UInt16 = 1 << 0
    public static let typeNone: UInt16 = 0
    public static let typeOffsetData: UInt16 = 1
    public static let typeOffsetHole: UInt16 = 2
    public static let typeBlockStatus: UInt16 = 5
    public static let typeError: UInt16 = 0x8000 | 1
    public static let typeErrorOffset: UInt16 = 0x8000 | 2
}

/// Sizes of fixed wire structures, in bytes.
public enum NBDWireSize {
    /// Client flags: 32 bits.
    public static let clientFlags = 4
    /// Option header: magic (8) + option (4) + length (4).
    public static let optionHeader = 16
    /// Request header: magic (4) + flags (2) + type (2) + handle (8) + offset (8) + length (4).
    public static let requestHeader = 28
    /// Server greeting: NBDMAGIC (8) + IHAVEOPT (8) + handshake flags (2).
    public static let greeting = 18
    /// Zero padding after NBD_OPT_EXPORT_NAME's reply unless NO_ZEROES was negotiated.
    public static let exportNameZeroPadding = 124
    /// The protocol's upper bound for a string (export names, error messages, queries).
    public static let stringBytesMax = 4096
}
