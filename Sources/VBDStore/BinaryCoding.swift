/// Little-endian binary encoding for journal records, checkpoints and the superblock.
struct BinaryWriter {
    var bytes: [UInt8] = []

    init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    /// LEB128: small numbers (block indexes within a leaf, counts) take one or two bytes.
    mutating func varint(_ v: UInt64) {
        var v = v
        while v >= 0x80 { bytes.append(UInt8(v & 0x7f) | 0x80); v >>= 7 }
        bytes.append(UInt8(v))
    }
    mutating func string(_ s: String) {
        let utf8 = Array(s.utf8)
        varint(UInt64(utf8.count))
        bytes.append(contentsOf: utf8)
    }
    mutating func raw(_ b: [UInt8]) { bytes.append(contentsOf: b) }
}

/// Reads what ``BinaryWriter`` wrote; every read is bounds-checked and a short or malformed input
/// throws instead of trapping, because these bytes come from disk and may be torn or corrupt.
struct BinaryReader {
    let bytes: [UInt8]
    var position: Int

    init(_ bytes: [UInt8], position: Int = 0) {
        self.bytes = bytes
        self.position = position
    }

    struct Malformed: Error { let position: Int }

    var remaining: Int { bytes.count - position }

    private mutating func take(_ n: Int) throws(Malformed) -> Int {
        guard n >= 0, n <= remaining else { throw Malformed(position: position) }
        defer { position += n }
        return position
    }

    private mutating func fixed<T: FixedWidthInteger>(_: T.Type) throws(Malformed) -> T {
        let at = try take(MemoryLayout<T>.size)
        return bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: T.self)) }
    }

    mutating func u8() throws(Malformed) -> UInt8 { try fixed(UInt8.self) }
    mutating func u16() throws(Malformed) -> UInt16 { try fixed(UInt16.self) }
    mutating func u32() throws(Malformed) -> UInt32 { try fixed(UInt32.self) }
    mutating func u64() throws(Malformed) -> UInt64 { try fixed(UInt64.self) }
    mutating func varint() throws(Malformed) -> UInt64 {
        var result: UInt64 = 0, shift: UInt64 = 0
        while true {
            let b = try u8()
            if shift == 63 && b > 1 { throw Malformed(position: position) }
            result |= UInt64(b & 0x7f) << shift
            if b & 0x80 == 0 { return result }
            shift += 7
            if shift > 63 { throw Malformed(position: position) }
        }
    }
    mutating func string(maxBytes: Int = 4096) throws(Malformed) -> String {
        let n = try varint()
        guard n <= UInt64(maxBytes) else { throw Malformed(position: position) }
        let at = try take(Int(n))
        return String(decoding: bytes[at..<at + Int(n)], as: UTF8.self)
    }
    mutating func raw(_ n: Int) throws(Malformed) -> ArraySlice<UInt8> {
        let at = try take(n)
        return bytes[at..<at + n]
    }
}
