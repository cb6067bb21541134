import NIOCore

/// The client direction of the wire format: used by tests and benchmark clients to speak to the
/// server without a third-party client.
public enum NBDClientEncoder {
    public static func writeClientFlags(_ flags: NBDClientFlags, into buffer: inout ByteBuffer) {
        buffer.writeInteger(flags.rawValue)
    }

    /// An option header with `payload`; `announcedLength` overrides the length field (hostile tests).
    public static func writeOption(_ code: UInt32, payload: [UInt8] = [], announcedLength: UInt32? = nil,
                                   into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(code)
        buffer.writeInteger(announcedLength ?? UInt32(payload.count))
        buffer.writeBytes(payload)
    }

    /// The payload of NBD_OPT_INFO / NBD_OPT_GO.
    public static func exportQueryPayload(name: String, informationRequests: [UInt16] = []) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(UInt32(name.utf8.count))
        bytes.append(contentsOf: name.utf8)
        bytes.appendBigEndian(UInt16(informationRequests.count))
        for request in informationRequests { bytes.appendBigEndian(request) }
        return bytes
    }

    /// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
    public static func metaContextPayload(exportName: String, queries: [String]) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.appendBigEndian(UInt32(exportName.utf8.count))
        bytes.append(contentsOf: exportName.utf8)
        bytes.appendBigEndian(UInt32(queries.count))
        for query in queries {
            bytes.appendBigEndian(UInt32(query.utf8.count))
            bytes.append(contentsOf: query.utf8)
        }
        return bytes
    }

    /// A request header; the caller appends a WRITE payload.
    public static func writeRequest(type: UInt16, flags: NBDCommandFlags = [], handle: UInt64, offset: UInt64,
                                    length: UInt32, into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.request)
        buffer.writeInteger(flags.rawValue)
        buffer.writeInteger(type)
        buffer.writeInteger(handle)
        buffer.writeInteger(offset)
        buffer.writeInteger(length)
    }
}
