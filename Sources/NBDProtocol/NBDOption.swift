import NIOCore

/// An export name plus the information types a client asked for (`NBD_OPT_INFO` / `NBD_OPT_GO`).
public struct NBDExportQuery: Sendable, Equatable {
    public var name: String
    public var informationRequests: [UInt16]
    public init(name: String, informationRequests: [UInt16]) {
        self.name = name
        self.informationRequests = informationRequests
    }
}

/// A parsed handshake option (proto.md, "Option types").
public enum NBDOption: Sendable, Equatable {
    case exportName(String)
    case abort
    case list
    case startTLS
    case info(NBDExportQuery)
    case go(NBDExportQuery)
    case structuredReply
    case listMetaContext(exportName: String, queries: [String])
    case setMetaContext(exportName: String, queries: [String])
    /// An option this server does not implement: answered with `NBD_REP_ERR_UNSUP`.
    case unsupported(code: UInt32)
    /// A known option whose payload does not have the documented layout: `NBD_REP_ERR_INVALID`.
    case malformed(code: UInt32, reason: String)

    /// The option code this value answers to.
    public var code: UInt32 {
        switch self {
        case .exportName: return NBDOptionCode.exportName
        case .abort: return NBDOptionCode.abort
        case .list: return NBDOptionCode.list
        case .startTLS: return NBDOptionCode.startTLS
        case .info: return NBDOptionCode.info
        case .go: return NBDOptionCode.go
        case .structuredReply: return NBDOptionCode.structuredReply
        case .listMetaContext: return NBDOptionCode.listMetaContext
        case .setMetaContext: return NBDOptionCode.setMetaContext
        case .unsupported(let code), .malformed(let code, _): return code
        }
    }

    /// Parses one option's payload. Never traps on hostile input: every length is checked against
    /// the bytes actually present.
    public init(code: UInt32, payload: ByteBuffer) {
        var payload = payload
        switch code {
        case NBDOptionCode.exportName:
            guard let name = Self.readString(&payload, length: payload.readableBytes) else {
                self = .malformed(code: code, reason: "export name is not valid UTF-8 or too long")
                return
            }
            self = .exportName(name)
        case NBDOptionCode.abort, NBDOptionCode.list, NBDOptionCode.startTLS, NBDOptionCode.structuredReply:
            guard payload.readableBytes == 0 else {
                self = .malformed(code: code, reason: "option takes no data")
                return
            }
            switch code {
            case NBDOptionCode.abort: self = .abort
            case NBDOptionCode.list: self = .list
            case NBDOptionCode.startTLS: self = .startTLS
            default: self = .structuredReply
            }
        case NBDOptionCode.info, NBDOptionCode.go:
            guard let nameLength = payload.readInteger(as: UInt32.self),
                  let name = Self.readString(&payload, length: Int(nameLength)),
                  let count = payload.readInteger(as: UInt16.self),
                  payload.readableBytes == Int(count) * 2
            else {
                self = .malformed(code: code, reason: "bad NBD_OPT_INFO/GO layout")
                return
            }
            var requests: [UInt16] = []
            requests.reserveCapacity(Int(count))
            for _ in 0..<count { requests.append(payload.readInteger(as: UInt16.self)!) }
            let query = NBDExportQuery(name: name, informationRequests: requests)
            self = code == NBDOptionCode.info ? .info(query) : .go(query)
        case NBDOptionCode.listMetaContext, NBDOptionCode.setMetaContext:
            guard let nameLength = payload.readInteger(as: UInt32.self),
                  let name = Self.readString(&payload, length: Int(nameLength)),
                  let count = payload.readInteger(as: UInt32.self)
            else {
                self = .malformed(code: code, reason: "bad meta context option layout")
                return
            }
            var queries: [String] = []
            // Each query needs at least 4 bytes, so `count` cannot exceed what the payload (already
            // bounded by the option limit) holds; checking first keeps a hostile count from looping.
            guard UInt64(count) * 4 <= UInt64(payload.readableBytes) else {
                self = .malformed(code: code, reason: "query count exceeds the data")
                return
            }
            for _ in 0..<count {
                guard let length = payload.readInteger(as: UInt32.self),
                      let query = Self.readString(&payload, length: Int(length))
                else {
                    self = .malformed(code: code, reason: "bad meta context query")
                    return
                }
                queries.append(query)
            }
            guard payload.readableBytes == 0 else {
                self = .malformed(code: code, reason: "trailing bytes after the queries")
                return
            }
            self = code == NBDOptionCode.listMetaContext
                ? .listMetaContext(exportName: name, queries: queries)
                : .setMetaContext(exportName: name, queries: queries)
        default:
            self = .unsupported(code: code)
        }
    }

    /// Reads a protocol string: UTF-8, no NUL, at most 4096 bytes (proto.md, "Conventions").
    private static func readString(_ buffer: inout ByteBuffer, length: Int) -> String? {
        guard length >= 0, length <= NBDWireSize.stringBytesMax, length <= buffer.readableBytes,
              let bytes = buffer.readBytes(length: length),
              !bytes.contains(0)
        else { return nil }
        return String(validating: bytes, as: UTF8.self)
    }
}

/// One fixed-newstyle option reply (proto.md, "Fixed newstyle negotiation").
public struct NBDOptionReply: Sendable, Equatable {
    public var option: UInt32
    public var type: UInt32
    public var payload: [UInt8]

    public init(option: UInt32, type: UInt32, payload: [UInt8] = []) {
        self.option = option
        self.type = type
        self.payload = payload
    }

    public var isError: Bool { type & 0x8000_0000 != 0 }

    public static func ack(_ option: UInt32) -> NBDOptionReply {
        NBDOptionReply(option: option, type: NBDOptionReplyType.ack)
    }

    /// An error reply carrying a human-readable message (proto.md: "All error replies MAY have
    /// some data set ... an error message string").
    public static func error(_ option: UInt32, _ type: UInt32, _ message: String) -> NBDOptionReply {
        NBDOptionReply(option: option, type: type, payload: Array(message.utf8.prefix(NBDWireSize.stringBytesMax)))
    }

    /// `NBD_REP_SERVER`: 32-bit name length, name, then the description for humans.
    public static func server(_ option: UInt32, name: String, description: String) -> NBDOptionReply {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(UInt32(name.utf8.count))
        bytes.append(contentsOf: name.utf8)
        bytes.append(contentsOf: description.utf8.prefix(NBDWireSize.stringBytesMax))
        return NBDOptionReply(option: option, type: NBDOptionReplyType.server, payload: bytes)
    }

    /// `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags.
    public static func infoExport(_ option: UInt32, size: UInt64, flags: NBDTransmissionFlags) -> NBDOptionReply {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(NBDInfoType.export)
        bytes.appendBigEndian(size)
        bytes.appendBigEndian(flags.rawValue)
        return NBDOptionReply(option: option, type: NBDOptionReplyType.info, payload: bytes)
    }

    /// `NBD_REP_INFO` / `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: a string.
    public static func infoString(_ option: UInt32, infoType: UInt16, _ text: String) -> NBDOptionReply {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(infoType)
        bytes.append(contentsOf: text.utf8.prefix(NBDWireSize.stringBytesMax))
        return NBDOptionReply(option: option, type: NBDOptionReplyType.info, payload: bytes)
    }

    /// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    public static func infoBlockSize(_ option: UInt32, minimum: UInt32, preferred: UInt32,
                                     maximum: UInt32) -> NBDOptionReply {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(NBDInfoType.blockSize)
        bytes.appendBigEndian(minimum)
        bytes.appendBigEndian(preferred)
        bytes.appendBigEndian(maximum)
        return NBDOptionReply(option: option, type: NBDOptionReplyType.info, payload: bytes)
    }

    /// `NBD_REP_META_CONTEXT`: context id and name.
    public static func metaContext(_ option: UInt32, id: UInt32, name: String) -> NBDOptionReply {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(id)
        bytes.append(contentsOf: name.utf8)
        return NBDOptionReply(option: option, type: NBDOptionReplyType.metaContext, payload: bytes)
    }

    /// Writes the reply in wire format.
    public func encode(into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.optionReply)
        buffer.writeInteger(option)
        buffer.writeInteger(type)
        buffer.writeInteger(UInt32(payload.count))
        buffer.writeBytes(payload)
    }
}

extension Array where Element == UInt8 {
    mutating func appendBigEndian<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.bigEndian) { append(contentsOf: $0) }
    }
}
