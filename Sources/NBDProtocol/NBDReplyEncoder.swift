import NIOCore

/// Writes transmission-phase replies (proto.md, "Simple reply message", "Structured reply chunk
/// message", "Structured reply types").
public enum NBDReplyEncoder {
    /// Simple reply header: magic, error, handle. For a successful READ the data follows.
    public static func writeSimpleReply(handle: UInt64, error: NBDError?, into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.simpleReply)
        buffer.writeInteger(error?.rawValue ?? 0)
        buffer.writeInteger(handle)
    }

    /// A structured chunk header: magic, flags, type, handle, payload length.
    public static func writeChunkHeader(handle: UInt64, type: UInt16, done: Bool, payloadLength: UInt32,
                                        into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.structuredReply)
        buffer.writeInteger(done ? NBDStructuredReply.flagDone : 0)
        buffer.writeInteger(type)
        buffer.writeInteger(handle)
        buffer.writeInteger(payloadLength)
    }

    /// `NBD_REPLY_TYPE_NONE` with DONE: a successful reply without payload.
    public static func writeNoneChunk(handle: UInt64, into buffer: inout ByteBuffer) {
        writeChunkHeader(handle: handle, type: NBDStructuredReply.typeNone, done: true, payloadLength: 0,
                         into: &buffer)
    }

    /// Header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk; `dataLength` bytes of data follow.
    public static func writeOffsetDataHeader(handle: UInt64, offset: UInt64, dataLength: UInt32, done: Bool,
                                             into buffer: inout ByteBuffer) {
        precondition(dataLength > 0 && dataLength <= UInt32.max - 8)
        writeChunkHeader(handle: handle, type: NBDStructuredReply.typeOffsetData, done: done,
                         payloadLength: 8 + dataLength, into: &buffer)
        buffer.writeInteger(offset)
    }

    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: `length` bytes at `offset` read as zeroes.
    public static func writeOffsetHole(handle: UInt64, offset: UInt64, length: UInt32, done: Bool,
                                       into buffer: inout ByteBuffer) {
        precondition(length > 0)
        writeChunkHeader(handle: handle, type: NBDStructuredReply.typeOffsetHole, done: done, payloadLength: 12,
                         into: &buffer)
        buffer.writeInteger(offset)
        buffer.writeInteger(length)
    }

    /// `NBD_REPLY_TYPE_ERROR` with DONE: the error and a message for humans (at most 4096 bytes).
    public static func writeErrorChunk(handle: UInt64, error: NBDError, message: String,
                                       into buffer: inout ByteBuffer) {
        let text = Array(message.utf8.prefix(NBDWireSize.stringBytesMax))
        writeChunkHeader(handle: handle, type: NBDStructuredReply.typeError, done: true,
                         payloadLength: UInt32(6 + text.count), into: &buffer)
        buffer.writeInteger(error.rawValue)
        buffer.writeInteger(UInt16(text.count))
        buffer.writeBytes(text)
    }

    /// `NBD_REPLY_TYPE_BLOCK_STATUS` for one context: id followed by (length, flags) descriptors.
    public static func writeBlockStatusChunk(handle: UInt64, contextID: UInt32, descriptors: [NBDBlockDescriptor],
                                             done: Bool, into buffer: inout ByteBuffer) {
        precondition(!descriptors.isEmpty)
        writeChunkHeader(handle: handle, type: NBDStructuredReply.typeBlockStatus, done: done,
                         payloadLength: UInt32(4 + 8 * descriptors.count), into: &buffer)
        buffer.writeInteger(contextID)
        for descriptor in descriptors {
            buffer.writeInteger(descriptor.length)
            buffer.writeInteger(descriptor.flags)
        }
    }

    /// An error reply in whichever form the connection negotiated. Per proto.md a READ error
    /// without structured replies is a simple reply with no payload.
    public static func writeError(_ rejection: NBDRequestRejection, structured: Bool, into buffer: inout ByteBuffer) {
        if structured {
            writeErrorChunk(handle: rejection.handle, error: rejection.error, message: rejection.message,
                            into: &buffer)
        } else {
            writeSimpleReply(handle: rejection.handle, error: rejection.error, into: &buffer)
        }
    }
}

/// One block status descriptor: a run of `length` bytes with context-defined `flags`.
public struct NBDBlockDescriptor: Sendable, Equatable {
    public var length: UInt32
    public var flags: UInt32
    public init(length: UInt32, flags: UInt32) {
        self.length = length
        self.flags = flags
    }
}
