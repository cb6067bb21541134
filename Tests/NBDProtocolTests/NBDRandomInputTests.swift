import NBDProtocol
import NIOCore
import Testing
import VBDCore

/// Drives parser and both state machines with random, mostly-plausible input, the way the server
/// does, and checks that nothing traps and the invariants hold. Seeds are fixed so a failure replays.
@Suite struct NBDRandomInputTests {
    /// Mostly plausible sessions (flags, options, GO, requests) with corruption sprinkled in, so that
    /// every state is reached and every kind of damage meets every state.
    static func randomSession(_ rng: inout SplitMix64) -> [UInt8] {
        var bytes: [UInt8] = []
        func garbage(_ rng: inout SplitMix64) -> [UInt8] {
            (0..<Int.random(in: 1...40, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        }
        func option(_ code: UInt32, _ payload: [UInt8], _ rng: inout SplitMix64) -> [UInt8] {
            var payload = payload
            if rng.next() % 8 == 0, !payload.isEmpty {
                payload[Int.random(in: 0..<payload.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
            }
            let announced: UInt32? = rng.next() % 30 == 0 ? UInt32.random(in: 0...UInt32.max, using: &rng) : nil
            var buffer = ByteBuffer()
            NBDClientEncoder.writeOption(code, payload: payload, announcedLength: announced, into: &buffer)
            return Array(buffer.readableBytesView)
        }
        let flags: UInt32 = rng.next() % 20 == 0 ? UInt32.random(in: 0...UInt32.max, using: &rng) : [1, 3].randomElement(using: &rng)!
        bytes += withUnsafeBytes(of: flags.bigEndian, Array.init)
        for _ in 0..<Int.random(in: 0...6, using: &rng) {
            let code = UInt32.random(in: 0...13, using: &rng)
            switch code {
            case NBDOptionCode.go, NBDOptionCode.exportName, NBDOptionCode.abort:
                continue  // the session's end is chosen below
            case NBDOptionCode.info:
                bytes += option(code, NBDClientEncoder.exportQueryPayload(name: ["vol", "x"].randomElement(using: &rng)!,
                                                                          informationRequests: [0, 1, 2, 3]), &rng)
            case NBDOptionCode.setMetaContext, NBDOptionCode.listMetaContext:
                bytes += option(code, NBDClientEncoder.metaContextPayload(
                    exportName: "vol", queries: ["base:allocation", "x-vbd:sharing", "x-vbd:", "qemu:x"].shuffled(using: &rng)), &rng)
            default:
                bytes += option(code, [], &rng)
            }
            if rng.next() % 25 == 0 { bytes += garbage(&rng) }
        }
        switch rng.next() % 10 {
        case 0: bytes += option(NBDOptionCode.abort, [], &rng)
        case 1, 2: bytes += option(NBDOptionCode.exportName, Array("vol".utf8), &rng)
        default: bytes += option(NBDOptionCode.go, NBDClientEncoder.exportQueryPayload(name: "vol"), &rng)
        }
        for _ in 0..<Int.random(in: 0...30, using: &rng) {
            if rng.next() % 40 == 0 { bytes += garbage(&rng) }
            var buffer = ByteBuffer()
            let type = rng.next() % 8 == 0 ? UInt16.random(in: 0...9, using: &rng) : [0, 1, 3, 4, 5, 6, 7].randomElement(using: &rng)!
            let length: UInt32 = rng.next() % 10 == 0 ? [0, UInt32.max, 33 << 20].randomElement(using: &rng)! : [512, 4096].randomElement(using: &rng)!
            let offset: UInt64 = rng.next() % 10 == 0 ? [1 << 30, UInt64.max].randomElement(using: &rng)! : UInt64.random(in: 0..<1024, using: &rng) * 4096
            let flags = NBDCommandFlags(rawValue: rng.next() % 4 == 0 ? UInt16.random(in: 0...63, using: &rng) : 0)
            NBDClientEncoder.writeRequest(type: type, flags: flags, handle: rng.next(), offset: type == 3 ? 0 : offset,
                                          length: type == 3 ? 0 : length, into: &buffer)
            if type == NBDCommand.write.rawValue, length <= 4096 {
                buffer.writeRepeatingByte(7, count: Int(length))
            }
            bytes += buffer.readableBytesView
        }
        if rng.next() % 2 == 0 {
            var buffer = ByteBuffer()
            NBDClientEncoder.writeRequest(type: NBDCommand.disconnect.rawValue, handle: 0, offset: 0, length: 0, into: &buffer)
            bytes += buffer.readableBytesView
        }
        return bytes
    }

    @Test(arguments: 0..<200)
    func randomSessionsNeverTrapAndKeepInvariants(seed: Int) {
        _ = Self.run(seed: seed)
    }

    /// The generator must reach the interesting states, or the test above proves little.
    @Test func randomSessionsReachTransmissionAndExecuteRequests() {
        let results = (0..<200).map { Self.run(seed: $0) }
        #expect(results.filter(\.reachedTransmission).count >= 20)
        #expect(results.reduce(0) { $0 + $1.executed } >= 20)
        #expect(results.reduce(0) { $0 + $1.rejected } >= 20)
    }

    static func run(seed: Int) -> (reachedTransmission: Bool, executed: Int, rejected: Int) {
        var executed = 0, rejected = 0
        var rng = SplitMix64(seed: UInt64(seed))
        let bytes = Self.randomSession(&rng)
        var parser = NBDMessageParser(optionBytesMax: 4096, requestBytesMax: 1 << 20)
        var handshake = NBDHandshakeStateMachine(configuration: .init(
            tlsPolicy: [.disabled, .optional, .required].randomElement(using: &rng)!, optionsMax: 32, requestBytesMax: 1 << 20))
        var transmission: NBDTransmissionStateMachine?
        var buffer = ByteBuffer()
        var index = 0
        session: while index < bytes.count {
            let step = Int.random(in: 1...64, using: &rng)
            buffer.writeBytes(bytes[index..<min(bytes.count, index + step)])
            index += step
            while true {
                if var machine = transmission, !machine.canAcceptRequest {
                    if machine.isDisconnecting && machine.inFlight == 0 { break session }
                    if machine.inFlight > 0 { _ = machine.requestCompleted() }
                    transmission = machine
                    if machine.isDisconnecting { break session }
                    continue
                }
                let message: NBDClientMessage?
                do { message = try parser.nextMessage(from: &buffer) } catch { break session }
                guard let message else { break }
                switch message {
                case .clientFlags(let flags):
                    if case .sendAndClose = handshake.clientFlagsReceived(flags) { break session }
                case .option(let code, let payload):
                    var action = handshake.optionReceived(NBDOption(code: code, payload: payload))
                    while true {
                        switch action {
                        case .send:
                            break
                        case .sendAndClose:
                            break session
                        case .listExports:
                            action = handshake.exportListReceived([("vol", "d")])
                            continue
                        case .startTLS:
                            action = handshake.tlsHandshakeCompleted()
                            continue
                        case .openExport(let name):
                            action = name == "vol"
                                ? handshake.exportOpened(.success(NBDExportDescription(name: "vol", description: "", size: 1 << 30,
                                                                                        isReadOnly: rng.next() % 2 == 0,
                                                                                        preferredBlockSize: 4096)))
                                : handshake.exportOpened(.failure(.init(replyType: NBDOptionReplyType.errUnknown, message: "no")))
                            continue
                        case .enterTransmission(_, let negotiated):
                            parser.enterTransmission()
                            transmission = NBDTransmissionStateMachine(export: negotiated, inFlightMax: 4)
                        }
                        break
                    }
                case .request(let request):
                    guard var machine = transmission else {
                        Issue.record("request before transmission")
                        return (false, executed, rejected)
                    }
                    switch machine.requestReceived(request) {
                    case .execute(let operation):
                        executed += 1
                        #expect(operation.handle == request.handle)
                        if case .write = operation { #expect(request.payload?.readableBytes == Int(request.length)) }
                    case .replyError(let rejection):
                        rejected += 1
                        #expect(rejection.handle == request.handle)
                    case .close, .abort:
                        break session
                    case .closeWhenIdle, .none:
                        break
                    }
                    #expect(machine.inFlight <= machine.inFlightMax)
                    transmission = machine
                }
            }
            #expect(buffer.readableBytes <= 4096 + (1 << 20) + 64, "parser buffered beyond one message")
        }
        return (transmission != nil, executed, rejected)
    }
}
