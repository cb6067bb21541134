// Drives NBDProtocol's parser and state machines the way NBDServer's NBDConnectionHandler does,
// with a scripted export catalogue and device in place of the store, and checks after every step
// what a client relies on: every option answered once with well-formed replies for that option,
// no event the machines call out of order, bounded buffering, every request answered exactly once
// with a well-formed reply for its handle, and reply plans that tile the requested range.

import NIOCore
import NBDProtocol
import VBDCore

/// What the harness knows of the session's configuration (taken from the input's first byte).
struct SessionConfiguration {
    var tlsPolicy: NBDHandshakeStateMachine.TLSPolicy
    var segmentation: Segmentation
    var readOnly: Bool
    var requestBytesMax: Int
    /// Every export lookup succeeds (mutated names still reach the transmission phase).
    var anyNameExists: Bool
    var exportSize: UInt64

    init(byte: UInt8) {
        switch byte & 3 {
        case 0: tlsPolicy = .disabled
        case 1: tlsPolicy = .optional
        default: tlsPolicy = .required
        }
        segmentation = Segmentation(rawValue: Int(byte >> 2) & 3)!
        readOnly = byte & 0x10 != 0
        // The real limit, or a small one so that the oversized-WRITE discard path is reachable
        // with inputs of a few KiB.
        requestBytesMax = byte & 0x20 != 0 ? 1024 : Limits.nbdRequestBytesMax
        anyNameExists = byte & 0x40 != 0
        exportSize = byte & 0x80 != 0 ? Limits.volumeBytesMax : 64 << 20
    }

    func lookup(_ name: String) -> Result<NBDExportDescription, NBDExportLookupError> {
        // The catalogue `vbdtool serve` had when the seed sessions were captured (Fuzz/capture-sessions.py):
        // volume vm0 and its snapshot vm0@s, served read-only.
        guard anyNameExists || name == "vm0" || name == "vm0@s" else {
            return .failure(NBDExportLookupError(replyType: NBDOptionReplyType.errUnknown, message: "no export \(name)"))
        }
        return .success(NBDExportDescription(
            name: name, description: "fuzz export", size: exportSize,
            isReadOnly: readOnly || name.contains("@"), preferredBlockSize: 4096))
    }
}

/// Checks the bytes an encoder produced for one option's replies: each header well-formed, each
/// naming `option`, intermediate replies of the informational types, and exactly one final reply
/// (ACK or an error), last.
func checkOptionReplies(_ replies: [NBDOptionReply], option: UInt32, context: String) {
    invariant(!replies.isEmpty, "option \(option) got no reply (\(context))")
    var buffer = ByteBuffer()
    for reply in replies { reply.encode(into: &buffer) }
    for (index, reply) in replies.enumerated() {
        let magic = buffer.readInteger(as: UInt64.self)
        let code = buffer.readInteger(as: UInt32.self)
        let type = buffer.readInteger(as: UInt32.self)
        let length = buffer.readInteger(as: UInt32.self)
        invariant(magic == NBDMagic.optionReply, "bad option reply magic")
        invariant(code == option, "reply for option \(String(describing: code)) answers option \(option)")
        invariant(type == reply.type && length.map(Int.init) == reply.payload.count, "reply header disagrees with its payload")
        invariant(reply.payload.count <= 2 * NBDWireSize.stringBytesMax + 16, "option reply payload of \(reply.payload.count) bytes")
        guard let length, buffer.readSlice(length: Int(length)) != nil else {
            invariant(false, "option reply shorter than its header says")
            return
        }
        let isFinal = reply.type == NBDOptionReplyType.ack || reply.isError
        invariant(isFinal == (index == replies.count - 1), "final reply \(reply.type) at \(index) of \(replies.count) (\(context))")
        if !isFinal {
            invariant([NBDOptionReplyType.server, NBDOptionReplyType.info, NBDOptionReplyType.metaContext].contains(reply.type),
                      "informational reply of unknown type \(reply.type)")
        }
    }
    invariant(buffer.readableBytes == 0, "option replies encode trailing bytes")
}

/// The transmission phase of one connection.
struct TransmissionDriver {
    private(set) var machine: NBDTransmissionStateMachine
    private var inFlight: [NBDOperation] = []
    private(set) var closed = false

    init(export: NBDNegotiatedExport, inFlightMax: Int) {
        machine = NBDTransmissionStateMachine(export: export, inFlightMax: inFlightMax)
    }

    var canAcceptRequest: Bool { machine.canAcceptRequest }

    /// Completes one in-flight request (the device finished it): the server's completion path.
    mutating func completeOne(choices: inout FuzzChoices) {
        guard !inFlight.isEmpty else { return }
        inFlight.remove(at: choices.below(inFlight.count))
        let action = machine.requestCompleted()
        invariant(machine.inFlight == inFlight.count, "machine counts \(machine.inFlight) in flight, harness \(inFlight.count)")
        switch action {
        case .none:
            invariant(!(machine.isDisconnecting && inFlight.isEmpty), "last completion while draining did not close")
        case .close:
            invariant(machine.isDisconnecting && inFlight.isEmpty, "close after a completion with \(inFlight.count) in flight")
            closed = true
        default:
            invariant(false, "completion returned \(action)")
        }
    }

    /// One request from the parser.
    mutating func received(_ request: NBDRequest, choices: inout FuzzChoices) {
        let export = machine.export
        // The server only reads while the machine can take a request (canTakeInput).
        invariant(machine.canAcceptRequest, "request read while the machine cannot accept one")
        if let payload = request.payload {
            invariant(payload.readableBytes == Int(request.length) && payload.readableBytes <= export.requestBytesMax,
                      "WRITE payload of \(payload.readableBytes) bytes for length \(request.length)")
        }
        let before = machine.inFlight
        let action = machine.requestReceived(request)
        switch action {
        case .execute(let operation):
            invariant(!request.payloadDiscarded, "a WRITE whose payload was discarded was executed")
            invariant(operation.handle == request.handle && operation.command == request.command,
                      "operation \(operation) for request \(request.handle)")
            invariant(machine.inFlight == before + 1 && machine.inFlight <= machine.inFlightMax, "in-flight count")
            checkOperation(operation, request: request, export: export, choices: &choices)
            inFlight.append(operation)
        case .replyError(let rejection):
            invariant(rejection.handle == request.handle, "error reply for handle \(rejection.handle), request \(request.handle)")
            invariant(machine.inFlight == before, "a rejected request changed the in-flight count")
            var buffer = ByteBuffer()
            NBDReplyEncoder.writeError(rejection, structured: export.structuredReplies, into: &buffer)
            checkReply(&buffer, handle: request.handle, structured: export.structuredReplies, expectError: true)
        case .close:
            invariant(request.command == .disconnect && inFlight.isEmpty, "close on \(request.type) with \(inFlight.count) in flight")
            closed = true
        case .closeWhenIdle:
            invariant(request.command == .disconnect && !inFlight.isEmpty, "closeWhenIdle on \(request.type)")
            invariant(!machine.canAcceptRequest, "accepting requests after NBD_CMD_DISC")
            while !closed { completeOne(choices: &choices) }
        case .abort, .none:
            // The harness reads only while canAcceptRequest and stops after DISC, as the server does.
            invariant(false, "request \(request.handle) type \(request.type) got \(action)")
        }
    }

    /// A validated operation is within the export and the limits, and its reply plan is well-formed.
    private func checkOperation(_ operation: NBDOperation, request: NBDRequest, export: NBDNegotiatedExport,
                                choices: inout FuzzChoices) {
        let size = export.export.size
        invariant(request.offset <= size && UInt64(request.length) <= size - request.offset || operation.command == .flush,
                  "operation beyond the export: \(request.offset)+\(request.length) > \(size)")
        invariant(!(export.export.isReadOnly && operation.command.isWriting), "write executed on a read-only export")
        var buffer = ByteBuffer()
        switch operation {
        case .read(let handle, let offset, let length, let dontFragment):
            invariant(Int(length) <= export.requestBytesMax && length > 0, "READ of \(length) bytes")
            invariant(!dontFragment || export.transmissionFlags.contains(.sendDF), "DF without SEND_DF")
            // NBDOperationJob's plan: one data piece without structured replies or with DF.
            var segments: [NBDReadSegment] = [.data(offset: offset, length: length)]
            if export.structuredReplies && !dontFragment {
                let extents = deviceExtents(length: UInt64(length), choices: &choices)
                segments = NBDReplyPlanning.readSegments(offset: offset, length: length, extents: extents)
                checkReadSegments(segments, offset: offset, length: length, extents: extents)
            }
            if !export.structuredReplies { NBDReplyEncoder.writeSimpleReply(handle: handle, error: nil, into: &buffer) }
            for (index, segment) in segments.enumerated() {
                let done = index == segments.count - 1
                switch segment {
                case .hole(let holeOffset, let holeLength):
                    NBDReplyEncoder.writeOffsetHole(handle: handle, offset: holeOffset, length: holeLength, done: done, into: &buffer)
                case .data(let dataOffset, let dataLength):
                    if export.structuredReplies {
                        NBDReplyEncoder.writeOffsetDataHeader(handle: handle, offset: dataOffset, dataLength: dataLength,
                                                              done: done, into: &buffer)
                    }
                    // The data itself is the device's and is not encoded here (up to 32 MiB a request).
                }
            }
            checkReply(&buffer, handle: handle, structured: export.structuredReplies, expectError: false,
                       readRange: (offset, length))
        case .blockStatus(let handle, _, let length, let onlyOne, let contexts):
            invariant(!contexts.isEmpty && contexts == export.metaContexts, "BLOCK_STATUS contexts \(contexts)")
            let extents = deviceExtents(length: UInt64(length), choices: &choices)
            for (index, context) in contexts.enumerated() {
                var descriptors = NBDReplyPlanning.blockStatusDescriptors(context: context, extents: extents,
                                                                          length: length, onlyOne: onlyOne)
                checkDescriptors(descriptors, context: context, extents: extents, length: length, onlyOne: onlyOne)
                if descriptors.isEmpty { descriptors = [NBDBlockDescriptor(length: length, flags: 0)] }
                NBDReplyEncoder.writeBlockStatusChunk(handle: handle, contextID: context.id, descriptors: descriptors,
                                                      done: index == contexts.count - 1, into: &buffer)
            }
            checkReply(&buffer, handle: handle, structured: true, expectError: false)
        case .write(let handle, _, let length, _):
            invariant(Int(length) <= export.requestBytesMax, "WRITE of \(length) bytes")
            writeSuccess(handle, structured: export.structuredReplies, into: &buffer)
            checkReply(&buffer, handle: handle, structured: export.structuredReplies, expectError: false)
        case .flush(let handle), .trim(let handle, _, _, _), .writeZeroes(let handle, _, _, _, _, _), .cache(let handle, _, _):
            writeSuccess(handle, structured: export.structuredReplies, into: &buffer)
            checkReply(&buffer, handle: handle, structured: export.structuredReplies, expectError: false)
        }
    }

    private func writeSuccess(_ handle: UInt64, structured: Bool, into buffer: inout ByteBuffer) {
        if structured {
            NBDReplyEncoder.writeNoneChunk(handle: handle, into: &buffer)
        } else {
            NBDReplyEncoder.writeSimpleReply(handle: handle, error: nil, into: &buffer)
        }
    }

    /// What a device's `extents` may return for a range: runs of any flags, possibly stopping
    /// short (the extent cap) or running past the end.
    private func deviceExtents(length: UInt64, choices: inout FuzzChoices) -> [Extent] {
        var extents: [Extent] = []
        var covered: UInt64 = 0
        let count = choices.below(12)
        let flagChoices: [ExtentFlags] = [[], [.hole, .zero], [.zero], [.shared], [.shared, .zero], [.hole]]
        for index in 0..<count {
            let left = length > covered ? length - covered : 0
            var run: UInt64
            switch choices.below(4) {
            case 0: run = UInt64(choices.below(8)) * 512
            case 1: run = UInt64(choices.below(8192)) + 1
            case 2: run = left
            default: run = left + UInt64(choices.below(1 << 20))
            }
            if index == count - 1 && choices.coin() { run = max(run, left) }
            extents.append(Extent(length: run, flags: flagChoices[choices.below(flagChoices.count)]))
            covered += run
        }
        return extents
    }
}

/// Segments tile [offset, offset+length) in order; holes only over zero extents and at least
/// `holeBytesMin`; no two data segments adjacent (they merge).
func checkReadSegments(_ segments: [NBDReadSegment], offset: UInt64, length: UInt32, extents: [Extent]) {
    invariant(!segments.isEmpty, "empty read plan")
    var position = offset
    var previousWasData = false
    for segment in segments {
        switch segment {
        case .data(let start, let count):
            invariant(start == position && count > 0, "data segment at \(start)+\(count), expected \(position)")
            invariant(!previousWasData, "adjacent data segments not merged")
            previousWasData = true
            position += UInt64(count)
        case .hole(let start, let count):
            invariant(start == position && UInt64(count) >= NBDReplyPlanning.holeBytesMin, "hole \(start)+\(count)")
            invariant(rangeIsZero(start - offset, UInt64(count), extents), "hole over data at \(start)+\(count)")
            previousWasData = false
            position += UInt64(count)
        }
    }
    invariant(position == offset + UInt64(length), "read plan ends at \(position), range at \(offset + UInt64(length))")
}

private func rangeIsZero(_ relativeStart: UInt64, _ count: UInt64, _ extents: [Extent]) -> Bool {
    var extentStart: UInt64 = 0
    let end = relativeStart + count
    for extent in extents {
        let extentEnd = extentStart + extent.length
        if extentEnd > relativeStart && extentStart < end && !extent.flags.contains(.zero) { return false }
        extentStart = extentEnd
        if extentStart >= end { return true }
    }
    return false
}

/// Descriptors: each non-empty, total within the request (equal to it when the extents cover
/// it), neighbours of different flags, flags within the context's meaning, REQ_ONE honoured.
func checkDescriptors(_ descriptors: [NBDBlockDescriptor], context: NBDMetaContext, extents: [Extent],
                      length: UInt32, onlyOne: Bool) {
    var total: UInt64 = 0
    for (index, descriptor) in descriptors.enumerated() {
        invariant(descriptor.length > 0, "empty descriptor")
        if index > 0 { invariant(descriptors[index - 1].flags != descriptor.flags, "equal neighbours not merged") }
        let allowed: UInt32 = context == .baseAllocation ? 3 : 1
        invariant(descriptor.flags & ~allowed == 0, "flags \(descriptor.flags) outside \(context)")
        total += UInt64(descriptor.length)
    }
    invariant(total <= UInt64(length), "descriptors cover \(total) bytes of a \(length)-byte request")
    invariant(!onlyOne || descriptors.count <= 1, "REQ_ONE answered with \(descriptors.count) descriptors")
    let covered = extents.reduce(UInt64(0)) { $0 &+ $1.length }
    if covered >= UInt64(length) && !onlyOne {
        invariant(total == UInt64(length), "extents cover the request but descriptors only \(total)")
    }
}

/// Decodes a transmission reply as a client would and checks it: magic, handle, for structured
/// replies the chunk lengths and that only the last chunk is DONE; for a READ, that data and holes
/// cover the requested range exactly once. A READ's data bytes are not in `buffer` (each data chunk
/// header is followed directly by the next chunk).
func checkReply(_ buffer: inout ByteBuffer, handle: UInt64, structured: Bool, expectError: Bool,
                readRange: (offset: UInt64, length: UInt32)? = nil) {
    if !structured {
        invariant(buffer.readInteger(as: UInt32.self) == NBDMagic.simpleReply, "simple reply magic")
        let error = buffer.readInteger(as: UInt32.self)
        invariant((error != 0) == expectError, "simple reply error \(String(describing: error))")
        invariant(buffer.readInteger(as: UInt64.self) == handle, "simple reply handle")
        if let error, error != 0 { invariant(NBDError(rawValue: error) != nil, "unknown error value \(error)") }
        invariant(buffer.readableBytes == 0, "simple reply carries \(buffer.readableBytes) more bytes")
        return
    }
    var covered: UInt64 = 0
    var sawDone = false
    while buffer.readableBytes > 0 {
        invariant(!sawDone, "chunk after the DONE chunk")
        guard let magic = buffer.readInteger(as: UInt32.self), let flags = buffer.readInteger(as: UInt16.self),
              let type = buffer.readInteger(as: UInt16.self), let chunkHandle = buffer.readInteger(as: UInt64.self),
              let length = buffer.readInteger(as: UInt32.self),
              var payload = buffer.readSlice(length: type == NBDStructuredReply.typeOffsetData ? min(8, Int(length)) : Int(length))
        else {
            invariant(false, "truncated structured reply chunk")
            return
        }
        invariant(magic == NBDMagic.structuredReply && chunkHandle == handle, "chunk magic or handle")
        invariant(flags & ~NBDStructuredReply.flagDone == 0, "chunk flags \(flags)")
        sawDone = flags & NBDStructuredReply.flagDone != 0
        let isError = type & 0x8000 != 0
        invariant(isError == expectError, "chunk type \(type) in a reply expected to \(expectError ? "fail" : "succeed")")
        switch type {
        case NBDStructuredReply.typeError:
            let error = payload.readInteger(as: UInt32.self) ?? 0
            let messageLength = payload.readInteger(as: UInt16.self)
            invariant(NBDError(rawValue: error) != nil, "error chunk value \(error)")
            invariant(messageLength.map(Int.init) == payload.readableBytes && payload.readableBytes <= NBDWireSize.stringBytesMax,
                      "error chunk message length")
        case NBDStructuredReply.typeNone:
            invariant(length == 0 && readRange == nil, "NONE chunk of \(length) bytes")
        case NBDStructuredReply.typeOffsetData, NBDStructuredReply.typeOffsetHole:
            guard let range = readRange, let offset = payload.readInteger(as: UInt64.self) else {
                invariant(false, "data chunk outside a READ")
                return
            }
            invariant(type != NBDStructuredReply.typeOffsetData || length > 8, "data chunk of \(length) bytes")
            let count = type == NBDStructuredReply.typeOffsetData ? UInt64(length) - 8
                                                                   : UInt64(payload.readInteger(as: UInt32.self) ?? 0)
            invariant(count > 0 && offset == range.offset + covered, "chunk at \(offset)+\(count), expected \(range.offset + covered)")
            if type == NBDStructuredReply.typeOffsetHole { invariant(payload.readableBytes == 0, "hole chunk length") }
            covered += count
        case NBDStructuredReply.typeBlockStatus:
            let contextID = payload.readInteger(as: UInt32.self)
            invariant(contextID.flatMap(NBDMetaContext.init(rawValue:)) != nil, "block status for context \(String(describing: contextID))")
            invariant(payload.readableBytes > 0 && payload.readableBytes % 8 == 0, "block status descriptors")
        default:
            invariant(false, "chunk type \(type)")
        }
    }
    invariant(sawDone, "structured reply without a DONE chunk")
    if let range = readRange { invariant(covered == UInt64(range.length), "READ reply covers \(covered) of \(range.length) bytes") }
}

/// Feeds `bytes` (from `start`) through a parser and the session machines. With `handshake` nil the
/// session starts in the transmission phase with `export`.
struct NBDSession {
    let configuration: SessionConfiguration
    var parser: NBDMessageParser
    var handshake: NBDHandshakeStateMachine?
    var transmission: TransmissionDriver?
    var choices: FuzzChoices
    var optionsSeen = 0
    var finished = false
    var tlsActive = false
    static let inFlightMax = Limits.nbdInFlightRequestsMax

    init(configuration: SessionConfiguration, choices: FuzzChoices) {
        self.configuration = configuration
        self.choices = choices
        parser = NBDMessageParser(optionBytesMax: Limits.nbdOptionBytesMax, requestBytesMax: configuration.requestBytesMax)
        handshake = NBDHandshakeStateMachine(configuration: .init(
            tlsPolicy: configuration.tlsPolicy, optionsMax: Limits.nbdHandshakeOptionsMax,
            requestBytesMax: configuration.requestBytesMax))
    }

    init(transmissionOf export: NBDNegotiatedExport, configuration: SessionConfiguration, choices: FuzzChoices) {
        self.configuration = configuration
        self.choices = choices
        parser = NBDMessageParser(optionBytesMax: Limits.nbdOptionBytesMax, requestBytesMax: export.requestBytesMax)
        parser.enterTransmission()
        transmission = TransmissionDriver(export: export, inFlightMax: Self.inFlightMax)
    }

    mutating func run(_ bytes: UnsafeBufferPointer<UInt8>) {
        var buffer = ByteBuffer()
        for range in configuration.segmentation.chunks(bytes.count, choices: &choices) {
            buffer.writeBytes(UnsafeBufferPointer(rebasing: bytes[range]))
            drain(&buffer)
            if finished { return }
            buffer.discardReadBytes()
        }
        // End of input: the client's connection closed. Requests in flight still complete.
        if var driver = transmission {
            while machineHasWork(driver) { driver.completeOne(choices: &choices) }
            transmission = driver
        }
    }

    private func machineHasWork(_ driver: TransmissionDriver) -> Bool { driver.machine.inFlight > 0 && !driver.closed }

    private mutating func drain(_ buffer: inout ByteBuffer) {
        while !finished {
            if var driver = transmission {
                // The server stops reading at the in-flight limit until a completion, and
                // completes work in any order meanwhile.
                while !driver.closed && (!driver.canAcceptRequest || (driver.machine.inFlight > 0 && choices.below(4) == 0)) {
                    driver.completeOne(choices: &choices)
                }
                transmission = driver
                if driver.closed { finished = true; return }
            }
            let before = buffer.readableBytes
            let message: NBDClientMessage?
            do {
                message = try parser.nextMessage(from: &buffer)
            } catch {
                finished = true  // the server closes the connection
                return
            }
            guard let message else {
                checkParserHoldsNoCompleteMessage(buffer)
                return
            }
            invariant(buffer.readableBytes < before, "parser returned a message without consuming input")
            handle(message)
        }
    }

    /// "No unbounded buffering": when the parser asks for more bytes, what it left in the buffer
    /// is less than one message's worth.
    private func checkParserHoldsNoCompleteMessage(_ buffer: ByteBuffer) {
        let left = buffer.readableBytes
        if parser.isAtMessageBoundary {
            let header = transmission != nil ? NBDWireSize.requestHeader : NBDWireSize.optionHeader
            invariant(left < header, "parser at a boundary left \(left) bytes unparsed")
        } else if parser.pendingPayloadBytes > 0 {
            invariant(parser.pendingPayloadBytes <= max(Limits.nbdOptionBytesMax, configuration.requestBytesMax, parser.requestBytesMax),
                      "parser waits for \(parser.pendingPayloadBytes) payload bytes, above every limit")
            invariant(left < parser.pendingPayloadBytes, "parser waits for \(parser.pendingPayloadBytes) bytes holding \(left)")
        } else {
            invariant(left == 0, "parser discarding a payload kept \(left) bytes")
        }
    }

    private mutating func handle(_ message: NBDClientMessage) {
        switch message {
        case .clientFlags(let flags):
            guard var machine = handshake else { invariant(false, "client flags during transmission"); return }
            let action = machine.clientFlagsReceived(flags)
            handshake = machine
            perform(action, option: nil, name: nil)
        case .option(let code, let payload):
            guard var machine = handshake else { invariant(false, "option during transmission"); return }
            invariant(payload.readableBytes <= Limits.nbdOptionBytesMax, "option payload of \(payload.readableBytes) bytes")
            let option = NBDOption(code: code, payload: payload)
            invariant(option.code == code, "option \(code) parsed as \(option.code)")
            optionsSeen += 1
            let action = machine.optionReceived(option)
            handshake = machine
            if optionsSeen > Limits.nbdHandshakeOptionsMax {
                invariant(action == .sendAndClose([], .tooManyOptions(limit: Limits.nbdHandshakeOptionsMax)),
                          "option \(optionsSeen) beyond the limit got \(action)")
            }
            if configuration.tlsPolicy == .required && !tlsActive {
                switch option {
                case .startTLS, .abort: break
                case .exportName:
                    invariant(action == .sendAndClose([], .tlsRequired) || optionsSeen > Limits.nbdHandshakeOptionsMax,
                              "EXPORT_NAME before TLS got \(action)")
                default:
                    if case .send(let replies) = action {
                        invariant(replies.count == 1 && replies[0].type == NBDOptionReplyType.errTLSRequired,
                                  "option \(code) before TLS answered \(replies.map(\.type))")
                    } else {
                        invariant(optionsSeen > Limits.nbdHandshakeOptionsMax, "option \(code) before TLS got \(action)")
                    }
                }
            }
            var name: String?
            switch option {
            case .exportName(let exportName): name = exportName
            case .go(let query), .info(let query): name = query.name
            default: break
            }
            perform(action, option: code, name: name)
        case .request(let request):
            guard var driver = transmission else { invariant(false, "request during the handshake"); return }
            driver.received(request, choices: &choices)
            transmission = driver
            if driver.closed { finished = true }
        }
    }

    /// Carries out a handshake action as NBDConnectionHandler.perform does, reporting the
    /// scripted results back to the machine.
    private mutating func perform(_ action: NBDHandshakeStateMachine.Action, option: UInt32?, name: String?) {
        guard var machine = handshake else { return }
        switch action {
        case .send(let replies):
            if let option {
                checkOptionReplies(replies, option: option, context: "send")
            } else {
                invariant(replies.isEmpty, "replies to a non-option event")
            }
            invariant(machine.isAwaitingOption, "machine not awaiting an option after .send")
        case .openExport(let requested):
            invariant(requested == name, "opening export \(requested) for option naming \(String(describing: name))")
            let next = machine.exportOpened(configuration.lookup(requested))
            handshake = machine
            perform(next, option: option, name: name)
            return
        case .listExports:
            invariant(option == NBDOptionCode.list, "list for option \(String(describing: option))")
            let next = choices.below(8) == 0
                ? machine.exportListFailed(NBDExportLookupError(replyType: NBDOptionReplyType.errShutdown, message: "stopping"))
                : machine.exportListReceived([(name: "vm0", description: "a volume"), (name: "vm0@s", description: "")])
            handshake = machine
            perform(next, option: option, name: name)
            return
        case .startTLS(let reply):
            invariant(option == NBDOptionCode.startTLS && configuration.tlsPolicy != .disabled && !tlsActive, "STARTTLS accepted")
            checkOptionReplies([reply], option: NBDOptionCode.startTLS, context: "starttls")
            // The TLS handshake succeeds; the rest of the input is what the client sends inside it.
            let next = machine.tlsHandshakeCompleted()
            tlsActive = true
            invariant(machine.isTLSActive, "TLS not active after the handshake")
            handshake = machine
            perform(next, option: nil, name: nil)
            return
        case .enterTransmission(let final, let negotiated):
            invariant(option == NBDOptionCode.go || option == NBDOptionCode.exportName, "transmission after option \(String(describing: option))")
            invariant(configuration.tlsPolicy != .required || tlsActive, "transmission without the required TLS")
            var buffer = ByteBuffer()
            final.encode(into: &buffer)
            switch final {
            case .optionReplies(let replies):
                invariant(option == NBDOptionCode.go, "option replies ending EXPORT_NAME")
                checkOptionReplies(replies, option: NBDOptionCode.go, context: "go")
                invariant(replies.last?.type == NBDOptionReplyType.ack, "GO ended without an ACK")
            case .exportName(let size, _, let zeroPadding):
                invariant(size == negotiated.export.size, "EXPORT_NAME reply size")
                invariant(buffer.readableBytes == 10 + (zeroPadding ? NBDWireSize.exportNameZeroPadding : 0), "EXPORT_NAME reply length")
            }
            invariant(negotiated.transmissionFlags.contains(.hasFlags), "transmission flags without HAS_FLAGS")
            invariant(negotiated.transmissionFlags.contains(.readOnly) == negotiated.export.isReadOnly, "READ_ONLY flag")
            invariant(negotiated.metaContexts.isEmpty || negotiated.structuredReplies, "contexts without structured replies")
            invariant(negotiated.requestBytesMax == configuration.requestBytesMax, "request limit changed")
            handshake = nil
            parser.enterTransmission()
            transmission = TransmissionDriver(export: negotiated, inFlightMax: Self.inFlightMax)
            return
        case .sendAndClose(let replies, let reason):
            if case .outOfOrder(let detail) = reason {
                invariant(false, "the harness drove the machine as the server does, yet: \(detail)")
            }
            if reason == .clientAborted {
                invariant(option == NBDOptionCode.abort, "abort reason for option \(String(describing: option))")
                checkOptionReplies(replies, option: NBDOptionCode.abort, context: "abort")
            } else {
                invariant(replies.isEmpty, "replies before closing for \(reason)")
            }
            finished = true
        }
        handshake = machine
    }
}
