import NBDProtocol
import NIOCore
import Testing
import VBDCore

func makeTransmission(readOnly: Bool = false, structured: Bool = true, contexts: [NBDMetaContext] = [.baseAllocation],
                      inFlightMax: Int = 4) -> NBDTransmissionStateMachine {
    let export = NBDExportDescription.fixture(readOnly: readOnly)
    return NBDTransmissionStateMachine(
        export: NBDNegotiatedExport(
            export: export,
            transmissionFlags: NBDNegotiatedExport.transmissionFlags(readOnly: readOnly, structuredReplies: structured),
            structuredReplies: structured, metaContexts: structured ? contexts : [], requestBytesMax: 32 << 20),
        inFlightMax: inFlightMax)
}

func request(_ command: NBDCommand, _ flags: NBDCommandFlags = [], handle: UInt64 = 7, offset: UInt64 = 0,
             length: UInt32 = 4096) -> NBDRequest {
    NBDRequest(flags: flags, type: command.rawValue, handle: handle, offset: offset, length: length,
               payload: command == .write ? ByteBuffer(repeating: 1, count: Int(length)) : nil)
}

func rejection(of action: NBDTransmissionStateMachine.Action) -> NBDError? {
    if case .replyError(let rejection) = action { return rejection.error }
    return nil
}

@Suite struct NBDTransmissionStateMachineTests {
    @Test func validRequestsBecomeOperations() {
        var machine = makeTransmission(inFlightMax: 16)
        #expect(machine.requestReceived(request(.read, .dontFragment)) == .execute(.read(handle: 7, offset: 0, length: 4096, dontFragment: true)))
        #expect(machine.requestReceived(request(.write, .fua)) == .execute(.write(handle: 7, offset: 0, length: 4096, fua: true)))
        #expect(machine.requestReceived(request(.flush, length: 0)) == .execute(.flush(handle: 7)))
        #expect(machine.requestReceived(request(.trim)) == .execute(.trim(handle: 7, offset: 0, length: 4096, fua: false)))
        #expect(machine.requestReceived(request(.writeZeroes, [.noHole, .fastZero]))
                == .execute(.writeZeroes(handle: 7, offset: 0, length: 4096, mayTrim: false, fastOnly: true, fua: false)))
        #expect(machine.requestReceived(request(.cache)) == .execute(.cache(handle: 7, offset: 0, length: 4096)))
        #expect(machine.requestReceived(request(.blockStatus, .requestOne))
                == .execute(.blockStatus(handle: 7, offset: 0, length: 4096, onlyOne: true, contexts: [.baseAllocation])))
        #expect(machine.inFlight == 7)
    }

    @Test func writesToReadOnlyExportsAreEPERM() {
        var machine = makeTransmission(readOnly: true)
        #expect(rejection(of: machine.requestReceived(request(.write))) == .notPermitted)
        #expect(rejection(of: machine.requestReceived(request(.write, .fua))) == .notPermitted)
        #expect(rejection(of: machine.requestReceived(request(.trim))) == .notPermitted)
        #expect(rejection(of: machine.requestReceived(request(.writeZeroes, .noHole))) == .notPermitted)
        #expect(machine.requestReceived(request(.read)) == .execute(.read(handle: 7, offset: 0, length: 4096, dontFragment: false)))
    }

    @Test func outOfRangeIsEINVALExceptWritesWhichAreENOSPC() {
        var machine = makeTransmission()
        let size = NBDExportDescription.fixture().size
        #expect(rejection(of: machine.requestReceived(request(.read, offset: size))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.read, offset: size - 512))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.read, offset: UInt64.max - 10))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.trim, offset: size))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.blockStatus, offset: size))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.write, offset: size))) == .noSpace)
        #expect(rejection(of: machine.requestReceived(request(.writeZeroes, offset: size))) == .noSpace)
        #expect(machine.inFlight == 0)
    }

    @Test func malformedRequestsAreEINVAL() {
        var machine = makeTransmission()
        let unknown = NBDRequest(flags: [], type: 0x77, handle: 1, offset: 0, length: 1)
        #expect(rejection(of: machine.requestReceived(unknown)) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.read, .requestOne))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.read, NBDCommandFlags(rawValue: 1 << 9)))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.write, .dontFragment))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.flush, offset: 1, length: 0))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.read, length: 0))) == .invalid)
        #expect(rejection(of: machine.requestReceived(request(.read, length: (32 << 20) + 1))) == .invalid)
        var oversized = request(.write, length: 16)
        oversized.payload = nil
        oversized.payloadDiscarded = true
        #expect(rejection(of: machine.requestReceived(oversized)) == .invalid)
    }

    @Test func negotiatedFeaturesGateFlagsAndCommands() {
        var plain = makeTransmission(structured: false)
        #expect(rejection(of: plain.requestReceived(request(.read, .dontFragment))) == .invalid)
        #expect(rejection(of: plain.requestReceived(request(.blockStatus))) == .invalid)
        var readOnly = makeTransmission(readOnly: true)
        #expect(rejection(of: readOnly.requestReceived(request(.read, .fua))) == .invalid)  // FUA not advertised
        var writable = makeTransmission()
        #expect(writable.requestReceived(request(.read, .fua)) == .execute(.read(handle: 7, offset: 0, length: 4096, dontFragment: false)))
    }

    @Test func inFlightIsBoundedAndDisconnectWaitsForIt() {
        var machine = makeTransmission(inFlightMax: 2)
        _ = machine.requestReceived(request(.read, handle: 1))
        #expect(machine.canAcceptRequest)
        _ = machine.requestReceived(request(.read, handle: 2))
        #expect(!machine.canAcceptRequest)
        #expect(machine.requestCompleted() == .none)
        #expect(machine.requestReceived(request(.disconnect, handle: 3, length: 0)) == .closeWhenIdle)
        #expect(!machine.canAcceptRequest)
        #expect(machine.requestReceived(request(.read, handle: 4)) == .none)  // ignored after DISC
        #expect(machine.requestCompleted() == .close)
        var idle = makeTransmission()
        #expect(idle.requestReceived(request(.disconnect, length: 0)) == .close)
    }
}

@Suite struct NBDErrorTests {
    @Test(arguments: [
        (BlockDeviceError.outOfRange(offset: 1, length: 2, size: 3), NBDError.invalid),
        (.invalid("x"), .invalid),
        (.readOnly(name: "v@s"), .notPermitted),
        (.noSpace, .noSpace),
        (.corrupted(volume: "v", offset: 0, detail: "hash"), .io),
        (.io("disk"), .io),
        (.gone("v"), .io),
        (.notSupported("slow"), .notSupported),
    ])
    func everyDeviceErrorMapsToItsWireError(device: BlockDeviceError, wire: NBDError) {
        #expect(NBDError(device) == wire)
        #expect(Int32(NBDError(device).rawValue) == device.errnoValue)
    }

    @Test func wireValuesAreTheSpecsErrnoNumbers() {
        #expect(NBDError.allCases.map(\.rawValue) == [1, 5, 12, 22, 28, 75, 95, 108])
    }
}

@Suite struct NBDReplyTests {
    @Test func readSegmentsTurnZeroExtentsIntoHolesAndMergeData() {
        let extents = [Extent(length: 8192, flags: [.hole, .zero]), Extent(length: 4096, flags: []),
                       Extent(length: 512, flags: [.zero]), Extent(length: 4096, flags: [.shared])]
        #expect(NBDReplyPlanning.readSegments(offset: 1000, length: 20000, extents: extents) == [
            .hole(offset: 1000, length: 8192),
            .data(offset: 9192, length: 4096 + 512 + 4096 + 3104),  // short zero run stays data; tail not described
        ])
    }

    @Test func blockStatusMapsFlagsPerContextAndHonoursReqOne() {
        let extents = [Extent(length: 4096, flags: [.shared]), Extent(length: 4096, flags: []),
                       Extent(length: 8192, flags: [.hole, .zero])]
        #expect(NBDReplyPlanning.blockStatusDescriptors(context: .baseAllocation, extents: extents, length: 16384, onlyOne: false)
                == [NBDBlockDescriptor(length: 8192, flags: 0), NBDBlockDescriptor(length: 8192, flags: 3)])
        #expect(NBDReplyPlanning.blockStatusDescriptors(context: .vbdSharing, extents: extents, length: 16384, onlyOne: false)
                == [NBDBlockDescriptor(length: 4096, flags: 1), NBDBlockDescriptor(length: 12288, flags: 0)])
        #expect(NBDReplyPlanning.blockStatusDescriptors(context: .baseAllocation, extents: extents, length: 16384, onlyOne: true)
                == [NBDBlockDescriptor(length: 8192, flags: 0)])
        #expect(NBDReplyPlanning.blockStatusDescriptors(context: .baseAllocation, extents: extents, length: 1000, onlyOne: false)
                == [NBDBlockDescriptor(length: 1000, flags: 0)])
    }

    @Test func structuredChunksHaveTheDocumentedLayout() {
        var buffer = ByteBuffer()
        NBDReplyEncoder.writeOffsetHole(handle: 0x0102, offset: 4096, length: 512, done: true, into: &buffer)
        #expect(Array(buffer.readableBytesView) == [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0, 12,
                                                    0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0])
        buffer.clear()
        NBDReplyEncoder.writeErrorChunk(handle: 1, error: .noSpace, message: "full", into: &buffer)
        #expect(buffer.getInteger(at: 6, as: UInt16.self) == NBDStructuredReply.typeError)
        #expect(buffer.getInteger(at: 16, as: UInt32.self) == 10)
        #expect(buffer.getInteger(at: 20, as: UInt32.self) == 28)
        #expect(buffer.getString(at: 26, length: 4) == "full")
    }
}

extension NBDTransmissionStateMachineTests {
    /// The handler stops reading at the limit; input that arrives by another path (a read
    /// re-entered from a failing write) must abort the connection, not overflow the table or trap.
    @Test func aRequestBeyondTheInFlightLimitAbortsTheConnection() {
        var machine = makeTransmission(inFlightMax: 2)
        #expect(machine.requestReceived(request(.read, handle: 1)) == .execute(.read(handle: 1, offset: 0, length: 4096, dontFragment: false)))
        #expect(machine.requestReceived(request(.read, handle: 2)) == .execute(.read(handle: 2, offset: 0, length: 4096, dontFragment: false)))
        guard case .abort(.outOfOrder) = machine.requestReceived(request(.read, handle: 3)) else {
            Issue.record("a third request with two allowed must abort")
            return
        }
        #expect(machine.inFlight == 2 && !machine.canAcceptRequest)
        #expect(machine.requestReceived(request(.read, handle: 4)) == .none)
    }

    @Test func aCompletionWithNothingInFlightChangesNothing() {
        var machine = makeTransmission()
        #expect(machine.requestCompleted() == .none)
        #expect(machine.inFlight == 0 && machine.canAcceptRequest)
    }
}
