import NBDProtocol
import NIOCore
import Testing

/// Feeds `bytes` to a parser in pieces of `step` bytes and collects every message.
func parseAll(_ bytes: [UInt8], step: Int, transmission: Bool = false, optionBytesMax: Int = 65536,
              requestBytesMax: Int = 1 << 20) throws(NBDProtocolError) -> [NBDClientMessage] {
    var parser = NBDMessageParser(optionBytesMax: optionBytesMax, requestBytesMax: requestBytesMax)
    if transmission { parser.enterTransmission() }
    var buffer = ByteBuffer()
    var messages: [NBDClientMessage] = []
    var index = 0
    while index < bytes.count {
        let end = min(bytes.count, index + step)
        buffer.writeBytes(bytes[index..<end])
        index = end
        while let message = try parser.nextMessage(from: &buffer) { messages.append(message) }
    }
    return messages
}

func optionBytes(_ code: UInt32, _ payload: [UInt8] = [], announced: UInt32? = nil) -> [UInt8] {
    var buffer = ByteBuffer()
    NBDClientEncoder.writeOption(code, payload: payload, announcedLength: announced, into: &buffer)
    return Array(buffer.readableBytesView)
}

func requestBytes(_ command: NBDCommand, flags: NBDCommandFlags = [], handle: UInt64, offset: UInt64 = 0,
                  length: UInt32, payload: [UInt8] = []) -> [UInt8] {
    var buffer = ByteBuffer()
    NBDClientEncoder.writeRequest(type: command.rawValue, flags: flags, handle: handle, offset: offset, length: length,
                                  into: &buffer)
    buffer.writeBytes(payload)
    return Array(buffer.readableBytesView)
}

@Suite struct NBDMessageParserTests {
    @Test(arguments: [1, 2, 3, 7, 16, 1000])
    func dripFedHandshakeYieldsTheSameMessages(step: Int) throws {
        let payload = NBDClientEncoder.exportQueryPayload(name: "vol", informationRequests: [1, 3])
        let bytes = [0, 0, 0, 3] + optionBytes(NBDOptionCode.structuredReply) + optionBytes(NBDOptionCode.go, payload)
        let messages = try parseAll(bytes, step: step)
        #expect(messages == [
            .clientFlags(3),
            .option(code: NBDOptionCode.structuredReply, payload: ByteBuffer()),
            .option(code: NBDOptionCode.go, payload: ByteBuffer(bytes: payload)),
        ])
    }

    @Test(arguments: [1, 5, 28, 29, 4096])
    func dripFedRequestsIncludingWritePayloads(step: Int) throws {
        let data = (0..<5000).map { UInt8(truncatingIfNeeded: $0) }
        let bytes = requestBytes(.read, handle: 1, offset: 4096, length: 512)
            + requestBytes(.write, flags: .fua, handle: 2, offset: 0, length: UInt32(data.count), payload: data)
            + requestBytes(.flush, handle: 3, length: 0)
        let messages = try parseAll(bytes, step: step, transmission: true)
        #expect(messages.count == 3)
        guard case .request(let write) = messages[1] else { Issue.record("not a request"); return }
        #expect(write.command == .write && write.flags == .fua && write.handle == 2)
        #expect(write.payload.map { Array($0.readableBytesView) } == data)
        guard case .request(let flush) = messages[2] else { Issue.record("not a request"); return }
        #expect(flush.command == .flush && flush.handle == 3 && flush.payload == nil)
    }

    @Test func garbageOptionMagicIsAProtocolError() {
        var bytes: [UInt8] = [0, 0, 0, 1]
        bytes += Array("GET / HTTP/1.1\r\n\r\n".utf8)
        #expect(throws: NBDProtocolError.self) { try parseAll(bytes, step: 64) }
    }

    @Test func garbageRequestMagicIsAProtocolError() {
        #expect(throws: NBDProtocolError.badRequestMagic(0x4141_4141)) {
            try parseAll([UInt8](repeating: 0x41, count: 28), step: 28, transmission: true)
        }
    }

    @Test func truncatedHeadersYieldNothingAndWaitForMore() throws {
        let full = requestBytes(.read, handle: 9, length: 512)
        for cut in 0..<full.count {
            #expect(try parseAll(Array(full.prefix(cut)), step: 3, transmission: true).isEmpty)
        }
        let option = [0, 0, 0, 1] + optionBytes(NBDOptionCode.go, NBDClientEncoder.exportQueryPayload(name: "x"))
        #expect(try parseAll(Array(option.prefix(option.count - 1)), step: 1) == [.clientFlags(1)])
    }

    @Test func fourGiBOptionIsRejectedBeforeAnyPayloadIsBuffered() {
        let bytes = [0, 0, 0, 1] + optionBytes(NBDOptionCode.exportName, announced: UInt32.max)
        #expect(throws: NBDProtocolError.optionTooLarge(option: NBDOptionCode.exportName, length: UInt32.max)) {
            try parseAll(bytes, step: 1)
        }
    }

    @Test func oversizedWriteIsSkippedWithoutBufferingAndReportedAfterItsPayload() throws {
        var parser = NBDMessageParser(optionBytesMax: 1024, requestBytesMax: 4096)
        parser.enterTransmission()
        var buffer = ByteBuffer(bytes: requestBytes(.write, handle: 5, length: UInt32.max))
        #expect(try parser.nextMessage(from: &buffer) == nil)
        // 64 MiB of payload arrive in 64 KiB reads; the parser consumes every byte as it comes.
        let chunk = [UInt8](repeating: 0xEE, count: 65536)
        for _ in 0..<1024 {
            buffer.writeBytes(chunk)
            #expect(try parser.nextMessage(from: &buffer) == nil)
            #expect(buffer.readableBytes == 0)
            buffer.clear()
        }
        #expect(parser.pendingPayloadBytes == 0)
        // A small oversized write completes, and the following request parses normally.
        var small = NBDMessageParser(optionBytesMax: 1024, requestBytesMax: 4096)
        small.enterTransmission()
        var bytes = ByteBuffer(bytes: requestBytes(.write, handle: 6, length: 5000, payload: [UInt8](repeating: 1, count: 5000))
            + requestBytes(.read, handle: 7, length: 16))
        guard case .request(let refused)? = try small.nextMessage(from: &bytes) else { Issue.record("no request"); return }
        #expect(refused.handle == 6 && refused.payloadDiscarded && refused.payload == nil)
        guard case .request(let read)? = try small.nextMessage(from: &bytes) else { Issue.record("no request"); return }
        #expect(read.handle == 7 && read.command == .read)
    }

    @Test func unknownCommandTypesParseSoThatTheyCanBeAnsweredWithEINVAL() throws {
        var buffer = ByteBuffer()
        NBDClientEncoder.writeRequest(type: 0x77, handle: 1, offset: 0, length: 4096, into: &buffer)
        let messages = try parseAll(Array(buffer.readableBytesView), step: 28, transmission: true)
        guard case .request(let request)? = messages.first else { Issue.record("no request"); return }
        #expect(request.command == nil && request.type == 0x77 && request.payload == nil)
    }
}

@Suite struct NBDOptionTests {
    @Test func infoAndGoParseNameAndInformationRequests() {
        let payload = NBDClientEncoder.exportQueryPayload(name: "vm0@snap", informationRequests: [0, 2, 3])
        #expect(NBDOption(code: NBDOptionCode.go, payload: ByteBuffer(bytes: payload))
                == .go(NBDExportQuery(name: "vm0@snap", informationRequests: [0, 2, 3])))
        #expect(NBDOption(code: NBDOptionCode.info, payload: ByteBuffer(bytes: payload))
                == .info(NBDExportQuery(name: "vm0@snap", informationRequests: [0, 2, 3])))
    }

    @Test(arguments: [
        [0, 0, 0, 9, 65],                       // name length beyond the data
        [0xFF, 0xFF, 0xFF, 0xFF, 65, 0, 0],     // 4 GiB name length
        [0, 0, 0, 1, 65, 0, 5, 0, 1],           // 5 info requests announced, 1 present
        [0, 0, 0, 1, 65, 0, 0, 9],              // trailing byte
        [0, 0, 0, 1, 0, 0, 0],                  // NUL in the name
        [0, 0, 0, 2, 0xC3, 0x28, 0, 0],         // invalid UTF-8
    ] as [[UInt8]])
    func malformedGoPayloadsAreInvalidNotFatal(payload: [UInt8]) {
        guard case .malformed(let code, _) = NBDOption(code: NBDOptionCode.go, payload: ByteBuffer(bytes: payload)) else {
            Issue.record("accepted \(payload)")
            return
        }
        #expect(code == NBDOptionCode.go)
    }

    @Test func metaContextQueriesParseAndHostileCountsAreRejected() {
        let payload = NBDClientEncoder.metaContextPayload(exportName: "vol", queries: ["base:allocation", "x-vbd:"])
        #expect(NBDOption(code: NBDOptionCode.setMetaContext, payload: ByteBuffer(bytes: payload))
                == .setMetaContext(exportName: "vol", queries: ["base:allocation", "x-vbd:"]))
        let hostile: [UInt8] = [0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]  // 4 billion queries, no data
        guard case .malformed = NBDOption(code: NBDOptionCode.listMetaContext, payload: ByteBuffer(bytes: hostile)) else {
            Issue.record("accepted a hostile query count")
            return
        }
    }

    @Test func optionsWithoutDataRejectData() {
        #expect(NBDOption(code: NBDOptionCode.list, payload: ByteBuffer()) == .list)
        guard case .malformed = NBDOption(code: NBDOptionCode.list, payload: ByteBuffer(bytes: [1])) else {
            Issue.record("LIST with data accepted")
            return
        }
        #expect(NBDOption(code: 4242, payload: ByteBuffer(bytes: [1, 2])) == .unsupported(code: 4242))
    }

    @Test func listQueriesMatchNamespacesButSetNeedsExactNames() {
        #expect(NBDMetaContext.listed(by: "base:") == [.baseAllocation])
        #expect(NBDMetaContext.listed(by: "x-vbd:") == [.vbdSharing])
        #expect(NBDMetaContext.listed(by: "qemu:") == [])
        #expect(NBDMetaContext.selected(by: "x-vbd:sharing") == .vbdSharing)
        #expect(NBDMetaContext.selected(by: "base:") == nil)
    }
}
