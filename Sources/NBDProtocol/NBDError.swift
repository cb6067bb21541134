import VBDCore

/// The error numbers the NBD protocol carries in replies (proto.md, "Error values").
///
/// The spec restricts the wire to this set; any other failure maps onto one of them in
/// ``NBDError/init(_:)``, the single place that converts a storage error (as nbdkit's `nbd_errno`).
public enum NBDError: UInt32, Error, Sendable, Hashable, CaseIterable, CustomStringConvertible {
    case notPermitted = 1        // EPERM
    case io = 5                  // EIO
    case noMemory = 12           // ENOMEM
    case invalid = 22            // EINVAL
    case noSpace = 28            // ENOSPC
    case overflow = 75           // EOVERFLOW
    case notSupported = 95       // ENOTSUP (NBD_ENOTSUP, Linux EOPNOTSUPP)
    case shutdown = 108          // ESHUTDOWN

    /// Maps a ``BlockDeviceError`` onto the wire. Every case is covered by a unit test.
    public init(_ error: BlockDeviceError) {
        switch error {
        case .outOfRange, .invalid: self = .invalid
        case .readOnly: self = .notPermitted
        case .noSpace: self = .noSpace
        case .corrupted, .io, .gone: self = .io
        case .notSupported: self = .notSupported
        }
    }

    public var description: String {
        switch self {
        case .notPermitted: return "EPERM"
        case .io: return "EIO"
        case .noMemory: return "ENOMEM"
        case .invalid: return "EINVAL"
        case .noSpace: return "ENOSPC"
        case .overflow: return "EOVERFLOW"
        case .notSupported: return "ENOTSUP"
        case .shutdown: return "ESHUTDOWN"
        }
    }
}

/// Why a connection must end: a violation the protocol lets the server answer only with a hard
/// disconnect (proto.md, "Termination of the session during option haggling", "Terminating the
/// transmission phase").
public enum NBDProtocolError: Error, Sendable, Hashable, CustomStringConvertible {
    case badOptionMagic(UInt64)
    case badRequestMagic(UInt32)
    case unknownClientFlags(UInt32)
    case optionTooLarge(option: UInt32, length: UInt32)
    case tooManyOptions(limit: Int)
    case exportNameRejected(String)
    case clientAborted
    case tlsRequired
    case unexpectedDataBeforeTLS
    case dataAfterDisconnect
    /// A message arrived that the connection's current phase cannot take (an option after the
    /// handshake ended, client flags twice, a request beyond the in-flight limit): the peer or
    /// the transport broke the protocol's order, so this connection ends.
    case outOfOrder(String)
    /// The client held a connection resource past its deadline (a request begun and not
    /// finished, or an idle connection under an idle timeout).
    case holdExpired(String)

    public var description: String {
        switch self {
        case .badOptionMagic(let magic): return "bad option magic 0x\(String(magic, radix: 16))"
        case .badRequestMagic(let magic): return "bad request magic 0x\(String(magic, radix: 16))"
        case .unknownClientFlags(let flags): return "unknown client flags 0x\(String(flags, radix: 16))"
        case .optionTooLarge(let option, let length):
            return "option \(option) announces \(length) bytes, above the limit"
        case .tooManyOptions(let limit): return "more than \(limit) handshake options"
        case .exportNameRejected(let detail): return "NBD_OPT_EXPORT_NAME failed: \(detail)"
        case .clientAborted: return "client sent NBD_OPT_ABORT"
        case .tlsRequired: return "TLS is required before NBD_OPT_EXPORT_NAME"
        case .unexpectedDataBeforeTLS: return "client sent data before the TLS handshake"
        case .dataAfterDisconnect: return "client sent data after NBD_CMD_DISC"
        case .outOfOrder(let detail): return "message out of order: \(detail)"
        case .holdExpired(let detail): return "deadline passed: \(detail)"
        }
    }
}
