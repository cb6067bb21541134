import NIOCore

// MARK: - Notes on the design
//
// The parser cuts the client's byte stream into messages. It is a plain value: the server feeds it
// whatever bytes arrived (one byte at a time or a megabyte at a time) and asks for the next
// message. It never allocates according to a length the client announced before checking that
// length against a limit:
//
// 1. An option whose announced length exceeds `optionBytesMax` is a protocol error (the connection
//    ends) before a single payload byte is buffered.
// 2. A WRITE whose announced length exceeds `requestBytesMax` has its payload skipped as it arrives
//    and is delivered, flagged `payloadDiscarded`, once the last payload byte is gone: the connection
//    survives and the client gets EINVAL, but memory never grows with the announced length. The
//    request is held back until then because clients (libnbd) only match a reply to a request they
//    have finished sending: an early reply reads as a reply to an unknown handle.
// 3. Any other message has a fixed size (4, 16 or 28 bytes).
//
//   awaitingClientFlags --4 bytes--> awaitingOptionHeader <--+
//                                    | header, len <= max    |
//                                    v                       |
//                                    awaitingOptionPayload --+
//   enterTransmission():  awaitingRequestHeader <-------------------------+
//                         | WRITE, len <= max          | WRITE, len > max  |
//                         v                            v                   |
//                         awaitingWritePayload ------> discardingPayload --+

/// Splits the client's byte stream into ``NBDClientMessage``s with bounded buffering.
public struct NBDMessageParser: Sendable {
    private enum State: Sendable {
        case awaitingClientFlags
        case awaitingOptionHeader
        case awaitingOptionPayload(code: UInt32, length: Int)
        case awaitingRequestHeader
        case awaitingWritePayload(NBDRequest)
        case discardingPayload(NBDRequest, remaining: UInt64)
    }

    private var state: State = .awaitingClientFlags
    public let optionBytesMax: Int
    public let requestBytesMax: Int

    public init(optionBytesMax: Int, requestBytesMax: Int) {
        precondition(optionBytesMax >= 0 && requestBytesMax > 0)
        self.optionBytesMax = optionBytesMax
        self.requestBytesMax = requestBytesMax
    }

    /// Switches from option haggling to requests; called once the export is chosen.
    public mutating func enterTransmission() {
        state = .awaitingRequestHeader
    }

    /// True while the parser is between messages, so no partially received message is pending.
    public var isAtMessageBoundary: Bool {
        switch state {
        case .awaitingClientFlags, .awaitingOptionHeader, .awaitingRequestHeader: return true
        default: return false
        }
    }

    /// Bytes the parser still needs before it can return the message it is assembling; lets the
    /// caller size its buffer once.
    public var pendingPayloadBytes: Int {
        switch state {
        case .awaitingOptionPayload(_, let length): return length
        case .awaitingWritePayload(let request): return Int(request.length)
        default: return 0
        }
    }

    /// Returns the next complete message, or nil when more bytes are needed. Consumes what it uses
    /// from `buffer` (and, while skipping an oversized payload, everything it may skip).
    /// - Throws: ``NBDProtocolError`` when the stream cannot be parsed; the connection must close.
    public mutating func nextMessage(from buffer: inout ByteBuffer) throws(NBDProtocolError) -> NBDClientMessage? {
        while true {
            switch state {
            case .awaitingClientFlags:
                guard let flags = buffer.readInteger(as: UInt32.self) else { return nil }
                state = .awaitingOptionHeader
                return .clientFlags(flags)

            case .awaitingOptionHeader:
                guard buffer.readableBytes >= NBDWireSize.optionHeader else { return nil }
                let magic = buffer.getInteger(at: buffer.readerIndex, as: UInt64.self)!
                guard magic == NBDMagic.option else { throw .badOptionMagic(magic) }
                let code = buffer.getInteger(at: buffer.readerIndex + 8, as: UInt32.self)!
                let length = buffer.getInteger(at: buffer.readerIndex + 12, as: UInt32.self)!
                guard UInt64(length) <= UInt64(optionBytesMax) else {
                    throw .optionTooLarge(option: code, length: length)
                }
                buffer.moveReaderIndex(forwardBy: NBDWireSize.optionHeader)
                state = .awaitingOptionPayload(code: code, length: Int(length))

            case .awaitingOptionPayload(let code, let length):
                guard let payload = buffer.readSlice(length: length) else { return nil }
                state = .awaitingOptionHeader
                return .option(code: code, payload: payload)

            case .awaitingRequestHeader:
                guard buffer.readableBytes >= NBDWireSize.requestHeader else { return nil }
                let start = buffer.readerIndex
                let magic = buffer.getInteger(at: start, as: UInt32.self)!
                guard magic == NBDMagic.request else { throw .badRequestMagic(magic) }
                let request = NBDRequest(
                    flags: NBDCommandFlags(rawValue: buffer.getInteger(at: start + 4, as: UInt16.self)!),
                    type: buffer.getInteger(at: start + 6, as: UInt16.self)!,
                    handle: buffer.getInteger(at: start + 8, as: UInt64.self)!,
                    offset: buffer.getInteger(at: start + 16, as: UInt64.self)!,
                    length: buffer.getInteger(at: start + 24, as: UInt32.self)!)
                buffer.moveReaderIndex(forwardBy: NBDWireSize.requestHeader)
                // Only WRITE carries a payload (proto.md, "Request message").
                guard request.command == .write, request.length > 0 else { return .request(request) }
                if UInt64(request.length) > UInt64(requestBytesMax) {
                    var discarded = request
                    discarded.payloadDiscarded = true
                    state = .discardingPayload(discarded, remaining: UInt64(request.length))
                    continue
                }
                state = .awaitingWritePayload(request)

            case .awaitingWritePayload(var request):
                guard let payload = buffer.readSlice(length: Int(request.length)) else { return nil }
                request.payload = payload
                state = .awaitingRequestHeader
                return .request(request)

            case .discardingPayload(let request, let remaining):
                let skip = Int(min(remaining, UInt64(buffer.readableBytes)))
                buffer.moveReaderIndex(forwardBy: skip)
                let left = remaining - UInt64(skip)
                if left > 0 {
                    state = .discardingPayload(request, remaining: left)
                    return nil
                }
                state = .awaitingRequestHeader
                return .request(request)
            }
        }
    }
}
