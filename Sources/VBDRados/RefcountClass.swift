/// The requests and replies of Ceph's `refcount` object class (src/cls/refcount in Ceph), in
/// Ceph's wire encoding. Debian ships no client library for object classes, so the few structures
/// are encoded here: each is a versioned frame (u8 version, u8 compatible version, u32 length, all
/// little-endian) around its fields; a string is a u32 length and its bytes, a bool one byte, a
/// list a u32 count and its elements.
///
/// What the class does (it runs inside the OSD, atomically with the rest of the operation):
/// - `set [tags]` replaces the object's references by `tags` (an empty list removes the object);
/// - `get tag` adds a reference (ENOENT when the object does not exist);
/// - `put tag` drops a reference and *retires* the tag: putting it again, or putting it after a
///   later `get` of the same tag, does nothing. So every reference needs a tag of its own. When the
///   last reference goes, the object is removed.
/// - `read` lists the tags of the references held.
enum RefcountClass {
    static let name = "refcount"

    static func set(tags: [String]) -> [UInt8] {
        var payload = CephEncoder()
        payload.append(stringList: tags)
        return frame(payload)
    }

    static func get(tag: String) -> [UInt8] {
        var payload = CephEncoder()
        payload.append(string: tag)
        payload.append(bool: false)  // implicit_ref: never count an object without tags as referenced
        return frame(payload)
    }

    static func put(tag: String) -> [UInt8] {
        get(tag: tag)  // same layout: tag, implicit_ref
    }

    static func read() -> [UInt8] {
        var payload = CephEncoder()
        payload.append(bool: false)
        return frame(payload)
    }

    /// Decodes `read`'s reply: the tags of the references held.
    static func decodeReadReply(_ bytes: [UInt8]) -> [String]? {
        var decoder = CephDecoder(bytes)
        guard let version = decoder.u8(), version >= 1, decoder.u8() != nil, let length = decoder.u32(),
              Int(length) <= decoder.remaining, let count = decoder.u32() else { return nil }
        var tags: [String] = []
        for _ in 0..<count {
            guard let tag = decoder.string() else { return nil }
            tags.append(tag)
        }
        return tags
    }

    private static func frame(_ payload: CephEncoder) -> [UInt8] {
        var out = CephEncoder()
        out.append(u8: 1)
        out.append(u8: 1)
        out.append(u32: UInt32(payload.bytes.count))
        out.bytes += payload.bytes
        return out.bytes
    }
}

struct CephEncoder {
    var bytes: [UInt8] = []

    mutating func append(u8 value: UInt8) { bytes.append(value) }

    mutating func append(u32 value: UInt32) {
        for shift in stride(from: 0, to: 32, by: 8) { bytes.append(UInt8(truncatingIfNeeded: value >> UInt32(shift))) }
    }

    mutating func append(bool value: Bool) { bytes.append(value ? 1 : 0) }

    mutating func append(string value: String) {
        let utf8 = Array(value.utf8)
        append(u32: UInt32(utf8.count))
        bytes += utf8
    }

    mutating func append(stringList values: [String]) {
        append(u32: UInt32(values.count))
        for value in values { append(string: value) }
    }
}

struct CephDecoder {
    private let bytes: [UInt8]
    private var offset = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - offset }

    mutating func u8() -> UInt8? {
        guard remaining >= 1 else { return nil }
        defer { offset += 1 }
        return bytes[offset]
    }

    mutating func u32() -> UInt32? {
        guard remaining >= 4 else { return nil }
        var value: UInt32 = 0
        for i in 0..<4 { value |= UInt32(bytes[offset + i]) << UInt32(8 * i) }
        offset += 4
        return value
    }

    mutating func string() -> String? {
        guard let length = u32(), Int(length) <= remaining else { return nil }
        defer { offset += Int(length) }
        return String(decoding: bytes[offset..<offset + Int(length)], as: UTF8.self)
    }
}
