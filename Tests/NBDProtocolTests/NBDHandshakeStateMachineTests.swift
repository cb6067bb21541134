import NBDProtocol
import NIOCore
import Testing
import VBDCore

extension NBDExportDescription {
    static func fixture(readOnly: Bool = false, name: String = "vol") -> NBDExportDescription {
        NBDExportDescription(name: name, description: "test", size: 1 << 30, isReadOnly: readOnly, preferredBlockSize: 4096)
    }
}

func makeHandshake(tls: NBDHandshakeStateMachine.TLSPolicy = .disabled, optionsMax: Int = 32) -> NBDHandshakeStateMachine {
    var machine = NBDHandshakeStateMachine(configuration: .init(tlsPolicy: tls, optionsMax: optionsMax,
                                                                requestBytesMax: 32 << 20))
    #expect(machine.clientFlagsReceived(NBDClientFlags([.fixedNewstyle, .noZeroes]).rawValue) == .send([]))
    return machine
}

func goOption(_ name: String = "vol", infos: [UInt16] = []) -> NBDOption {
    .go(NBDExportQuery(name: name, informationRequests: infos))
}

@Suite struct NBDHandshakeStateMachineTests {
    @Test func greetingIsNBDMagicIHaveOptAndFlags() {
        var buffer = ByteBuffer()
        NBDHandshakeStateMachine.greeting(into: &buffer)
        #expect(Array(buffer.readableBytesView) == Array("NBDMAGICIHAVEOPT".utf8) + [0, 3])
    }

    @Test func unknownClientFlagsCloseTheConnection() {
        var machine = NBDHandshakeStateMachine(configuration: .init(tlsPolicy: .disabled, optionsMax: 4, requestBytesMax: 1024))
        #expect(machine.clientFlagsReceived(0x8000_0001) == .sendAndClose([], .unknownClientFlags(0x8000_0001)))
    }

    @Test func goWithStructuredRepliesAndContextsNegotiatesEverything() {
        var machine = makeHandshake()
        #expect(machine.optionReceived(.structuredReply) == .send([.ack(NBDOptionCode.structuredReply)]))
        let code = NBDOptionCode.setMetaContext
        #expect(machine.optionReceived(.setMetaContext(exportName: "vol", queries: ["base:allocation", "x-vbd:sharing", "qemu:dirty-bitmap:x"]))
                == .send([.metaContext(code, id: 1, name: "base:allocation"), .metaContext(code, id: 2, name: "x-vbd:sharing"), .ack(code)]))
        #expect(machine.optionReceived(goOption(infos: [NBDInfoType.name, NBDInfoType.description])) == .openExport(name: "vol"))
        let action = machine.exportOpened(.success(.fixture()))
        guard case .enterTransmission(.optionReplies(let replies), let negotiated) = action else {
            Issue.record("expected transmission, got \(action)")
            return
        }
        let go = NBDOptionCode.go
        let flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendDF,
                                           .canMultiConn, .sendCache, .sendFastZero]
        #expect(replies == [
            .infoExport(go, size: 1 << 30, flags: flags),
            .infoString(go, infoType: NBDInfoType.name, "vol"),
            .infoString(go, infoType: NBDInfoType.description, "test"),
            .infoBlockSize(go, minimum: 1, preferred: 4096, maximum: 32 << 20),
            .ack(go),
        ])
        #expect(negotiated.structuredReplies && negotiated.metaContexts == [.baseAllocation, .vbdSharing])
        #expect(negotiated.transmissionFlags == flags)
    }

    @Test func contextsForAnotherExportAreDropped() {
        var machine = makeHandshake()
        _ = machine.optionReceived(.structuredReply)
        _ = machine.optionReceived(.setMetaContext(exportName: "other", queries: ["base:allocation"]))
        _ = machine.optionReceived(goOption("vol"))
        guard case .enterTransmission(_, let negotiated) = machine.exportOpened(.success(.fixture())) else {
            Issue.record("no transmission")
            return
        }
        #expect(negotiated.metaContexts.isEmpty)
    }

    @Test func metaContextsNeedStructuredRepliesFirst() {
        var machine = makeHandshake()
        let action = machine.optionReceived(.listMetaContext(exportName: "vol", queries: []))
        guard case .send(let replies) = action, replies.count == 1 else { Issue.record("\(action)"); return }
        #expect(replies[0].type == NBDOptionReplyType.errInvalid)
    }

    @Test func listMetaContextWithoutQueriesListsEverythingWithIdZero() {
        var machine = makeHandshake()
        _ = machine.optionReceived(.structuredReply)
        let code = NBDOptionCode.listMetaContext
        #expect(machine.optionReceived(.listMetaContext(exportName: "vol", queries: []))
                == .send([.metaContext(code, id: 0, name: "base:allocation"), .metaContext(code, id: 0, name: "x-vbd:sharing"), .ack(code)]))
    }

    @Test func readOnlyExportAdvertisesNoWriteCommandsAndNoDFWithoutStructuredReplies() {
        var machine = makeHandshake()
        _ = machine.optionReceived(goOption("vol@snap"))
        guard case .enterTransmission(_, let negotiated) = machine.exportOpened(.success(.fixture(readOnly: true))) else {
            Issue.record("no transmission")
            return
        }
        #expect(negotiated.transmissionFlags == [.hasFlags, .readOnly, .sendFlush, .canMultiConn, .sendCache])
    }

    @Test func missingExportOnGoIsAnErrorReplyAndNegotiationContinues() {
        var machine = makeHandshake()
        _ = machine.optionReceived(goOption("nope"))
        let action = machine.exportOpened(.failure(NBDExportLookupError(BlockDeviceError.gone("no export nope"))))
        guard case .send(let replies) = action, replies.count == 1 else { Issue.record("\(action)"); return }
        #expect(replies[0].type == NBDOptionReplyType.errUnknown)
        #expect(machine.isAwaitingOption)
        #expect(machine.optionReceived(.list) == .listExports)
    }

    @Test func exportNameFailureClosesAndSuccessHonoursNoZeroes() {
        var machine = makeHandshake()
        _ = machine.optionReceived(.exportName("nope"))
        guard case .sendAndClose([], .exportNameRejected) = machine.exportOpened(.failure(.init(replyType: NBDOptionReplyType.errUnknown, message: "x"))) else {
            Issue.record("did not close")
            return
        }
        var plain = NBDHandshakeStateMachine(configuration: .init(tlsPolicy: .disabled, optionsMax: 4, requestBytesMax: 1024))
        _ = plain.clientFlagsReceived(NBDClientFlags.fixedNewstyle.rawValue)
        _ = plain.optionReceived(.exportName("vol"))
        guard case .enterTransmission(let final, _) = plain.exportOpened(.success(.fixture())) else { Issue.record("no transmission"); return }
        var buffer = ByteBuffer()
        final.encode(into: &buffer)
        #expect(buffer.readableBytes == 8 + 2 + 124)  // without NO_ZEROES the 124 zero bytes follow
    }

    @Test func abortIsAcknowledgedThenClosed() {
        var machine = makeHandshake()
        #expect(machine.optionReceived(.abort) == .sendAndClose([.ack(NBDOptionCode.abort)], .clientAborted))
    }

    @Test func optionCountIsLimited() {
        var machine = makeHandshake(optionsMax: 3)
        for _ in 0..<3 {
            guard case .send = machine.optionReceived(.unsupported(code: 99)) else { Issue.record("not answered"); return }
        }
        #expect(machine.optionReceived(.unsupported(code: 99)) == .sendAndClose([], .tooManyOptions(limit: 3)))
    }

    @Test func tlsRequiredRefusesEverythingButStartTLSAndAbort() {
        var machine = makeHandshake(tls: .required)
        for option: NBDOption in [.list, .structuredReply, goOption(), .info(NBDExportQuery(name: "vol", informationRequests: []))] {
            let action = machine.optionReceived(option)
            guard case .send(let replies) = action, replies.first?.type == NBDOptionReplyType.errTLSRequired else {
                Issue.record("\(option) -> \(action)")
                return
            }
        }
        #expect(machine.optionReceived(.startTLS) == .startTLS(.ack(NBDOptionCode.startTLS)))
        #expect(machine.tlsHandshakeCompleted() == .send([]))
        #expect(machine.isTLSActive)
        #expect(machine.optionReceived(.list) == .listExports)
        _ = machine.exportListReceived([("vol", "d")])
        let again = machine.optionReceived(.startTLS)
        guard case .send(let replies) = again, replies.first?.type == NBDOptionReplyType.errInvalid else {
            Issue.record("second STARTTLS: \(again)")
            return
        }
        var plain = makeHandshake(tls: .required)
        #expect(plain.optionReceived(.exportName("vol")) == .sendAndClose([], .tlsRequired))
    }

    @Test func startTLSForgetsWhatWasNegotiatedInPlaintext() {
        var machine = makeHandshake(tls: .optional)
        _ = machine.optionReceived(.structuredReply)
        _ = machine.optionReceived(.startTLS)
        _ = machine.tlsHandshakeCompleted()
        _ = machine.optionReceived(goOption())
        guard case .enterTransmission(_, let negotiated) = machine.exportOpened(.success(.fixture())) else {
            Issue.record("no transmission")
            return
        }
        #expect(!negotiated.structuredReplies)
    }

    @Test func startTLSWithoutTLSConfiguredIsPolicyError() {
        var machine = makeHandshake(tls: .disabled)
        guard case .send(let replies) = machine.optionReceived(.startTLS) else { Issue.record("closed"); return }
        #expect(replies.first?.type == NBDOptionReplyType.errPolicy)
    }
}

/// Events in an order the handshake does not expect: a client (or a transport that re-enters the
/// read path after a failed write) controls when they arrive, so each must end the connection
/// with `outOfOrder`, never trap.
@Suite struct HandshakeEventOrderTests {
    @Test func anOptionAfterTheHandshakeEndedClosesTheConnection() {
        var machine = makeHandshake()
        #expect(machine.optionReceived(goOption()) == .openExport(name: "vol"))
        guard case .enterTransmission = machine.exportOpened(.success(.fixture())) else {
            Issue.record("expected transmission")
            return
        }
        guard case .sendAndClose([], .outOfOrder) = machine.optionReceived(.list) else {
            Issue.record("an option after GO must close the connection")
            return
        }
    }

    @Test func clientFlagsTwiceCloseTheConnection() {
        var machine = makeHandshake()
        guard case .sendAndClose([], .outOfOrder) = machine.clientFlagsReceived(3) else {
            Issue.record("second client flags must close the connection")
            return
        }
    }

    @Test func completionsNobodyAskedForCloseTheConnection() {
        for event in 0..<4 {
            var machine = makeHandshake()
            let action: NBDHandshakeStateMachine.Action
            switch event {
            case 0: action = machine.exportOpened(.success(.fixture()))
            case 1: action = machine.exportListReceived([("vol", "")])
            case 2: action = machine.exportListFailed(.init(replyType: NBDOptionReplyType.errShutdown, message: "x"))
            default: action = machine.tlsHandshakeCompleted()
            }
            guard case .sendAndClose([], .outOfOrder) = action else {
                Issue.record("event \(event) in the wrong state gave \(action)")
                continue
            }
        }
    }

    /// Every event in every order, by seed: none may trap, and once the machine has closed or
    /// entered transmission, every later event closes.
    @Test(arguments: 0..<50)
    func randomEventOrdersNeverTrap(seed: Int) {
        var rng = SplitMix64(seed: UInt64(seed))
        var machine = NBDHandshakeStateMachine(configuration: .init(
            tlsPolicy: [.disabled, .optional, .required][Int(rng.next() % 3)], optionsMax: 64, requestBytesMax: 1 << 20))
        var ended = false
        for _ in 0..<80 {
            let action: NBDHandshakeStateMachine.Action
            switch rng.next() % 9 {
            case 0: action = machine.clientFlagsReceived(UInt32(rng.next() % 4))
            case 1: action = machine.optionReceived(goOption())
            case 2: action = machine.optionReceived(.list)
            case 3: action = machine.optionReceived(.startTLS)
            case 4: action = machine.optionReceived(.structuredReply)
            case 5: action = machine.exportOpened(rng.next() % 2 == 0 ? .success(.fixture())
                                                  : .failure(.init(replyType: NBDOptionReplyType.errUnknown, message: "no")))
            case 6: action = machine.exportListReceived([("vol", "")])
            case 7: action = machine.tlsHandshakeCompleted()
            default: action = machine.optionReceived(.info(NBDExportQuery(name: "vol", informationRequests: [])))
            }
            if ended {
                guard case .sendAndClose = action else {
                    Issue.record("seed \(seed): an event after the end gave \(action)")
                    return
                }
            }
            switch action {
            case .sendAndClose, .enterTransmission: ended = true
            default: break
            }
        }
    }
}
