// MARK: - Notes on the design
//
// One value per connection in the transmission phase. It validates each request the way nbdkit's
// `validate_request` does, tracks how many requests are in flight, and handles NBD_CMD_DISC.
//
//   accepting --requestReceived(valid)--> accepting (+1 in flight)  --> Action.execute
//   accepting --requestReceived(invalid)--> accepting               --> Action.replyError
//   accepting --requestReceived(DISC)--> draining                    --> .closeWhenIdle / .close
//   draining --requestCompleted, last in flight--> closed            --> .close
//
// Invariants:
// 1. Per-request errors (`replyError`) never end the connection; only the parser's errors do.
// 2. `inFlight <= inFlightMax`: the server stops reading when ``canAcceptRequest`` is false; a
//    request that arrives anyway while the table is full aborts the connection.
// 3. Validation order follows nbdkit: command known, flags allowed, read-only, feature negotiated,
//    length, range. Writes to a read-only export get EPERM even for commands not advertised there.

/// An operation the server runs against the device once a request has been validated.
public enum NBDOperation: Sendable, Equatable {
    case read(handle: UInt64, offset: UInt64, length: UInt32, dontFragment: Bool)
    case write(handle: UInt64, offset: UInt64, length: UInt32, fua: Bool)
    case flush(handle: UInt64)
    case trim(handle: UInt64, offset: UInt64, length: UInt32, fua: Bool)
    case writeZeroes(handle: UInt64, offset: UInt64, length: UInt32, mayTrim: Bool, fastOnly: Bool, fua: Bool)
    case cache(handle: UInt64, offset: UInt64, length: UInt32)
    case blockStatus(handle: UInt64, offset: UInt64, length: UInt32, onlyOne: Bool, contexts: [NBDMetaContext])

    public var handle: UInt64 {
        switch self {
        case .read(let handle, _, _, _), .write(let handle, _, _, _), .flush(let handle),
             .trim(let handle, _, _, _), .writeZeroes(let handle, _, _, _, _, _), .cache(let handle, _, _),
             .blockStatus(let handle, _, _, _, _):
            return handle
        }
    }

    public var command: NBDCommand {
        switch self {
        case .read: return .read
        case .write: return .write
        case .flush: return .flush
        case .trim: return .trim
        case .writeZeroes: return .writeZeroes
        case .cache: return .cache
        case .blockStatus: return .blockStatus
        }
    }

    /// Bytes of payload this operation moves over the wire (READ and WRITE only): what counts
    /// against a connection's in-flight byte budget.
    public var payloadBytes: Int {
        switch self {
        case .read(_, _, let length, _), .write(_, _, let length, _): return Int(length)
        default: return 0
        }
    }
}

/// A request error answered on the wire; the connection goes on.
public struct NBDRequestRejection: Error, Sendable, Equatable {
    public var handle: UInt64
    public var command: NBDCommand?
    public var error: NBDError
    public var message: String

    public init(handle: UInt64, command: NBDCommand?, error: NBDError, message: String) {
        self.handle = handle
        self.command = command
        self.error = error
        self.message = message
    }
}

/// Validates requests and tracks in-flight work for one connection in the transmission phase.
public struct NBDTransmissionStateMachine: Sendable {
    public enum Action: Sendable, Equatable {
        case execute(NBDOperation)
        case replyError(NBDRequestRejection)
        /// NBD_CMD_DISC with requests still in flight: finish them, then close.
        case closeWhenIdle
        /// Close the connection now (after NBD_CMD_DISC with nothing in flight).
        case close
        /// Close the connection now: the input broke the protocol.
        case abort(NBDProtocolError)
        /// Nothing to do.
        case none
    }

    private enum State: Sendable {
        case accepting
        case draining
        case closed
    }

    public let export: NBDNegotiatedExport
    public let inFlightMax: Int
    private var state: State = .accepting
    public private(set) var inFlight = 0

    public init(export: NBDNegotiatedExport, inFlightMax: Int) {
        precondition(inFlightMax > 0)
        self.export = export
        self.inFlightMax = inFlightMax
    }

    /// True when the server may read another request: not disconnecting and below the in-flight limit.
    public var canAcceptRequest: Bool {
        if case .accepting = state { return inFlight < inFlightMax }
        return false
    }

    public var isDisconnecting: Bool {
        if case .accepting = state { return false }
        return true
    }

    public mutating func requestReceived(_ request: NBDRequest) -> Action {
        switch state {
        case .accepting: break
        case .draining, .closed:
            // proto.md: the client MUST NOT send anything after NBD_CMD_DISC; ignore it.
            return .none
        }
        guard inFlight < inFlightMax else {
            // The handler stops reading at the limit; a request past it means the input arrived
            // by another path (a re-entrant read), and the table must not overflow.
            state = .closed
            return .abort(.outOfOrder("request \(request.handle) beyond \(inFlightMax) in flight"))
        }
        switch validate(request) {
        case .failure(let rejection):
            return .replyError(rejection)
        case .success(nil):
            return disconnectRequested()
        case .success(let operation?):
            inFlight += 1
            return .execute(operation)
        }
    }

    /// NBD_CMD_DISC, or the server shutting down: take no new requests, close once the ones in
    /// flight have been answered (proto.md, "Terminating the transmission phase").
    public mutating func disconnectRequested() -> Action {
        switch state {
        case .accepting, .draining:
            if inFlight == 0 {
                state = .closed
                return .close
            }
            state = .draining
            return .closeWhenIdle
        case .closed:
            return .none
        }
    }

    /// Reports that an operation returned by ``requestReceived(_:)`` finished and its reply is sent.
    public mutating func requestCompleted() -> Action {
        guard inFlight > 0 else { return .none }  // a completion after an abort reset the table
        inFlight -= 1
        if case .draining = state, inFlight == 0 {
            state = .closed
            return .close
        }
        return .none
    }

    /// Flags each command may carry (proto.md, "Command flags"); FUA is valid on every command
    /// once SEND_FUA is advertised.
    private func allowedFlags(for command: NBDCommand) -> NBDCommandFlags {
        var allowed: NBDCommandFlags = export.transmissionFlags.contains(.sendFUA) ? [.fua] : []
        switch command {
        case .read:
            if export.transmissionFlags.contains(.sendDF) { allowed.insert(.dontFragment) }
        case .writeZeroes:
            allowed.insert(.noHole)
            if export.transmissionFlags.contains(.sendFastZero) { allowed.insert(.fastZero) }
        case .blockStatus:
            allowed.insert(.requestOne)
        case .write, .disconnect, .flush, .trim, .cache:
            break
        }
        return allowed
    }

    /// Returns the operation to run, nil for NBD_CMD_DISC, or the error to answer.
    public func validate(_ request: NBDRequest) -> Result<NBDOperation?, NBDRequestRejection> {
        func reject(_ error: NBDError, _ message: String) -> Result<NBDOperation?, NBDRequestRejection> {
            .failure(NBDRequestRejection(handle: request.handle, command: request.command, error: error,
                                         message: message))
        }
        guard let command = request.command else {
            return reject(.invalid, "unknown command \(request.type)")
        }
        let flags = request.flags
        let unexpected = flags.subtracting(allowedFlags(for: command))
        if !unexpected.isEmpty && !(export.export.isReadOnly && command.isWriting) {
            return reject(.invalid, "flags 0x\(String(unexpected.rawValue, radix: 16)) are not valid for \(command)")
        }
        if export.export.isReadOnly && command.isWriting {
            return reject(.notPermitted, "\(export.export.name) is read-only")
        }
        if request.payloadDiscarded {
            return reject(.invalid, "\(command) of \(request.length) bytes exceeds the \(export.requestBytesMax)-byte limit")
        }

        let offset = request.offset
        let length = request.length
        switch command {
        case .disconnect, .flush:
            // proto.md: offset and length are reserved and MUST be zero.
            guard offset == 0, length == 0 else {
                return reject(.invalid, "\(command) must have zero offset and length")
            }
            return command == .disconnect ? .success(nil) : .success(.flush(handle: request.handle))
        case .blockStatus:
            guard !export.metaContexts.isEmpty else {
                return reject(.invalid, "no metadata context was negotiated")
            }
        default:
            break
        }
        guard length > 0 else {
            return reject(.invalid, "\(command) with zero length")
        }
        if command == .read || command == .write, Int(length) > export.requestBytesMax {
            return reject(.invalid, "\(command) of \(length) bytes exceeds the \(export.requestBytesMax)-byte limit")
        }
        // Overflow-safe: offset + length may exceed UInt64.max for hostile offsets.
        let size = export.export.size
        guard offset <= size, UInt64(length) <= size - offset else {
            // proto.md, "Error values": ENOSPC for writes beyond the end; EINVAL otherwise.
            let error: NBDError = command == .write || command == .writeZeroes ? .noSpace : .invalid
            return reject(error, "[\(offset), +\(length)) is beyond the export size \(size)")
        }
        let handle = request.handle
        let fua = flags.contains(.fua)
        switch command {
        case .read:
            return .success(.read(handle: handle, offset: offset, length: length,
                                  dontFragment: flags.contains(.dontFragment)))
        case .write:
            guard let payload = request.payload, payload.readableBytes == Int(length) else {
                return reject(.invalid, "WRITE payload missing")
            }
            return .success(.write(handle: handle, offset: offset, length: length, fua: fua))
        case .trim:
            return .success(.trim(handle: handle, offset: offset, length: length, fua: fua))
        case .writeZeroes:
            return .success(.writeZeroes(handle: handle, offset: offset, length: length,
                                         mayTrim: !flags.contains(.noHole), fastOnly: flags.contains(.fastZero),
                                         fua: fua))
        case .cache:
            return .success(.cache(handle: handle, offset: offset, length: length))
        case .blockStatus:
            return .success(.blockStatus(handle: handle, offset: offset, length: length,
                                         onlyOne: flags.contains(.requestOne), contexts: export.metaContexts))
        case .disconnect:
            return .success(nil)  // answered by the first switch; kept total instead of trapping
        case .flush:
            return .success(.flush(handle: handle))
        }
    }
}

extension NBDCommand {
    /// Commands that change the export's contents: refused on a read-only export with EPERM.
    public var isWriting: Bool {
        switch self {
        case .write, .trim, .writeZeroes: return true
        case .read, .disconnect, .flush, .cache, .blockStatus: return false
        }
    }
}
