/// The vhost-user wire format (QEMU docs/interop/vhost-user.rst): a 12-byte header (request, flags,
/// payload size, little-endian) and a payload whose layout depends on the request. Every decoder
/// checks the payload's exact length and every value; a violation is a ``VhostUserProtocolError``,
/// after which the connection closes (the front end is broken or hostile, and nothing it sent
/// later can be trusted).

/// The requests a front end sends (the numbers are the wire's).
public enum VhostUserRequest: UInt32, Sendable, CaseIterable {
    case getFeatures = 1
    case setFeatures = 2
    case setOwner = 3
    case resetOwner = 4
    case setMemTable = 5
    case setLogBase = 6
    case setLogFD = 7
    case setVringNum = 8
    case setVringAddr = 9
    case setVringBase = 10
    case getVringBase = 11
    case setVringKick = 12
    case setVringCall = 13
    case setVringErr = 14
    case getProtocolFeatures = 15
    case setProtocolFeatures = 16
    case getQueueNum = 17
    case setVringEnable = 18
    case sendRARP = 19
    case netSetMTU = 20
    case setBackendReqFD = 21
    case iotlbMessage = 22
    case setVringEndian = 23
    case getConfig = 24
    case setConfig = 25
    case getInflightFD = 31
    case setInflightFD = 32
    case resetDevice = 34
    case vringKick = 35
    case getMaxMemSlots = 36
    case addMemReg = 37
    case remMemReg = 38
}

/// The header's flags word: bits 0-1 the protocol version (always 1), bit 2 a reply, bit 3 "the
/// sender wants a reply" (with REPLY_ACK negotiated, also for requests that have none of their own).
public struct VhostUserFlags: OptionSet, Sendable, Equatable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let version1 = VhostUserFlags(rawValue: 0x1)
    public static let reply = VhostUserFlags(rawValue: 0x4)
    public static let needReply = VhostUserFlags(rawValue: 0x8)
    static let versionMask: UInt32 = 0x3
    static let known: UInt32 = 0x3 | 0x4 | 0x8
}

public struct VhostUserHeader: Equatable, Sendable {
    public static let byteCount = 12
    public var request: UInt32
    public var flags: VhostUserFlags
    public var size: UInt32

    public init(request: UInt32, flags: VhostUserFlags, size: UInt32) {
        self.request = request
        self.flags = flags
        self.size = size
    }

    /// Decodes and checks a header: version 1, no unknown flag bits, a payload no larger than `payloadBytesMax`.
    public static func decode(_ bytes: some Collection<UInt8>, payloadBytesMax: Int = VhostUserLimits.payloadBytesMax) throws(VhostUserProtocolError) -> VhostUserHeader {
        guard bytes.count == byteCount else { throw .truncated(what: "header", expected: byteCount, got: bytes.count) }
        var reader = ByteReader(Array(bytes))
        let request = reader.u32(), flags = reader.u32(), size = reader.u32()
        guard flags & VhostUserFlags.versionMask == 1 else { throw .badVersion(flags & VhostUserFlags.versionMask) }
        guard flags & ~VhostUserFlags.known == 0 else { throw .unknownFlags(flags) }
        guard flags & VhostUserFlags.reply.rawValue == 0 else { throw .unexpectedReply(request: request) }
        guard size <= payloadBytesMax else { throw .payloadTooLarge(request: request, size: size, max: payloadBytesMax) }
        return VhostUserHeader(request: request, flags: VhostUserFlags(rawValue: flags), size: size)
    }

    public func encoded() -> [UInt8] {
        var writer = ByteWriter()
        writer.u32(request); writer.u32(flags.rawValue); writer.u32(size)
        return writer.bytes
    }
}

public enum VhostUserLimits {
    /// The largest payload any request we accept carries: GET/SET_CONFIG's 12-byte header and 256
    /// config bytes (VHOST_USER_MAX_CONFIG_SIZE); SET_MEM_TABLE's 8 regions take 8 + 8*32 = 264.
    public static let payloadBytesMax = 12 + configBytesMax
    public static let configBytesMax = 256
    /// Memory regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS), and so fds per message.
    public static let memoryRegionsMax = 8
    /// Largest virtqueue the split ring format allows (virtio 1.2 2.7: Queue Size at most 32768).
    public static let queueSizeMax: UInt32 = 32768
}

public enum VhostUserProtocolError: Error, Equatable, Sendable, CustomStringConvertible {
    case truncated(what: String, expected: Int, got: Int)
    case badVersion(UInt32)
    case unknownFlags(UInt32)
    case unexpectedReply(request: UInt32)
    case payloadTooLarge(request: UInt32, size: UInt32, max: Int)
    case unknownRequest(UInt32)
    case badPayloadSize(request: VhostUserRequest, size: Int, expected: String)
    case invalid(request: VhostUserRequest, detail: String)
    case unexpectedFileDescriptors(request: VhostUserRequest, count: Int)
    case missingFileDescriptor(request: VhostUserRequest, expected: Int, got: Int)
    case connection(String)

    public var description: String {
        switch self {
        case let .truncated(what, expected, got): return "truncated \(what): \(got) of \(expected) bytes"
        case let .badVersion(v): return "protocol version \(v), expected 1"
        case let .unknownFlags(f): return "unknown header flags 0x\(String(f, radix: 16))"
        case let .unexpectedReply(r): return "request \(r) arrived with the reply flag set"
        case let .payloadTooLarge(r, size, max): return "request \(r) announces a \(size)-byte payload (at most \(max))"
        case let .unknownRequest(r): return "unsupported request \(r)"
        case let .badPayloadSize(r, size, expected): return "\(r): payload of \(size) bytes, expected \(expected)"
        case let .invalid(r, detail): return "\(r): \(detail)"
        case let .unexpectedFileDescriptors(r, n): return "\(r) carries \(n) file descriptors, expected none"
        case let .missingFileDescriptor(r, expected, got): return "\(r) carries \(got) file descriptors, expected \(expected)"
        case let .connection(detail): return detail
        }
    }
}

/// One guest memory region of SET_MEM_TABLE: guest-physical address, size, the front end's
/// (QEMU's) virtual address of it, and where it starts in the file descriptor passed with it.
public struct VhostUserMemoryRegion: Equatable, Sendable {
    public static let byteCount = 32
    public var guestPhysicalAddress: UInt64
    public var size: UInt64
    public var userAddress: UInt64
    public var mmapOffset: UInt64
    public init(guestPhysicalAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
        self.guestPhysicalAddress = guestPhysicalAddress
        self.size = size
        self.userAddress = userAddress
        self.mmapOffset = mmapOffset
    }
}

/// SET_VRING_ADDR: the three rings' addresses in the front end's address space (or guest-physical
/// with `logEnabled`... which is only about dirty logging, not offered here).
public struct VhostUserVringAddress: Equatable, Sendable {
    public static let byteCount = 40
    public var index: UInt32
    public var flags: UInt32
    public var descriptorTable: UInt64
    public var usedRing: UInt64
    public var availableRing: UInt64
    public var log: UInt64
    public init(index: UInt32, flags: UInt32, descriptorTable: UInt64, usedRing: UInt64, availableRing: UInt64, log: UInt64) {
        self.index = index
        self.flags = flags
        self.descriptorTable = descriptorTable
        self.usedRing = usedRing
        self.availableRing = availableRing
        self.log = log
    }
}

/// GET_CONFIG / SET_CONFIG: a window of the device's config space.
public struct VhostUserConfigAccess: Equatable, Sendable {
    public var offset: UInt32
    public var size: UInt32
    public var flags: UInt32
    public var bytes: [UInt8]
}

/// GET_INFLIGHT_FD / SET_INFLIGHT_FD's "inflight description": the area's size and offset in its
/// fd, and the queues and queue size it tracks (24 bytes with the C struct's tail padding).
public struct VhostUserInflight: Equatable, Sendable {
    public static let byteCount = 24
    public var mmapSize: UInt64
    public var mmapOffset: UInt64
    public var queueCount: UInt16
    public var queueSize: UInt16
    public init(mmapSize: UInt64, mmapOffset: UInt64, queueCount: UInt16, queueSize: UInt16) {
        self.mmapSize = mmapSize
        self.mmapOffset = mmapOffset
        self.queueCount = queueCount
        self.queueSize = queueSize
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.u64(mmapSize); w.u64(mmapOffset); w.u16(queueCount); w.u16(queueSize); w.u32(0)
        return w.bytes
    }
}

/// A decoded request: the payload checked against the request's layout.
public enum VhostUserMessage: Equatable, Sendable {
    case getFeatures
    case setFeatures(UInt64)
    case getProtocolFeatures
    case setProtocolFeatures(UInt64)
    case setOwner
    case resetOwner
    case setMemTable([VhostUserMemoryRegion])
    case setVringNum(index: UInt32, num: UInt32)
    case setVringAddr(VhostUserVringAddress)
    case setVringBase(index: UInt32, num: UInt32)
    case getVringBase(index: UInt32)
    /// KICK / CALL / ERR: `hasDescriptor` false when the front end set the "no fd, poll" bit.
    case setVringKick(index: UInt32, hasDescriptor: Bool)
    case setVringCall(index: UInt32, hasDescriptor: Bool)
    case setVringErr(index: UInt32, hasDescriptor: Bool)
    case getQueueNum
    case setVringEnable(index: UInt32, enabled: Bool)
    case getConfig(VhostUserConfigAccess)
    case setConfig(VhostUserConfigAccess)
    case getMaxMemSlots
    case getInflightFD(VhostUserInflight)
    case setInflightFD(VhostUserInflight)

    /// Decodes `payload` for `header`, checking the number of file descriptors that came with it.
    public static func decode(header: VhostUserHeader, payload: [UInt8], fileDescriptorCount fds: Int) throws(VhostUserProtocolError) -> VhostUserMessage {
        guard let request = VhostUserRequest(rawValue: header.request) else { throw .unknownRequest(header.request) }
        guard payload.count == Int(header.size) else {
            throw .truncated(what: "\(request) payload", expected: Int(header.size), got: payload.count)
        }
        var reader = ByteReader(payload)
        func exactly(_ n: Int) throws(VhostUserProtocolError) {
            guard payload.count == n else { throw .badPayloadSize(request: request, size: payload.count, expected: "\(n)") }
        }
        func noDescriptors() throws(VhostUserProtocolError) {
            guard fds == 0 else { throw .unexpectedFileDescriptors(request: request, count: fds) }
        }
        func vringFile() throws(VhostUserProtocolError) -> (UInt32, Bool) {
            try exactly(8)
            let value = reader.u64()
            let noFD: UInt64 = 1 << 8
            guard value & ~(noFD | 0xff) == 0 else {
                throw .invalid(request: request, detail: "unknown bits in 0x\(String(value, radix: 16))")
            }
            let has = value & noFD == 0
            guard fds == (has ? 1 : 0) else {
                if has { throw .missingFileDescriptor(request: request, expected: 1, got: fds) }
                throw .unexpectedFileDescriptors(request: request, count: fds)
            }
            return (UInt32(value & 0xff), has)
        }
        func config() throws(VhostUserProtocolError) -> VhostUserConfigAccess {
            guard payload.count >= 12 else { throw .badPayloadSize(request: request, size: payload.count, expected: "at least 12") }
            let offset = reader.u32(), size = reader.u32(), flags = reader.u32()
            guard size <= VhostUserLimits.configBytesMax, UInt64(offset) + UInt64(size) <= UInt64(VhostUserLimits.configBytesMax) else {
                throw .invalid(request: request, detail: "config window [\(offset), +\(size)) outside the \(VhostUserLimits.configBytesMax)-byte config space")
            }
            guard payload.count == 12 + Int(size) else {
                throw .badPayloadSize(request: request, size: payload.count, expected: "12 + \(size)")
            }
            return VhostUserConfigAccess(offset: offset, size: size, flags: flags, bytes: reader.bytes(Int(size)))
        }
        switch request {
        case .getFeatures, .getProtocolFeatures, .getQueueNum, .getMaxMemSlots, .setOwner, .resetOwner:
            // These carry no payload; QEMU sends GET_* with size 0 (some front ends send a zero u64).
            guard payload.isEmpty || payload.count == 8 else { throw .badPayloadSize(request: request, size: payload.count, expected: "0 or 8") }
            try noDescriptors()
            switch request {
            case .getFeatures: return .getFeatures
            case .getProtocolFeatures: return .getProtocolFeatures
            case .getQueueNum: return .getQueueNum
            case .getMaxMemSlots: return .getMaxMemSlots
            case .setOwner: return .setOwner
            default: return .resetOwner
            }
        case .setFeatures, .setProtocolFeatures:
            try exactly(8); try noDescriptors()
            let value = reader.u64()
            return request == .setFeatures ? .setFeatures(value) : .setProtocolFeatures(value)
        case .setMemTable:
            guard payload.count >= 8 else { throw .badPayloadSize(request: request, size: payload.count, expected: "at least 8") }
            let count = reader.u32()
            _ = reader.u32()   // padding
            guard (1...UInt32(VhostUserLimits.memoryRegionsMax)).contains(count) else {
                throw .invalid(request: request, detail: "\(count) regions (1...\(VhostUserLimits.memoryRegionsMax))")
            }
            try exactly(8 + Int(count) * VhostUserMemoryRegion.byteCount)
            guard fds == Int(count) else { throw .missingFileDescriptor(request: request, expected: Int(count), got: fds) }
            var regions: [VhostUserMemoryRegion] = []
            for _ in 0..<count {
                let region = VhostUserMemoryRegion(guestPhysicalAddress: reader.u64(), size: reader.u64(),
                                                   userAddress: reader.u64(), mmapOffset: reader.u64())
                guard region.size > 0 else { throw .invalid(request: request, detail: "a region of size 0") }
                let (_, gpaOverflow) = region.guestPhysicalAddress.addingReportingOverflow(region.size)
                let (_, uaOverflow) = region.userAddress.addingReportingOverflow(region.size)
                let (_, mmapOverflow) = region.mmapOffset.addingReportingOverflow(region.size)
                guard !gpaOverflow, !uaOverflow, !mmapOverflow, region.mmapOffset <= UInt64(Int.max),
                      region.size <= UInt64(Int.max) - region.mmapOffset else {
                    throw .invalid(request: request, detail: "region [0x\(String(region.guestPhysicalAddress, radix: 16)), +0x\(String(region.size, radix: 16))) wraps the address space")
                }
                regions.append(region)
            }
            return .setMemTable(regions)
        case .setVringNum, .setVringBase, .getVringBase, .setVringEnable:
            try exactly(8); try noDescriptors()
            let index = reader.u32(), num = reader.u32()
            switch request {
            case .setVringNum: return .setVringNum(index: index, num: num)
            case .setVringBase: return .setVringBase(index: index, num: num)
            case .getVringBase: return .getVringBase(index: index)
            default:
                guard num <= 1 else { throw .invalid(request: request, detail: "enable value \(num), expected 0 or 1") }
                return .setVringEnable(index: index, enabled: num == 1)
            }
        case .setVringAddr:
            try exactly(VhostUserVringAddress.byteCount); try noDescriptors()
            return .setVringAddr(VhostUserVringAddress(index: reader.u32(), flags: reader.u32(), descriptorTable: reader.u64(),
                                                       usedRing: reader.u64(), availableRing: reader.u64(), log: reader.u64()))
        case .setVringKick:
            let (index, has) = try vringFile(); return .setVringKick(index: index, hasDescriptor: has)
        case .setVringCall:
            let (index, has) = try vringFile(); return .setVringCall(index: index, hasDescriptor: has)
        case .setVringErr:
            let (index, has) = try vringFile(); return .setVringErr(index: index, hasDescriptor: has)
        case .getConfig:
            try noDescriptors(); return .getConfig(try config())
        case .setConfig:
            try noDescriptors(); return .setConfig(try config())
        case .getInflightFD, .setInflightFD:
            try exactly(VhostUserInflight.byteCount)
            let inflight = VhostUserInflight(mmapSize: reader.u64(), mmapOffset: reader.u64(), queueCount: reader.u16(), queueSize: reader.u16())
            guard inflight.queueCount > 0, inflight.queueSize > 0, inflight.queueSize & (inflight.queueSize - 1) == 0 else {
                throw .invalid(request: request, detail: "\(inflight.queueCount) queues of size \(inflight.queueSize) (a power of two)")
            }
            if request == .getInflightFD {
                try noDescriptors()
                return .getInflightFD(inflight)
            }
            guard fds == 1 else { throw .missingFileDescriptor(request: request, expected: 1, got: fds) }
            return .setInflightFD(inflight)
        default:
            throw .unknownRequest(header.request)
        }
    }
}

/// Encodes a reply: the request's number, version 1 with the reply flag, and the payload.
public func vhostUserReply(to request: UInt32, payload: [UInt8]) -> [UInt8] {
    VhostUserHeader(request: request, flags: [.version1, .reply], size: UInt32(payload.count)).encoded() + payload
}

public func vhostUserU64(_ value: UInt64) -> [UInt8] {
    var writer = ByteWriter(); writer.u64(value); return writer.bytes
}

public func vhostUserVringState(index: UInt32, num: UInt32) -> [UInt8] {
    var writer = ByteWriter(); writer.u32(index); writer.u32(num); return writer.bytes
}

/// Little-endian readers over a buffer whose length the caller has already checked.
struct ByteReader {
    private let bytes: [UInt8]
    private(set) var position = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    mutating func u16() -> UInt16 { UInt16(truncatingIfNeeded: uint(2)) }
    mutating func u32() -> UInt32 { UInt32(truncatingIfNeeded: uint(4)) }
    mutating func u64() -> UInt64 { uint(8) }
    mutating func bytes(_ n: Int) -> [UInt8] {
        defer { position += n }
        return Array(bytes[position..<position + n])
    }
    private mutating func uint(_ n: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<n { value |= UInt64(bytes[position + i]) << (8 * UInt64(i)) }
        position += n
        return value
    }
}

public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { append(UInt64(v), 2) }
    public mutating func u32(_ v: UInt32) { append(UInt64(v), 4) }
    public mutating func u64(_ v: UInt64) { append(v, 8) }
    public mutating func append(_ other: [UInt8]) { bytes += other }
    private mutating func append(_ v: UInt64, _ n: Int) {
        for i in 0..<n { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
    }
}
