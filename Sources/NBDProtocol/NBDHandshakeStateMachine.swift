import NIOCore
import VBDCore

// MARK: - Notes on the design
//
// One value per connection drives the fixed-newstyle handshake (proto.md, "Newstyle negotiation",
// "Fixed newstyle negotiation", "TLS support", "Metadata querying"). It never touches a socket or a
// device: it returns an ``Action`` and the server performs it, reporting results back as events.
//
//   awaitingClientFlags --clientFlagsReceived--> negotiating <------------------------------+
//        negotiating --optionReceived(LIST)--------> awaitingExportList --exportListReceived-+
//        negotiating --optionReceived(INFO)--------> awaitingExport ------exportOpened(info)-+
//        negotiating --optionReceived(STARTTLS)----> awaitingTLS ------tlsHandshakeCompleted-+
//        negotiating --optionReceived(GO/EXPORT_NAME)--> awaitingExport --exportOpened--> transmitting
//        any --violation / ABORT / limit / event the state cannot take--> closed
//
// Invariants:
// 1. At most `optionsMax` options per connection: the option loop is driven by the client.
// 2. With TLS required and not yet active, only STARTTLS and ABORT are answered with anything but
//    NBD_REP_ERR_TLS_REQD, and EXPORT_NAME (which cannot carry an error) ends the connection.
// 3. Starting TLS forgets everything negotiated before it, so nothing chosen in plaintext survives.
// 4. Contexts chosen by SET_META_CONTEXT apply only if GO names the same export (as nbdkit does).
// 5. No event traps: one that arrives in a state that cannot take it ends the connection with
//    ``NBDProtocolError/outOfOrder(_:)`` (a client controls the order of its bytes).

/// Drives one NBD connection from the server greeting to the transmission phase.
public struct NBDHandshakeStateMachine: Sendable {
    public enum TLSPolicy: Sendable, Equatable {
        /// NOTLS: STARTTLS is refused with NBD_REP_ERR_POLICY.
        case disabled
        /// SELECTIVETLS with no TLS-only export: the client may upgrade.
        case optional
        /// FORCEDTLS: every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD until TLS runs.
        case required
    }

    public struct Configuration: Sendable, Equatable {
        public var tlsPolicy: TLSPolicy
        public var optionsMax: Int
        public var requestBytesMax: Int

        public init(tlsPolicy: TLSPolicy, optionsMax: Int, requestBytesMax: Int) {
            precondition(optionsMax > 0 && requestBytesMax > 0 && requestBytesMax <= Int(UInt32.max))
            self.tlsPolicy = tlsPolicy
            self.optionsMax = optionsMax
            self.requestBytesMax = requestBytesMax
        }
    }

    /// The reply that ends the handshake.
    public enum FinalReply: Sendable, Equatable {
        /// After NBD_OPT_GO: the NBD_REP_INFO replies and the ACK.
        case optionReplies([NBDOptionReply])
        /// After NBD_OPT_EXPORT_NAME: size, flags and (without NO_ZEROES) 124 zero bytes.
        case exportName(size: UInt64, flags: NBDTransmissionFlags, zeroPadding: Bool)

        public func encode(into buffer: inout ByteBuffer) {
            switch self {
            case .optionReplies(let replies):
                for reply in replies { reply.encode(into: &buffer) }
            case .exportName(let size, let flags, let zeroPadding):
                buffer.writeInteger(size)
                buffer.writeInteger(flags.rawValue)
                if zeroPadding { buffer.writeRepeatingByte(0, count: NBDWireSize.exportNameZeroPadding) }
            }
        }
    }

    public enum Action: Sendable, Equatable {
        /// Send these replies and read the next option.
        case send([NBDOptionReply])
        /// Look up the export (off the event loop) and report with ``exportOpened(_:)``.
        case openExport(name: String)
        /// Fetch the export list (off the event loop) and report with ``exportListReceived(_:)``.
        case listExports
        /// Send the ACK in plaintext, then run the TLS handshake and report ``tlsHandshakeCompleted()``.
        case startTLS(NBDOptionReply)
        /// Send the final reply and switch the connection to transmission.
        case enterTransmission(FinalReply, NBDNegotiatedExport)
        /// Send these replies (possibly none), then close the connection.
        case sendAndClose([NBDOptionReply], NBDProtocolError)
    }

    private enum PendingExport: Sendable {
        case info(NBDExportQuery)
        case go(NBDExportQuery)
        case exportName(String)
    }

    private enum State: Sendable {
        case awaitingClientFlags
        case negotiating
        case awaitingExport(PendingExport)
        case awaitingExportList
        case awaitingTLSHandshake
        case transmitting
        case closed
    }

    private var state: State = .awaitingClientFlags
    private let configuration: Configuration
    private var clientFlags: NBDClientFlags = []
    private var optionsReceived = 0
    private var tlsActive = false
    private var structuredReplies = false
    private var metaContexts: [NBDMetaContext] = []
    private var metaContextExportName: String?

    public init(configuration: Configuration) {
        self.configuration = configuration
    }

    /// Handshake flags the server offers.
    public static let handshakeFlags: NBDHandshakeFlags = [.fixedNewstyle, .noZeroes]

    /// The server's first message: NBDMAGIC, IHAVEOPT, handshake flags.
    public static func greeting(into buffer: inout ByteBuffer) {
        buffer.writeInteger(NBDMagic.initPassword)
        buffer.writeInteger(NBDMagic.option)
        buffer.writeInteger(handshakeFlags.rawValue)
    }

    public var isTLSActive: Bool { tlsActive }

    /// True once the machine waits for a new option (not for an export lookup or TLS).
    public var isAwaitingOption: Bool {
        if case .negotiating = state { return true }
        return false
    }

    // MARK: Events

    public mutating func clientFlagsReceived(_ raw: UInt32) -> Action {
        guard case .awaitingClientFlags = state else { return violation("client flags while \(state)") }
        let flags = NBDClientFlags(rawValue: raw)
        // proto.md, "Client flags": the server MUST drop the connection on unknown flags.
        guard NBDClientFlags.known.isSuperset(of: flags) else {
            state = .closed
            return .sendAndClose([], .unknownClientFlags(raw))
        }
        clientFlags = flags
        state = .negotiating
        return .send([])
    }

    public mutating func optionReceived(_ option: NBDOption) -> Action {
        guard case .negotiating = state else { return violation("option \(option.code) while \(state)") }
        optionsReceived += 1
        guard optionsReceived <= configuration.optionsMax else {
            state = .closed
            return .sendAndClose([], .tooManyOptions(limit: configuration.optionsMax))
        }
        let code = option.code

        // FORCEDTLS (proto.md, "FORCEDTLS mode").
        if configuration.tlsPolicy == .required && !tlsActive {
            switch option {
            case .startTLS, .abort:
                break
            case .exportName:
                state = .closed
                return .sendAndClose([], .tlsRequired)
            default:
                return .send([.error(code, NBDOptionReplyType.errTLSRequired, "TLS is required: send NBD_OPT_STARTTLS")])
            }
        }

        switch option {
        case .abort:
            state = .closed
            return .sendAndClose([.ack(code)], .clientAborted)

        case .list:
            state = .awaitingExportList
            return .listExports

        case .startTLS:
            switch configuration.tlsPolicy {
            case .disabled:
                return .send([.error(code, NBDOptionReplyType.errPolicy, "TLS is not configured on this server")])
            case .optional, .required:
                guard !tlsActive else {
                    return .send([.error(code, NBDOptionReplyType.errInvalid, "TLS is already active")])
                }
                state = .awaitingTLSHandshake
                return .startTLS(.ack(code))
            }

        case .structuredReply:
            guard !structuredReplies else {
                return .send([.error(code, NBDOptionReplyType.errInvalid, "structured replies already negotiated")])
            }
            structuredReplies = true
            return .send([.ack(code)])

        case .listMetaContext(_, let queries), .setMetaContext(_, let queries):
            guard structuredReplies else {
                return .send([.error(code, NBDOptionReplyType.errInvalid, "negotiate structured replies first")])
            }
            var replies: [NBDOptionReply] = []
            if case .setMetaContext(let exportName, _) = option {
                var chosen: [NBDMetaContext] = []
                for query in queries {
                    if let context = NBDMetaContext.selected(by: query), !chosen.contains(context) {
                        chosen.append(context)
                    }
                }
                metaContexts = chosen
                metaContextExportName = exportName
                replies = chosen.map { .metaContext(code, id: $0.id, name: $0.name) }
            } else {
                var listed: [NBDMetaContext] = []
                for context in queries.isEmpty ? NBDMetaContext.allCases : queries.flatMap(NBDMetaContext.listed)
                where !listed.contains(context) {
                    listed.append(context)
                }
                // The id in a LIST reply is reserved and SHOULD be zero (proto.md).
                replies = listed.map { .metaContext(code, id: 0, name: $0.name) }
            }
            return .send(replies + [.ack(code)])

        case .info(let query):
            state = .awaitingExport(.info(query))
            return .openExport(name: query.name)

        case .go(let query):
            state = .awaitingExport(.go(query))
            return .openExport(name: query.name)

        case .exportName(let name):
            state = .awaitingExport(.exportName(name))
            return .openExport(name: name)

        case .unsupported:
            return .send([.error(code, NBDOptionReplyType.errUnsupported, "option \(code) is not supported")])

        case .malformed(let malformedCode, let reason):
            if malformedCode == NBDOptionCode.exportName {
                // EXPORT_NAME cannot carry an error reply: the session must end (proto.md).
                state = .closed
                return .sendAndClose([], .exportNameRejected(reason))
            }
            return .send([.error(code, NBDOptionReplyType.errInvalid, reason)])
        }
    }

    public mutating func exportListReceived(_ exports: [(name: String, description: String)]) -> Action {
        guard case .awaitingExportList = state else { return violation("export list while \(state)") }
        state = .negotiating
        let code = NBDOptionCode.list
        return .send(exports.map { .server(code, name: $0.name, description: $0.description) } + [.ack(code)])
    }

    /// Reports that the export list could not be fetched (for example, the server is stopping).
    public mutating func exportListFailed(_ error: NBDExportLookupError) -> Action {
        guard case .awaitingExportList = state else { return violation("export list while \(state)") }
        state = .negotiating
        return .send([.error(NBDOptionCode.list, error.replyType, error.message)])
    }

    /// Reports the export lookup requested by ``Action/openExport(name:)``. For GO and EXPORT_NAME
    /// a success returns ``Action/enterTransmission(_:_:)``; the server keeps the device open only then.
    public mutating func exportOpened(_ result: Result<NBDExportDescription, NBDExportLookupError>) -> Action {
        guard case .awaitingExport(let pending) = state else { return violation("export lookup result while \(state)") }
        switch pending {
        case .exportName(let name):
            switch result {
            case .failure(let error):
                state = .closed
                return .sendAndClose([], .exportNameRejected("\(name): \(error.message)"))
            case .success(let export):
                let negotiated = negotiate(export, exportName: name)
                state = .transmitting
                return .enterTransmission(
                    .exportName(size: export.size, flags: negotiated.transmissionFlags,
                                zeroPadding: !clientFlags.contains(.noZeroes)),
                    negotiated)
            }
        case .info(let query), .go(let query):
            let isGo: Bool
            if case .go = pending { isGo = true } else { isGo = false }
            let code = isGo ? NBDOptionCode.go : NBDOptionCode.info
            switch result {
            case .failure(let error):
                state = .negotiating
                return .send([.error(code, error.replyType, error.message)])
            case .success(let export):
                let negotiated = negotiate(export, exportName: query.name)
                var replies: [NBDOptionReply] = [
                    .infoExport(code, size: export.size, flags: negotiated.transmissionFlags),
                ]
                if query.informationRequests.contains(NBDInfoType.name) {
                    replies.append(.infoString(code, infoType: NBDInfoType.name, export.name))
                }
                if query.informationRequests.contains(NBDInfoType.description) {
                    replies.append(.infoString(code, infoType: NBDInfoType.description, export.description))
                }
                // Sent whether or not requested, as qemu-nbd does: with a minimum of 1 the client is
                // never constrained, and the maximum tells it where requests start to fail.
                replies.append(.infoBlockSize(
                    code, minimum: 1, preferred: export.preferredBlockSize,
                    maximum: UInt32(configuration.requestBytesMax)))
                replies.append(.ack(code))
                if isGo {
                    state = .transmitting
                    return .enterTransmission(.optionReplies(replies), negotiated)
                }
                state = .negotiating
                return .send(replies)
            }
        }
    }

    public mutating func tlsHandshakeCompleted() -> Action {
        guard case .awaitingTLSHandshake = state else { return violation("TLS completion while \(state)") }
        tlsActive = true
        // Invariant 3: nothing negotiated in plaintext carries over.
        structuredReplies = false
        metaContexts = []
        metaContextExportName = nil
        state = .negotiating
        return .send([])
    }

    /// An event the current state cannot take. Events come from the client's bytes or from the
    /// server's own completions, and either may arrive late (after a reset, a failed write that
    /// re-enters the read path, a close): the connection ends, the process does not.
    private mutating func violation(_ detail: String) -> Action {
        state = .closed
        return .sendAndClose([], .outOfOrder(detail))
    }

    private func negotiate(_ export: NBDExportDescription, exportName: String) -> NBDNegotiatedExport {
        let contexts = structuredReplies && metaContextExportName == exportName ? metaContexts : []
        return NBDNegotiatedExport(
            export: export,
            transmissionFlags: NBDNegotiatedExport.transmissionFlags(
                readOnly: export.isReadOnly, structuredReplies: structuredReplies),
            structuredReplies: structuredReplies,
            metaContexts: contexts,
            requestBytesMax: configuration.requestBytesMax)
    }
}

/// Why an export could not be opened, as the handshake reports it to the client.
public struct NBDExportLookupError: Error, Sendable, Equatable {
    public var replyType: UInt32
    public var message: String

    public init(replyType: UInt32, message: String) {
        self.replyType = replyType
        self.message = message
    }

    /// Maps a device error met while opening an export: a refusal by policy (a read-only or
    /// unsupported request) is NBD_REP_ERR_POLICY; a missing export and every other failure is
    /// NBD_REP_ERR_UNKNOWN, with the detail in the message, since no other reply fits.
    public init(_ error: BlockDeviceError) {
        switch error {
        case .readOnly, .notSupported: replyType = NBDOptionReplyType.errPolicy
        default: replyType = NBDOptionReplyType.errUnknown
        }
        message = error.description
    }
}
