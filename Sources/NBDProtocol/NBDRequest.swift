import NIOCore

/// One transmission-phase request as it arrived (proto.md, "Request message").
///
/// Type and flags stay raw so that validation can reject unknown values with `EINVAL` instead of
/// the parser dropping the connection.
public struct NBDRequest: Sendable, Equatable {
    public var flags: NBDCommandFlags
    public var type: UInt16
    public var handle: UInt64
    public var offset: UInt64
    public var length: UInt32
    /// The WRITE payload, present only for a write whose length was within the payload limit.
    public var payload: ByteBuffer?
    /// True for a WRITE whose announced payload exceeded the limit: the parser skips the bytes as
    /// they arrive (never buffering them) and the request must be answered with an error.
    public var payloadDiscarded: Bool

    public init(flags: NBDCommandFlags, type: UInt16, handle: UInt64, offset: UInt64, length: UInt32,
                payload: ByteBuffer? = nil, payloadDiscarded: Bool = false) {
        self.flags = flags
        self.type = type
        self.handle = handle
        self.offset = offset
        self.length = length
        self.payload = payload
        self.payloadDiscarded = payloadDiscarded
    }

    /// The command, or nil for a type this server does not know.
    public var command: NBDCommand? { NBDCommand(rawValue: type) }
}

/// What the client sent, one protocol message at a time.
public enum NBDClientMessage: Sendable, Equatable {
    /// The 32-bit client flags that follow the server greeting.
    case clientFlags(UInt32)
    /// One option with its whole payload (at most the option payload limit).
    case option(code: UInt32, payload: ByteBuffer)
    /// One request, with its payload for WRITE.
    case request(NBDRequest)
}
