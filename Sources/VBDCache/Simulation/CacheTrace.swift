/// A block-request trace recorded from real NBD clients (scripts/record-cache-trace.sh), with the
/// content identity and LZ4 size of every block so that replays can deduplicate and size the
/// last-chance tier without the data. The format is described in scripts/cache-trace.py.
///
/// The file is untrusted input: every count and index is checked against the file size and the device.
public struct CacheTrace: Sendable {
    public struct Record: Hashable, Sendable {
        public var firstBlock: Int
        public var blockCount: Int
        public var isWrite: Bool
    }

    public let blockBytes: Int
    /// Content id of every device block's final contents: 0 for an all-zero block, else 1...contentCount.
    public let blockContent: [UInt32]
    /// LZ4 size of content id `i + 1`.
    public let compressedBytes: [UInt16]
    public let records: [Record]

    /// Largest trace accepted: 64 MiB (the committed one is ~270 KiB).
    public static let fileBytesMax = 64 << 20

    public init(bytes: [UInt8]) throws(CacheTraceError) {
        guard bytes.count <= Self.fileBytesMax else { throw .malformed("larger than \(Self.fileBytesMax) bytes") }
        var reader = LittleEndianReader(bytes: bytes)
        guard reader.take(8) == Array("VBDTRACE".utf8) else { throw .malformed("bad magic") }
        let version = try reader.u32()
        guard version == 1 else { throw .malformed("unknown version \(version)") }
        blockBytes = Int(try reader.u32())
        guard blockBytes == 4096 else { throw .malformed("block size \(blockBytes), expected 4096") }
        let deviceBlocks = Int(try reader.u32()), contentCount = Int(try reader.u32())
        let recordCount = Int(try reader.u32())
        guard reader.remaining == deviceBlocks * 4 + contentCount * 2 + recordCount * 8 else {
            throw .malformed("sizes in the header do not match the file length")
        }
        var blockContent: [UInt32] = []
        blockContent.reserveCapacity(deviceBlocks)
        for _ in 0..<deviceBlocks {
            let id = try reader.u32()
            guard id <= contentCount else { throw .malformed("content id \(id) > \(contentCount)") }
            blockContent.append(id)
        }
        var compressedBytes: [UInt16] = []
        for _ in 0..<contentCount { compressedBytes.append(try reader.u16()) }
        var records: [Record] = []
        records.reserveCapacity(recordCount)
        for _ in 0..<recordCount {
            let first = Int(try reader.u32()), packed = try reader.u32()
            let count = Int(packed >> 1)
            guard count > 0, first + count <= deviceBlocks else { throw .malformed("record outside the device") }
            records.append(Record(firstBlock: first, blockCount: count, isWrite: packed & 1 == 1))
        }
        self.blockContent = blockContent
        self.compressedBytes = compressedBytes
        self.records = records
    }

    /// The trace as per-block requests keyed by content id (blocks of equal content share a key, as
    /// chunk keys do in the deduplicating store). All-zero blocks are left out: the store never
    /// stores or caches them.
    public func requests() -> [CacheRequest] {
        var requests: [CacheRequest] = []
        for record in records {
            for block in record.firstBlock..<(record.firstBlock + record.blockCount) {
                let id = blockContent[block]
                if id != 0 { requests.append(CacheRequest(key: UInt64(id), isWrite: record.isWrite)) }
            }
        }
        return requests
    }

    /// What the last-chance tier stores for content `key`: its LZ4 size, or the block size when LZ4
    /// saves nothing (the tier then keeps it raw).
    public func storedBytes(forKey key: UInt64) -> Int {
        min(Int(compressedBytes[Int(key) - 1]), blockBytes)
    }
}

public enum CacheTraceError: Error, Equatable, Sendable {
    case malformed(String)
}

private struct LittleEndianReader {
    let bytes: [UInt8]
    var position = 0

    var remaining: Int { bytes.count - position }

    mutating func take(_ count: Int) -> [UInt8]? {
        guard remaining >= count else { return nil }
        defer { position += count }
        return Array(bytes[position..<(position + count)])
    }

    mutating func u32() throws(CacheTraceError) -> UInt32 {
        guard let b = take(4) else { throw .malformed("truncated") }
        return UInt32(b[0]) | UInt32(b[1]) << 8 | UInt32(b[2]) << 16 | UInt32(b[3]) << 24
    }

    mutating func u16() throws(CacheTraceError) -> UInt16 {
        guard let b = take(2) else { throw .malformed("truncated") }
        return UInt16(b[0]) | UInt16(b[1]) << 8
    }
}
