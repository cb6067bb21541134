/// What the NBD server serves: a byte-addressed device backed by a volume or a snapshot.
///
/// ### Concurrency
/// Implementations are thread-safe: the server calls them from several threads at once.
/// Calls may block (disk I/O); callers keep them off event-loop threads.
///
/// ### Failure modes
/// Every method throws ``BlockDeviceError``; `BlockDeviceError.nbdErrno` maps it to the wire.
public protocol BlockDevice: AnyObject, Sendable {
    /// Export name: `VOLUME` or `VOLUME@SNAPSHOT`.
    var name: String { get }
    /// Human description shown by NBD_OPT_LIST / NBD_INFO_DESCRIPTION.
    var deviceDescription: String { get }
    /// Size in bytes.
    var size: UInt64 { get }
    /// Block size: the preferred I/O granularity; smaller I/O costs a read-modify-write.
    var blockSize: Int { get }
    var isReadOnly: Bool { get }

    /// Reads `buffer.count` bytes at `offset`.
    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws(BlockDeviceError)
    /// Reads as ``read(offset:into:)`` and adds to `sources` where each block came from, so the
    /// server can charge cache hits to the domain that asked (devices without a cache count nothing).
    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
              sources: inout ReadSources) throws(BlockDeviceError)
    /// Serves the read from memory at once, or returns nil (the caller then calls `read` on an
    /// I/O thread, which reports any error). With `zeroBlocksAllowed` false, a range holding any
    /// unallocated or zero block also returns nil (a caller that describes those as holes wants
    /// the ordinary path). Must never block on I/O or wait long for a lock: event loops call it.
    /// The default serves nothing.
    func readIfCached(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, zeroBlocksAllowed: Bool) -> ReadSources?
    /// Reads as ``read(offset:into:sources:)`` and returns the byte ranges of `buffer` that hold no
    /// stored data (unwritten or zeroed blocks; they read as zeroes), ascending and merged, so a
    /// reply can describe them as holes without asking for extents first (one walk of the map,
    /// not two). Returns nil, having read nothing, when the device cannot say; the default.
    func readReportingZeroes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                             sources: inout ReadSources) throws(BlockDeviceError) -> [Range<Int>]?
    /// ``readIfCached(offset:into:zeroBlocksAllowed:)`` with zero blocks allowed and reported as
    /// ``readReportingZeroes(offset:into:sources:)`` reports them. The default serves nothing.
    func readIfCachedReportingZeroes(offset: UInt64,
                                     into buffer: UnsafeMutableRawBufferPointer) -> (ReadSources, zeroRanges: [Range<Int>])?
    /// Writes `data` at `offset`. With `fua`, the write is durable when this returns.
    func write(offset: UInt64, data: UnsafeRawBufferPointer, fua: Bool) throws(BlockDeviceError)
    /// Does a small write at once on the calling thread and returns true, or returns false having
    /// changed nothing when it could block: a busy store lock, a flush or read-modify-write it
    /// would need, or a size above what the device takes this way (the caller then calls `write`
    /// on an I/O thread, which reports any error). Never FUA. Event loops call it, like
    /// ``readIfCached(offset:into:zeroBlocksAllowed:)``. The default takes nothing.
    func writeWithoutBlocking(offset: UInt64, data: UnsafeRawBufferPointer) throws(BlockDeviceError) -> Bool
    /// Discards a range: afterwards it reads as zeroes and whole blocks free their storage.
    func trim(offset: UInt64, length: UInt64, fua: Bool) throws(BlockDeviceError)
    /// Makes a range read as zeroes. With `mayTrim` whole blocks become holes; with `fastOnly` the call
    /// throws `.notSupported` instead of doing slow work (NBD_CMD_FLAG_FAST_ZERO).
    func writeZeroes(offset: UInt64, length: UInt64, mayTrim: Bool, fastOnly: Bool, fua: Bool) throws(BlockDeviceError)
    /// Makes every write completed before this call durable, on every connection (CAN_MULTI_CONN).
    func flush() throws(BlockDeviceError)
    /// Loads a range into the cache (NBD_CMD_CACHE).
    func prefetch(offset: UInt64, length: UInt64) throws(BlockDeviceError)
    /// Describes `[offset, offset+length)` as consecutive extents, merged where flags agree.
    /// Returns at most `maxExtents` extents; they may cover less than the whole range.
    func extents(offset: UInt64, length: UInt64, maxExtents: Int) throws(BlockDeviceError) -> [Extent]
}

extension BlockDevice {
    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                     sources: inout ReadSources) throws(BlockDeviceError) {
        try read(offset: offset, into: buffer)
    }

    public func readIfCached(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                             zeroBlocksAllowed: Bool) -> ReadSources? { nil }

    public func writeWithoutBlocking(offset: UInt64, data: UnsafeRawBufferPointer) throws(BlockDeviceError) -> Bool {
        false
    }

    public func readReportingZeroes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer,
                                    sources: inout ReadSources) throws(BlockDeviceError) -> [Range<Int>]? {
        nil
    }

    public func readIfCachedReportingZeroes(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer)
        -> (ReadSources, zeroRanges: [Range<Int>])? {
        nil
    }
}

/// Where the blocks of a read came from: counted per block (a block read only in part counts once).
public struct ReadSources: Equatable, Sendable {
    /// Served from the universal buffer cache.
    public var cacheHits: UInt64 = 0
    /// Served from the compressed last-chance tier (and promoted back to the main cache).
    public var lastChanceHits: UInt64 = 0
    /// Read from the data file and verified.
    public var diskReads: UInt64 = 0

    public init(cacheHits: UInt64 = 0, lastChanceHits: UInt64 = 0, diskReads: UInt64 = 0) {
        self.cacheHits = cacheHits
        self.lastChanceHits = lastChanceHits
        self.diskReads = diskReads
    }

    public static func += (lhs: inout ReadSources, rhs: ReadSources) {
        lhs.cacheHits += rhs.cacheHits
        lhs.lastChanceHits += rhs.lastChanceHits
        lhs.diskReads += rhs.diskReads
    }
}

/// One run of bytes with the same allocation state.
public struct Extent: Equatable, Sendable {
    public var length: UInt64
    public var flags: ExtentFlags

    public init(length: UInt64, flags: ExtentFlags) {
        self.length = length
        self.flags = flags
    }
}

public struct ExtentFlags: OptionSet, Hashable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// Unallocated: no storage behind it (NBD_STATE_HOLE).
    public static let hole = ExtentFlags(rawValue: 1 << 0)
    /// Reads as zeroes (NBD_STATE_ZERO).
    public static let zero = ExtentFlags(rawValue: 1 << 1)
    /// Its storage is also held by another image of the same lineage (the `x-vbd:sharing` context).
    public static let shared = ExtentFlags(rawValue: 1 << 2)
}

/// Errors a block device reports; each maps to one NBD error number.
public enum BlockDeviceError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The request reaches past the end of the device.
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    /// A write, trim or zero on a read-only export (a snapshot).
    case readOnly(name: String)
    /// The store cannot hold more data.
    case noSpace
    /// A block failed verification against its content hash: reported, never returned as data.
    case corrupted(volume: String, offset: UInt64, detail: String)
    /// Any other I/O failure.
    case io(String)
    /// The operation cannot be done as asked (for example a FAST_ZERO that would not be fast).
    case notSupported(String)
    /// A malformed argument.
    case invalid(String)
    /// The volume or snapshot no longer exists, or the device was closed.
    case gone(String)

    public var description: String {
        switch self {
        case let .outOfRange(offset, length, size):
            return "request [\(offset), +\(length)) is out of range for a device of \(size) bytes"
        case let .readOnly(name): return "\(name) is read-only"
        case .noSpace: return "no space left in the store"
        case let .corrupted(volume, offset, detail):
            return "corrupt block in \(volume) at byte offset \(offset): \(detail)"
        case let .io(detail): return "I/O error: \(detail)"
        case let .notSupported(detail): return "not supported: \(detail)"
        case let .invalid(detail): return "invalid request: \(detail)"
        case let .gone(detail): return "gone: \(detail)"
        }
    }

    /// The Linux errno the NBD protocol carries for this error (proto.md, "Error values").
    public var errnoValue: Int32 {
        switch self {
        case .outOfRange, .invalid: return 22   // EINVAL
        case .readOnly: return 1                // EPERM
        case .noSpace: return 28                // ENOSPC
        case .corrupted, .io, .gone: return 5   // EIO
        case .notSupported: return 95           // ENOTSUP (NBD_ENOTSUP)
        }
    }
}

/// Where the NBD server finds its exports.
public protocol ExportProvider: AnyObject, Sendable {
    /// Every export a client may open, with its description, for NBD_OPT_LIST.
    func exportList() -> [ExportSummary]
    /// Opens an export by name (`VOLUME` read-write, `VOLUME@SNAPSHOT` read-only).
    /// The empty name selects the default export, if there is one.
    func openExport(named name: String) throws(BlockDeviceError) -> any BlockDevice
}

public struct ExportSummary: Equatable, Sendable {
    public var name: String
    public var description: String
    public init(name: String, description: String) {
        self.name = name
        self.description = description
    }
}
